"""Grouped-query attention with RoPE, soft-cap, QK-norm, and the masks and caches it runs with.

Masks are built from positions and segment ids (0 marks padding or an empty cache slot), so the
same code serves training with padding or packing, bidirectional encoders, sliding windows and
decoding from a cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.nn import blockwise, layers
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
    window_ahead: int | None = None,
) -> jax.Array:
    """[B, T], [B, T], [B, S], [B, S] -> [B, T, S] bool, True where the query may see the key.

    Keys are visible within the same non-zero segment; causal masks keep k <= q; a window keeps
    q - k < window (causal) or |q - k| < window (bidirectional), as HF Gemma does. A
    bidirectional mask with `window_ahead` keeps q - k < window for keys at or before the query
    and k - q < window_ahead for keys after it (T5Gemma 2's encoder window).
    """
    q_pos, k_pos = q_positions[:, :, None], k_positions[:, None, :]
    mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    if causal:
        mask &= k_pos <= q_pos
    if window is not None:
        dist = q_pos - k_pos
        if causal:
            mask &= dist < window
        else:
            ahead = window if window_ahead is None else window_ahead
            mask &= jnp.where(dist >= 0, dist < window, -dist < ahead)
    return mask


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_positions", "q_segments", "k_positions", "k_segments", "k_exempt"],
    meta_fields=["causal", "window", "window_ahead"],
)
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """An attention mask by its rules, not its [B, T, S] values (see `attention_mask`).

    q_positions / q_segments: [B, T]; k_positions / k_segments: [B, S]; k_exempt: [B, S] bool or
    None: keys that only the segment rule applies to (no causal / window rule), the encoder keys
    of merged (T5Gemma 2) attention; causal / window / window_ahead: as in `attention_mask`. The
    materialising path builds `dense()`; the blockwise path builds one tile at a time from the
    same fields.
    """

    q_positions: jax.Array
    q_segments: jax.Array
    k_positions: jax.Array
    k_segments: jax.Array
    k_exempt: jax.Array | None = None
    causal: bool = False
    window: int | None = None
    window_ahead: int | None = None

    def dense(self) -> jax.Array:
        """[B, T, S] bool, True where the query may see the key."""
        args = (self.q_positions, self.q_segments, self.k_positions, self.k_segments)
        mask = attention_mask(
            *args, causal=self.causal, window=self.window, window_ahead=self.window_ahead
        )
        if self.k_exempt is None:
            return mask
        free = attention_mask(*args, causal=False)
        return jnp.where(self.k_exempt[:, None, :], free, mask)


def concat_keys(first: MaskSpec, second: MaskSpec) -> MaskSpec:
    """The mask over keys [first's keys; second's keys] for the same queries (merged attention).

    `second` must be a plain segment mask (no causal / window rule, no exempt keys).
    """
    if second.causal or second.window is not None or second.k_exempt is not None:
        raise ValueError("concat_keys: the second mask must be a plain segment mask")
    exempt_first = (
        jnp.zeros(first.k_segments.shape, bool) if first.k_exempt is None else first.k_exempt
    )
    return dataclasses.replace(
        first,
        k_positions=jnp.concatenate([first.k_positions, second.k_positions], axis=1),
        k_segments=jnp.concatenate([first.k_segments, second.k_segments], axis=1),
        k_exempt=jnp.concatenate([exempt_first, jnp.ones(second.k_segments.shape, bool)], axis=1),
    )


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


class HeadMajorKV(NamedTuple):
    """Keys and values of one layer, head-major: each [B, K, S, H].

    The layout of decoding caches: the attention dots of a decode step contract over H
    (logits) and S (values) with B and K as batch axes, so they read this layout as it is,
    where [B, S, K, H] would be transposed (copied) in every layer at every step.
    """

    k: jax.Array
    v: jax.Array


def to_head_major(kv: KV | HeadMajorKV) -> HeadMajorKV:
    """[B, S, K, H] keys / values -> [B, K, S, H] (unchanged when already head-major)."""
    if isinstance(kv, HeadMajorKV):
        return kv
    return HeadMajorKV(jnp.swapaxes(kv.k, 1, 2), jnp.swapaxes(kv.v, 1, 2))


def to_sequence_major(kv: KV | HeadMajorKV) -> KV:
    """[B, K, S, H] keys / values -> [B, S, K, H] (unchanged when already sequence-major)."""
    if isinstance(kv, HeadMajorKV):
        return KV(jnp.swapaxes(kv.k, 1, 2), jnp.swapaxes(kv.v, 1, 2))
    return kv


def concat_kv(first: KV | HeadMajorKV, second: KV | HeadMajorKV) -> KV | HeadMajorKV:
    """Keys / values of `first` followed by those of `second`, in `first`'s layout and dtype."""
    if isinstance(first, HeadMajorKV):
        second, axis = to_head_major(second), 2
    else:
        second, axis = to_sequence_major(second), 1
    return type(first)(
        jnp.concatenate([first.k, second.k.astype(first.k.dtype)], axis=axis),
        jnp.concatenate([first.v, second.v.astype(first.v.dtype)], axis=axis),
    )


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
        attention_impl: str = "auto",
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
        self.attention_impl = attention_impl

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """[B, T, D], [B, T] -> scaled, rotated queries [B, T, N, H]."""
        q = layers.token_einsum("btd,ndh->btnh", x, self.q[...].astype(x.dtype))
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
        k = layers.token_einsum("bsd,kdh->bskh", x, self.k[...].astype(x.dtype))
        v = layers.token_einsum("bsd,kdh->bskh", x, self.v[...].astype(x.dtype))
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rope_base is not None:
            k = apply_rope(k, positions, self.rope_base, self.rope_scale)
        axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
        return KV(sharding.constrain(k, axes), sharding.constrain(v, axes))

    def attend(self, q: jax.Array, kv: KV | HeadMajorKV, mask: jax.Array | MaskSpec) -> jax.Array:
        """Queries [B, T, N, H] over keys/values [B, S, K, H] (or head-major) -> [B, T, D].

        mask: a `MaskSpec`, or its [B, T, S] bool values (always the materialising path). The
        implementation follows `blockwise.select_impl` (module docstring of `nn.blockwise`).
        """
        b, t, n, h = q.shape
        groups = n // self.num_kv_heads
        head_major = isinstance(kv, HeadMajorKV)
        impl = "xla"
        if isinstance(mask, MaskSpec):
            impl = blockwise.select_impl(
                self.attention_impl,
                q_len=t,
                kv_len=kv.k.shape[2 if head_major else 1],
                soft_cap=self.attn_logits_soft_cap,
                dtype=q.dtype,
                head_dim=h,
            )
        if impl != "xla":
            kv = to_sequence_major(kv)
        if impl == "blockwise":
            q5 = q.reshape(b, t, self.num_kv_heads, groups, h)
            out = blockwise.attention(q5, kv.k, kv.v, mask, soft_cap=self.attn_logits_soft_cap)
            out = out.reshape(b, t, n, h)
        elif impl == "cudnn":
            out = jax.nn.dot_product_attention(
                q,
                kv.k.astype(q.dtype),
                kv.v.astype(q.dtype),
                mask=mask.dense()[:, None],
                scale=1.0,
                implementation="cudnn",
            ).astype(kv.v.dtype)
        else:
            if isinstance(mask, MaskSpec):
                mask = mask.dense()
            q = q.reshape(b, t, self.num_kv_heads, groups, h)
            kv_spec = "bksh" if head_major else "bskh"
            logits = jnp.einsum(f"btkgh,{kv_spec}->bkgts", q, kv.k)
            logits = soft_cap(logits, self.attn_logits_soft_cap)
            logits = jnp.where(mask[:, None, None], logits.astype(jnp.float32), _MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(kv.v.dtype)
            out = jnp.einsum(f"bkgts,{kv_spec}->btkgh", probs, kv.v).reshape(b, t, n, h)
        return layers.token_einsum("btnh,nhd->btd", out, self.o[...].astype(out.dtype))
