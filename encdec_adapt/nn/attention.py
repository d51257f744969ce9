"""Grouped-query attention with RoPE, soft-cap, QK-norm, and the masks and caches it runs with.

Masks are built from positions and segment ids (0 marks padding or an empty cache slot), so the
same code serves training with padding or packing, bidirectional encoders, sliding windows and
decoding from a cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.nn import layers
from encdec_adapt.parallel import sharding

# Large finite negative for masked logits: a fully masked row (a padding query) stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_positions: jax.Array,
    q_segments: jax.Array,
    k_positions: jax.Array,
    k_segments: jax.Array,
    *,
    causal: bool,
    window: int | None = None,
) -> jax.Array:
    """[B, T], [B, T], [B, S], [B, S] -> [B, T, S] bool, True where the query may see the key.

    Keys are visible within the same non-zero segment; causal masks keep k <= q; a window keeps
    q - k < window (causal) or |q - k| < window (bidirectional), as HF Gemma does.
    """
    q_pos, k_pos = q_positions[:, :, None], k_positions[:, None, :]
    mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        dist = q_pos - k_pos if causal else jnp.abs(q_pos - k_pos)
        mask &= dist < window
    return mask


def apply_rope(x: jax.Array, positions: jax.Array, base: float, scale: float = 1.0) -> jax.Array:
    """Rotary embedding on the two halves of the last axis.

    x: [B, T, N, H]; positions: [B, T] int. `scale` is the linear position-interpolation factor.
    Angles are computed in float32, as HF does, then the rotation runs in x.dtype.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * (inv_freq / scale)  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


class KV(NamedTuple):
    """Keys and values of one layer: each [B, S, K, H]."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """Multi-head attention with K <= N key/value heads.

    Self-attention projects queries, keys and values from the same input; cross-attention
    (`kv_input_dim` set, `rope_base` None) projects keys and values from the encoder output.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        query_pre_attn_scalar: float,
        attn_logits_soft_cap: float | None,
        use_qk_norm: bool,
        rms_norm_eps: float,
        rope_base: float | None,
        rope_scale: float = 1.0,
        kv_input_dim: int | None = None,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kv_input_dim = kv_input_dim or embed_dim
        init = layers.fan_in_init(in_axes=1)
        pd = param_dtype
        self.q = layers.param(
            rngs, init, (num_heads, embed_dim, head_dim), ("heads", "embed", "head_dim"), pd
        )
        kv_axes = ("kv_heads", "embed", "head_dim")
        self.k = layers.param(rngs, init, (num_kv_heads, kv_input_dim, head_dim), kv_axes, pd)
        self.v = layers.param(rngs, init, (num_kv_heads, kv_input_dim, head_dim), kv_axes, pd)
        self.o = layers.param(
            rngs,
            layers.fan_in_init(in_axes=(0, 1)),
            (num_heads, head_dim, embed_dim),
            ("heads", "head_dim", "embed"),
            pd,
        )
        if use_qk_norm:
            self.q_norm = layers.RMSNorm(head_dim, eps=rms_norm_eps, param_dtype=pd, rngs=rngs)
            self.k_norm = layers.RMSNorm(head_dim, eps=rms_norm_eps, param_dtype=pd, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.query_scale = query_pre_attn_scalar**-0.5
        self.attn_logits_soft_cap = attn_logits_soft_cap
        self.rope_base, self.rope_scale = rope_base, rope_scale

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """[B, T, D], [B, T] -> scaled, rotated queries [B, T, N, H]."""
        q = jnp.einsum("btd,ndh->btnh", x, self.q[...].astype(x.dtype))
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rope_base is not None:
            q = apply_rope(q, positions, self.rope_base, self.rope_scale)
        q = sharding.constrain(
            q, ("activation_batch", "activation_length", "activation_heads", None)
        )
        return q * jnp.asarray(self.query_scale, q.dtype)

    def keys_values(self, x: jax.Array, positions: jax.Array | None) -> KV:
        """[B, S, D_kv], [B, S] -> rotated keys and values, each [B, S, K, H]."""
        k = jnp.einsum("bsd,kdh->bskh", x, self.k[...].astype(x.dtype))
        v = jnp.einsum("bsd,kdh->bskh", x, self.v[...].astype(x.dtype))
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rope_base is not None:
            k = apply_rope(k, positions, self.rope_base, self.rope_scale)
        axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
        return KV(sharding.constrain(k, axes), sharding.constrain(v, axes))

    def attend(self, q: jax.Array, kv: KV, mask: jax.Array) -> jax.Array:
        """Queries [B, T, N, H] over keys/values [B, S, K, H] with mask [B, T, S] -> [B, T, D]."""
        b, t, n, h = q.shape
        groups = n // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, h)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, kv.k)
        logits = soft_cap(logits, self.attn_logits_soft_cap)
        logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(kv.v.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, kv.v).reshape(b, t, n, h)
        return jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(out.dtype))
