"""Small Gemma building blocks: parameters with logical axes, RMSNorm, embedder, GeGLU feed-forward.

Shape letters used in comments throughout the package:
  B batch, T query length, S key length, D embed_dim, F hidden_dim, N query heads,
  K key/value heads, G = N // K query heads per kv head, H head_dim, V vocab_size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.parallel import sharding

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
) -> nnx.Param:
    """A parameter annotated with logical axis names (mapped to mesh axes by `sharding`)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    # Sharding is applied explicitly by `sharding.create_sharded`, not eagerly per variable.
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), sharding_names=tuple(axes), eager_sharding=False
    )


def fan_in_init(in_axes: int | Sequence[int] = -2) -> Initializer:
    """Truncated normal with variance 1 / fan_in, fan_in = the product of the `in_axes` sizes
    (the axes contracted with the input); every other axis is an output axis."""
    axes = (in_axes,) if isinstance(in_axes, int) else tuple(in_axes)

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype) -> jax.Array:
        fan_in = math.prod(shape[a] for a in axes)
        # 0.8796... is the std of a standard normal truncated to [-2, 2].
        std = fan_in**-0.5 / 0.87962566103423978
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)

    return init


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when `rng` is None (evaluation) or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32 (as HF Gemma)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, jax.nn.initializers.zeros, (dim,), ("norm",), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., dim] -> [..., dim] in x.dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def token_einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a weight projection of [B, T, ...] activations, with B and T
    merged into one token axis first (spec e.g. "btd,df->btf"; the output starts with the
    same two axes). The numbers are the same. The weight's gradient contracts over the tokens:
    over two axes (B and T) XLA:CPU leaves its XNNPACK matmuls and transposes the activations'
    gradient first (a quarter of bench_train's step); over one it is a plain matmul."""
    lhs, rest = spec.split(",")
    w_spec, out = rest.split("->")
    if lhs[:2] != out[:2] or "m" in spec:
        raise ValueError(f"token_einsum: {spec!r} does not map the two token axes through")
    b, t = x.shape[:2]
    y = jnp.einsum(f"m{lhs[2:]},{w_spec}->m{out[2:]}", x.reshape(b * t, *x.shape[2:]), w)
    return y.reshape(b, t, *y.shape[1:])


def lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows of a [V, D] table: [B, T] int -> [B, T, D] (`jnp.take`).

    Its gradient is the usual scatter-add into a zero [V, D] table, but that zero table depends
    on the incoming cotangent: XLA otherwise allocates it at the start of the training step and
    keeps it through the forward pass (0.6 GiB per 262k x 640 embedding).
    """
    return _lookup((table.shape, jnp.dtype(table.dtype).name), table, tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lookup(spec, table, tokens):
    return jnp.take(table, tokens, axis=0)


def _lookup_fwd(spec, table, tokens):
    return _lookup(spec, table, tokens), tokens


def _lookup_bwd(spec, tokens, g):
    shape, dtype = spec
    g = g.astype(dtype)
    zeros = jnp.zeros(shape, dtype) + jnp.zeros((), dtype) * g.reshape(-1)[0]
    # Out-of-range ids get no gradient, as with `jnp.take`'s own.
    return zeros.at[tokens.reshape(-1)].add(g.reshape(-1, shape[1]), mode="drop"), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


class Embedder(nnx.Module):
    """Token embedding scaled by sqrt(D); also projects hidden states back to vocabulary logits."""

    def __init__(self, vocab_size: int, embed_dim: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        # std 1/sqrt(D): the sqrt(D)-scaled input embeddings have unit variance, and tied
        # output logits start with unit variance too.
        init = jax.nn.initializers.normal(stddev=embed_dim**-0.5)
        self.embedding = param(rngs, init, (vocab_size, embed_dim), ("vocab", "embed"), param_dtype)

    def encode(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        """[B, T] int -> [B, T, D]."""
        x = lookup(self.embedding[...], tokens).astype(dtype)
        # The scale is rounded to the compute dtype before multiplying, as HF does.
        return x * jnp.asarray(self.embedding.shape[-1] ** 0.5, dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, V] logits."""
        return token_einsum("btd,vd->btv", x, self.embedding[...].astype(x.dtype))


class FeedForward(nnx.Module):
    """GeGLU: down(gelu_tanh(x @ gate) * (x @ up))."""

    def __init__(self, embed_dim: int, hidden_dim: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = fan_in_init()
        self.gate = param(rngs, init, (embed_dim, hidden_dim), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, init, (embed_dim, hidden_dim), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, init, (hidden_dim, embed_dim), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        dt = x.dtype
        gate = token_einsum("btd,df->btf", x, self.gate[...].astype(dt))
        up = token_einsum("btd,df->btf", x, self.up[...].astype(dt))
        h = jax.nn.gelu(gate, approximate=True) * up
        h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return token_einsum("btf,fd->btd", h, self.down[...].astype(dt))
