"""Model soups: averages of params checkpoints."""

import numpy as np
import pytest
from flax import nnx

from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.runtime.soup import average_params, soup_checkpoints
from encdec_adapt.storage import params_io

CFG = load_preset("gemma_tiny").replace(num_layers=1, vocab_size=64)


def test_soup_of_checkpoints(tmp_path):
    trees = [params_io.model_params(DecoderOnly(CFG, rngs=nnx.Rngs(s))) for s in range(3)]
    paths = []
    for i, tree in enumerate(trees):
        paths.append(str(tmp_path / f"c{i}"))
        params_io.save(paths[-1], tree, "decoder_only", CFG.to_dict())
    soup_checkpoints(paths, str(tmp_path / "soup"), weights=[1, 1, 2])
    got = params_io.flatten(params_io.load(str(tmp_path / "soup")))
    flat = [params_io.flatten(t) for t in trees]
    for name, value in got.items():
        want = (flat[0][name] + flat[1][name] + 2 * flat[2][name]) / 4
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)


def test_soup_rejects_other_architectures(tmp_path):
    a = params_io.model_params(DecoderOnly(CFG, rngs=nnx.Rngs(0)))
    b = params_io.model_params(DecoderOnly(CFG.replace(hidden_dim=128), rngs=nnx.Rngs(0)))
    with pytest.raises(params_io.CheckpointError, match=r"ingredient 1.*mlp/down.*\(128, 64\)"):
        average_params([a, b])
    params_io.save(str(tmp_path / "a"), a, "decoder_only", CFG.to_dict())
    params_io.save(str(tmp_path / "b"), b, "decoder_only", CFG.replace(hidden_dim=128).to_dict())
    with pytest.raises(params_io.CheckpointError, match="only one architecture"):
        soup_checkpoints([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
