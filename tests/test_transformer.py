"""DecoderOnly behaviour beyond parity: KV cache, packing, dropout, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.nn import layers
from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.transformer import DecoderOnly, default_positions, init_cache

CFG = load_preset("gemma_tiny").replace(sliding_window=4)


@pytest.fixture(scope="module")
def model():
    return DecoderOnly(CFG, rngs=nnx.Rngs(0))


def tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, CFG.vocab_size, size=shape))


# Compiled once per input shape: eager calls compile every op of the model at each new shape,
# several seconds a call on CPU.
@nnx.jit
def forward(m, x, positions=None, segment_ids=None, cache=None, rng=None):
    return m(x, positions=positions, segment_ids=segment_ids, cache=cache, rng=rng)


def test_cached_decoding_equals_full_forward(model):
    x = tokens((2, 12))
    full, _ = forward(model, x)
    cache = init_cache(CFG, batch_size=2, max_length=16)
    prefill, cache = forward(model, x[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 12):
        logits, cache = forward(model, x[:, t : t + 1], positions=jnp.full((2, 1), t), cache=cache)
        steps.append(logits)
    assert int(cache.index) == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_packed_segments_do_not_attend_across(model):
    a, b = tokens((1, 7), seed=1), tokens((1, 9), seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)
    segments = jnp.asarray([[1] * 7 + [2] * 9 + [0] * 4])
    got, _ = forward(model, packed, segment_ids=segments)
    alone_a, _ = forward(model, a)
    alone_b, _ = forward(model, b)
    np.testing.assert_allclose(got[:, :7], alone_a, atol=1e-5)
    np.testing.assert_allclose(got[:, 7:16], alone_b, atol=1e-5)


def test_default_positions_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        default_positions(seg), [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    )


def test_dropout_is_seeded():
    m = DecoderOnly(CFG.replace(dropout_rate=0.3), rngs=nnx.Rngs(0))
    x = tokens((2, 8))
    off1, off2 = forward(m, x)[0], forward(m, x)[0]
    on1, on2 = forward(m, x, rng=jax.random.key(1))[0], forward(m, x, rng=jax.random.key(1))[0]
    on3 = forward(m, x, rng=jax.random.key(2))[0]
    np.testing.assert_array_equal(off1, off2)
    np.testing.assert_array_equal(on1, on2)
    assert not np.allclose(on1, off1) and not np.allclose(on1, on3)


def test_bfloat16_compute_close_to_float32(model):
    x = tokens((2, 8))
    m16 = DecoderOnly(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(m16, nnx.state(model, nnx.Param))
    hidden = nnx.jit(lambda m, x: m(x, return_hidden=True)[0])
    hidden32, hidden16 = hidden(model, x), hidden(m16, x)
    assert hidden16.dtype == jnp.bfloat16
    assert m16.stack.blocks[0].attn.q[...].dtype == jnp.float32  # params stay float32
    np.testing.assert_allclose(np.asarray(hidden16, np.float32), hidden32, atol=0.1, rtol=0.05)


def test_invalid_config_names_fields():
    with pytest.raises(ValueError, match=r"num_heads=5 is not a multiple of num_kv_heads=2"):
        CFG.replace(num_heads=5)
    with pytest.raises(ValueError, match=r"dtype='float33'"):
        CFG.replace(dtype="float33")


@pytest.mark.parametrize(
    "spec, x_shape, w_shape",
    [
        ("btd,df->btf", (3, 5, 8), (8, 6)),
        ("btd,ndh->btnh", (2, 7, 8), (3, 8, 4)),
        ("btnh,nhd->btd", (3, 5, 3, 4), (3, 4, 8)),
        ("btd,vd->btv", (2, 5, 8), (11, 8)),
    ],
)
def test_token_einsum_equals_einsum(spec, x_shape, w_shape):
    """Merging the two token axes changes how XLA lays the matmuls out, not the numbers:
    values and both gradients as jnp.einsum's."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
    g = jax.random.normal(kg, out_shape)
    want, want_vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
    got, got_vjp = jax.vjp(lambda x, w: layers.token_einsum(spec, x, w), x, w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="token axes"):
        layers.token_einsum("btd,df->tbf", x if x.ndim == 3 else x[..., 0], w)
