"""The encoder_causal ablation switch: the encoder sees only earlier positions; the default
encoder stays bidirectional; a causal encoder is refused by the T5Gemma export."""

import jax
import numpy as np
import pytest
from flax import nnx

from encdec_adapt import load_encdec_preset
from encdec_adapt.convert.t5gemma import check_exportable
from encdec_adapt.nn.encdec import EncoderDecoder


@pytest.mark.parametrize("causal", [False, True])
def test_encoder_states_depend_on_later_tokens_only_when_bidirectional(causal):
    cfg = load_encdec_preset("t5gemma_tiny").replace(encoder_causal=causal)
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 2, 4096)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 7) % 4096)
    a = np.asarray(model.encode(tokens).hidden)
    b = np.asarray(model.encode(changed).hidden)
    before = np.abs(a[0, :8] - b[0, :8]).max()
    assert (before == 0) if causal else (before > 1e-4)
    assert np.abs(a[0, 8:] - b[0, 8:]).max() > 1e-4


def test_causal_encoder_is_not_exported_as_t5gemma():
    cfg = load_encdec_preset("t5gemma_tiny").replace(encoder_causal=True)
    with pytest.raises(ValueError, match="encoder_causal"):
        check_exportable(cfg)
