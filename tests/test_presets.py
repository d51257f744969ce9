"""Full-size presets: eval_shape parameter counts match the published sizes, no allocation."""

import jax
import pytest
from flax import nnx

from encdec_adapt.nn.config import PRESETS, load_preset
from encdec_adapt.nn.transformer import DecoderOnly

# Published totals (HF model cards / papers), with the digits they are published to.
PUBLISHED = {
    "gemma2_2b": (2.61e9, 0.005e9),
    "gemma2_9b": (9.24e9, 0.005e9),
    "gemma2_27b": (27.2e9, 0.05e9),
    "gemma3_270m": (268e6, 0.5e6),
    "gemma3_1b": (1.00e9, 0.005e9),
    "gemma3_4b": (3.88e9, 0.005e9),  # language model only (the 4.3B total includes vision)
}


def count(name: str) -> int:
    cfg = load_preset(name)
    abstract = nnx.eval_shape(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), "eval_shape allocated"
    return sum(x.size for x in leaves)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    published, tolerance = PUBLISHED[name]
    assert abs(count(name) - published) <= tolerance, count(name)


def test_every_preset_loads():
    for name in PRESETS:
        cfg = load_preset(name)
        assert len(cfg.layer_types) == cfg.num_layers


def test_unknown_preset():
    with pytest.raises(FileNotFoundError, match="No model preset 'gemma9_1b'"):
        load_preset("gemma9_1b")
