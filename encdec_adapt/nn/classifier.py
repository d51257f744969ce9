"""Encoder-only sequence classifier (the Gemma Encoder recipe): bidirectional Gemma encoder,
pooling over the non-padding tokens, and a linear head.

Parameter paths: `encoder/...` exactly as in `EncoderDecoder` (so an adapted encoder-decoder's
encoder, or a decoder-only checkpoint, warm-starts it by copy), `head/kernel` [D, C] and
`head/bias` [C].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.nn import layers
from encdec_adapt.nn.config import ClassifierConfig, Pooling
from encdec_adapt.nn.encdec import Encoder
from encdec_adapt.storage import params_io

PyTree = Any


def pool(hidden: jax.Array, segment_ids: jax.Array, pooling: Pooling) -> jax.Array:
    """[B, S, D] token states, [B, S] segment ids (0 = padding) -> [B, D] one vector per row.

    mean: average over non-padding tokens (in float32); first / last: the first / last
    non-padding token, whatever side the padding is on. A row of padding only pools to zeros.
    """
    valid = segment_ids != 0
    if pooling == Pooling.MEAN:
        w = valid.astype(jnp.float32)[..., None]
        total = jnp.sum(hidden.astype(jnp.float32) * w, axis=1)
        return (total / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(hidden.dtype)
    idx = jnp.arange(hidden.shape[1])[None, :]
    if pooling == Pooling.FIRST:
        pick = jnp.min(jnp.where(valid, idx, hidden.shape[1] - 1), axis=1)
    else:
        pick = jnp.max(jnp.where(valid, idx, 0), axis=1)
    out = jnp.take_along_axis(hidden, pick[:, None, None], axis=1)[:, 0]
    return jnp.where(jnp.any(valid, axis=1)[:, None], out, 0).astype(hidden.dtype)


class ClassifierHead(nnx.Module):
    """Linear layer with bias, in float32: [B, D] -> [B, C]."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        d, c, pd = cfg.encoder.embed_dim, cfg.num_classes, cfg.encoder.weight_dtype
        self.kernel = layers.param(rngs, layers.fan_in_init(0), (d, c), ("embed", None), pd)
        self.bias = layers.param(rngs, jax.nn.initializers.zeros, (c,), (None,), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class Classifier(nnx.Module):
    """tokens [B, S] -> class logits [B, C]."""

    def __init__(self, cfg: ClassifierConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg.encoder, rngs=rngs)
        self.head = ClassifierHead(cfg, rngs=rngs)

    def pooled(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """[B, S] tokens -> [B, D] pooled encoder states (segment ids default to tokens != 0)."""
        encoded = self.encoder(tokens, segment_ids=segment_ids, positions=positions, rng=rng)
        return pool(encoded.hidden, encoded.segment_ids, self.config.pooling)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """[B, S] tokens -> [B, C] float32 logits. `rng` enables dropout (encoder and head)."""
        enc_rng, head_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
        x = self.pooled(tokens, segment_ids=segment_ids, positions=positions, rng=enc_rng)
        return self.head(layers.dropout(x, self.config.dropout_rate, head_rng))


def encoder_source(source: PyTree, source_type: str | None = None) -> dict:
    """The {embedder, stack} tree of a Gemma encoder inside a params checkpoint's tree.

    source_type (model.json): "decoder_only" (the stack is reused; attention becomes
    bidirectional because the target is an encoder; `lm_head`, if any, is dropped),
    "encoder_decoder" or "classifier" (their `encoder`), or None to tell from the keys.
    """
    if source_type in ("encoder_decoder", "classifier") or (
        source_type is None and "encoder" in source
    ):
        source = source["encoder"]
    missing = {"embedder", "stack"} - set(source)
    if missing:
        raise params_io.CheckpointError(
            f"a {source_type or 'params'} checkpoint without {sorted(missing)} cannot initialise "
            f"an encoder (its top-level keys: {sorted(source)})"
        )
    return {"embedder": source["embedder"], "stack": source["stack"]}


def warm_start_classifier(
    cfg: ClassifierConfig,
    encoder_params: PyTree,
    *,
    seed: int = 0,
    source_type: str | None = None,
    fresh: PyTree | None = None,
) -> dict:
    """Classifier params: the encoder copied from `encoder_params`, a fresh head.

    `encoder_params` is an EncoderDecoder tree (or its `encoder` subtree), or a decoder-only tree
    (its `lm_head`, if any, is dropped); see `encoder_source`. Names and shapes are checked
    against `cfg.encoder`. `fresh`: initialised parameters whose head is kept (default: a new
    head from `seed`).
    """
    encoder = encoder_source(encoder_params, source_type)
    target = params_io.model_params(nnx.eval_shape(lambda: Encoder(cfg.encoder, rngs=nnx.Rngs(0))))
    params_io.check_compatible(target, encoder, "classifier encoder source")
    if fresh is None:
        head = params_io.model_params(ClassifierHead(cfg, rngs=nnx.Rngs(seed)))
    else:
        head = fresh["head"]
    return {"encoder": encoder, "head": head}
