"""Blockwise attention and the chunked vocabulary loss against the materialising paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.nn import blockwise
from encdec_adapt.nn.attention import KV, Attention, MaskSpec, concat_keys
from encdec_adapt.nn.transformer import default_positions

B, K, G, H = 2, 2, 2, 8


def _attn(soft_cap, impl):
    return Attention(
        embed_dim=16,
        num_heads=K * G,
        num_kv_heads=K,
        head_dim=H,
        query_pre_attn_scalar=H,
        attn_logits_soft_cap=soft_cap,
        use_qk_norm=False,
        rms_norm_eps=1e-6,
        rope_base=None,
        attention_impl=impl,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )


def _packed_segments(rng, length, pad):
    """[B, length] segment ids: a few packed documents then `pad` padding tokens per row."""
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, length - pad), size=2, replace=False))
        seg = np.zeros(length, np.int32)
        seg[: cuts[0]] = 1
        seg[cuts[0] : cuts[1]] = 2
        seg[cuts[1] : length - pad] = 3
        rows.append(seg)
    return jnp.asarray(np.stack(rows))


def _masks(kind, t, s, rng):
    ones_t = jnp.ones((B, t), jnp.int32)
    pos_t = default_positions(ones_t)
    if kind == "causal":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, causal=True)
    if kind == "bidirectional":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t)
    if kind == "causal_window":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, causal=True, window=7)
    if kind == "symmetric_window":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, window=6)
    if kind == "packed":
        seg = _packed_segments(rng, t, pad=5)
        pos = default_positions(seg)
        return MaskSpec(pos, seg, pos, seg, causal=True, window=9)
    if kind == "packed_bidirectional":
        seg = _packed_segments(rng, t, pad=3)
        pos = default_positions(seg)
        return MaskSpec(pos, seg, pos, seg)
    if kind == "cross":
        enc = jnp.asarray(np.stack([np.r_[np.ones(s - 4), np.zeros(4)], np.ones(s)]), jnp.int32)
        return MaskSpec(pos_t, ones_t, jnp.zeros_like(enc), enc)
    if kind == "cross_packed":
        dec = _packed_segments(rng, t, pad=2)
        enc = _packed_segments(rng, s, pad=6)
        return MaskSpec(default_positions(dec), dec, jnp.zeros_like(enc), enc)
    if kind == "merged":
        self_mask = MaskSpec(pos_t, ones_t, pos_t, ones_t, causal=True, window=5)
        enc = jnp.asarray(np.stack([np.r_[np.ones(s - t - 3), np.zeros(3)]] * B), jnp.int32)
        return concat_keys(self_mask, MaskSpec(pos_t, ones_t, jnp.zeros_like(enc), enc))
    raise ValueError(kind)


KINDS = [
    "causal",
    "bidirectional",
    "causal_window",
    "symmetric_window",
    "packed",
    "packed_bidirectional",
    "cross",
    "cross_packed",
    "merged",
]


@pytest.mark.parametrize("soft_cap", [None, 5.0])
@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_matches_materialised(kind, soft_cap):
    rng = np.random.default_rng(hash(kind) % 1000)
    t = 37
    s = {"cross": 29, "cross_packed": 45, "merged": t + 23}.get(kind, t)
    mask = _masks(kind, t, s, rng)
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (B, t, K * G, H)) * 2.0 + 0.3
    k = jax.random.normal(keys[1], (B, s, K, H)) * 1.5 - 0.2
    v = jax.random.normal(keys[2], (B, s, K, H)) + 0.5
    ref_attn, blk_attn = _attn(soft_cap, "xla"), _attn(soft_cap, "blockwise")
    blocks = {"block_q": 8, "block_k": 16}

    def ref(q, k, v):
        return ref_attn.attend(q, KV(k, v), mask)

    def blk(q, k, v):
        b, t_, n, h = q.shape
        out = blockwise.attention(
            q.reshape(b, t_, K, G, h), k, v, mask, soft_cap=soft_cap, **blocks
        )
        out = out.reshape(b, t_, n, h)
        return jnp.einsum("btnh,nhd->btd", out, blk_attn.o[...])

    np.testing.assert_allclose(jax.jit(blk)(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    w = jax.random.normal(jax.random.key(7), (B, t, 16))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    g_blk = jax.jit(jax.grad(loss(blk), argnums=(0, 1, 2)))(q, k, v)
    for a, b_ in zip(g_blk, g_ref, strict=True):
        np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)
    # Through `attend` with the default block size as well (one tile: T, S < 512).
    np.testing.assert_allclose(
        jax.jit(lambda q, k, v: blk_attn.attend(q, KV(k, v), mask))(q, k, v),
        ref(q, k, v),
        atol=1e-5,
        rtol=1e-5,
    )


def test_blockwise_skips_key_blocks_outside_the_window():
    t = 64
    ones = jnp.ones((1, t), jnp.int32)
    pos = default_positions(ones)
    st = blockwise._Static(True, 8, None, 8, 8, t, False)
    possible, lo, hi = blockwise._plan(st, pos, ones, pos, ones, None)
    # Query block i sees key blocks i - 1 and i only.
    assert np.asarray(possible).sum() == 2 * (t // 8) - 1
    np.testing.assert_array_equal(lo, np.maximum(np.arange(8) - 1, 0))
    np.testing.assert_array_equal(hi, np.arange(8) + 1)


def test_select_impl(monkeypatch):
    monkeypatch.delenv(blockwise.ENV_VAR, raising=False)
    sel = blockwise.select_impl
    short = dict(q_len=512, kv_len=512, soft_cap=None)
    long = dict(q_len=4096, kv_len=4096, soft_cap=None)
    assert sel("auto", **short) == "xla"
    assert sel("auto", q_len=1024, kv_len=1024, soft_cap=50.0) == "xla"
    assert sel("auto", **long, backend="cpu") == "blockwise"
    assert sel("auto", **long, dtype=jnp.bfloat16, backend="gpu") == "cudnn"
    assert sel("auto", **long, dtype=jnp.float32, backend="gpu") == "blockwise"
    assert sel("auto", q_len=4096, kv_len=4096, soft_cap=50.0, backend="gpu") == "blockwise"
    assert sel("auto", **long, dtype=jnp.bfloat16, head_dim=512, backend="gpu") == "blockwise"
    assert sel("blockwise", **short) == "blockwise"
    assert sel("xla", **long) == "xla"
    with pytest.raises(ValueError, match="cudnn"):
        sel("cudnn", **short, backend="cpu")
    with pytest.raises(ValueError, match="attention_impl"):
        sel("flash", **short)
    monkeypatch.setenv(blockwise.ENV_VAR, "blockwise")
    assert sel("auto", **short) == "blockwise"
