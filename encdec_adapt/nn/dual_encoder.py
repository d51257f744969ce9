"""Dual-encoder embedding towers (Gemini Embedding / EmbeddingGemma / Sentence-T5 style).

A tower is a bidirectional Gemma encoder (`encdec.Encoder`), a pooling over its non-padding token
states, and a bias-free projection; embeddings are L2-normalised by the caller or by `embed`.
Towers are shared (SDE), separate (ADE), or separate with one shared projection (ADE-SPL).

Parameter paths (`params_io.flatten` form):
  query_tower/{embedder,stack}/...     the encoder, laid out as a DecoderOnly tree
  doc_tower/{embedder,stack}/...       only with separate towers
  query_projection/layers/{i}/kernel   [D_in, D_out]; doc_projection/... only with "separate"
  pooler/query                         [D] (attention pooling only)
  pooler/kernel, pooler/bias           [D], [] (term pooling only)

Lexical pooling (SPLADE-style) scores every vocabulary entry at every token with the tower's own
tied embedding, w[t, v] = log(1 + relu(h_t . E_v)), and max-pools over tokens: a [V]-wide vector
whose coordinates are terms. It adds no parameters and reuses the pretrained LM head, so a
warm-started tower matches identifiers the way a lexical ranker does and learns term expansion.
Term pooling (uniCOIL-style) keeps only the text's own tokens: each token gets a contextual
weight relu(h_t . u + b) (u starts at 0, b at 1: an untrained tower is a bag of words) and the
[V]-wide vector holds each vocabulary id's largest weight: exact matching with learned weights.
  log_temperature                      [] (learned temperature only)
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.errors import ConfigError
from encdec_adapt.nn import layers
from encdec_adapt.nn.classifier import encoder_source, pool
from encdec_adapt.nn.config import GemmaConfig, Pooling
from encdec_adapt.nn.encdec import Encoder
from encdec_adapt.storage import params_io

PyTree = Any


class TowerSharing(enum.StrEnum):
    SHARED = "shared"  # SDE: one encoder and projection for queries and documents
    SEPARATE = "separate"  # ADE: two encoders, two projections
    SEPARATE_SHARED_PROJECTION = "separate_shared_projection"  # ADE-SPL


POOLINGS = (*(str(p) for p in Pooling), "attention", "lexical", "terms")
#: Poolings whose vectors are vocabulary-wide ([V]) rather than [D].
VOCABULARY_POOLINGS = ("lexical", "terms")


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """Architecture of a pair of embedding towers.

    Attributes:
      tower: the Gemma encoder of each tower (attention made bidirectional).
      sharing: "shared", "separate" or "separate_shared_projection".
      pooling: "mean", "first", "last", "attention" (a learned query scores the tokens) or
        "lexical" (max over tokens of log(1 + relu(tied vocabulary logits)): [V]-wide vectors)
        or "terms" (each token's own id weighted by relu(h . u + b): [V]-wide, exact match).
      projection_dims: output widths of the bias-free projection layers, e.g. (768,) or
        (3072, 768); () keeps the pooled width.
      learn_temperature: adds a learned log-temperature parameter, initialised at
        log(init_temperature).
      init_temperature: tau at initialisation when learned.
    """

    tower: GemmaConfig = dataclasses.field(default_factory=GemmaConfig)
    sharing: TowerSharing = TowerSharing.SHARED
    pooling: str = "mean"
    projection_dims: tuple[int, ...] = ()
    learn_temperature: bool = False
    init_temperature: float = 0.05

    def __post_init__(self):
        try:
            object.__setattr__(self, "sharing", TowerSharing(self.sharing))
        except ValueError:
            raise ConfigError(
                f"DualEncoderConfig.sharing={self.sharing!r}; choose from "
                f"{[str(s) for s in TowerSharing]}"
            ) from None
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"DualEncoderConfig.pooling={self.pooling!r} is not a pooling; choose from "
                f"{list(POOLINGS)}"
            )
        object.__setattr__(self, "projection_dims", tuple(self.projection_dims))

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector, before the projection."""
        if self.pooling in VOCABULARY_POOLINGS:
            return self.tower.vocab_size
        return self.tower.embed_dim

    @property
    def embedding_dim(self) -> int:
        return self.projection_dims[-1] if self.projection_dims else self.pooled_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tower"] = self.tower.to_dict()
        d["sharing"] = str(self.sharing)
        d["projection_dims"] = list(self.projection_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DualEncoderConfig:
        d = dict(d)
        d["tower"] = GemmaConfig.from_dict(d["tower"])
        return cls(**d)


class Projection(nnx.Module):
    """Bias-free linear layers [B, D] -> [B, dims[-1]] (no activation, as EmbeddingGemma)."""

    def __init__(self, in_dim: int, dims: tuple[int, ...], *, param_dtype, rngs: nnx.Rngs):
        shapes = zip((in_dim, *dims[:-1]), dims)
        self.layers = nnx.List(
            [_Dense(a, b, param_dtype=param_dtype, rngs=rngs) for a, b in shapes]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class _Dense(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.kernel = layers.param(
            rngs, layers.fan_in_init(0), (in_dim, out_dim), ("embed", None), param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...].astype(x.dtype)


class AttentionPooler(nnx.Module):
    """A learned query scores every non-padding token; the pooled vector is the softmax-weighted
    sum of token states. [B, S, D], [B, S] -> [B, D]."""

    def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.query = layers.param(
            rngs, jax.nn.initializers.normal(dim**-0.5), (dim,), ("embed",), param_dtype
        )

    def __call__(self, hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
        h = hidden.astype(jnp.float32)
        scores = h @ self.query[...].astype(jnp.float32) / jnp.sqrt(h.shape[-1])
        scores = jnp.where(segment_ids != 0, scores, -1e9)
        weights = jax.nn.softmax(scores, axis=-1) * jnp.any(segment_ids != 0, -1, keepdims=True)
        return jnp.einsum("bs,bsd->bd", weights, h).astype(hidden.dtype)


def lexical_pool(hidden: jax.Array, segment_ids: jax.Array, embedding: jax.Array) -> jax.Array:
    """[B, S, D] token states, [B, S] segment ids, [V, D] tied embedding -> [B, V] term weights.

    max over non-padding tokens of log(1 + relu(logits)), in float32; weights are >= 0, so a row
    of padding only pools to zeros.
    """
    logits = jnp.einsum("bsd,vd->bsv", hidden.astype(jnp.float32), embedding.astype(jnp.float32))
    weights = jnp.log1p(jax.nn.relu(logits)) * (segment_ids != 0)[..., None]
    return jnp.max(weights, axis=1)


class TermPooler(nnx.Module):
    """Contextual weights of the text's own tokens: [B, S, D], [B, S] ids -> [B, V].

    w_t = relu(h_t . kernel + bias); out[b, v] = max of w_t over the tokens t with id v (0 for
    ids absent from the row, and for padding).
    """

    def __init__(self, dim: int, vocab_size: int, *, param_dtype, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        # kernel 0, bias 1: every token starts at weight 1 (a binary bag of words), and the
        # gradient reaches the kernel from the first step because relu is active everywhere.
        self.kernel = layers.param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",), param_dtype)
        self.bias = nnx.Param(jnp.ones((), param_dtype))

    def __call__(self, hidden: jax.Array, tokens: jax.Array, segment_ids: jax.Array):
        h = hidden.astype(jnp.float32)
        w = jax.nn.relu(h @ self.kernel[...].astype(jnp.float32) + self.bias[...])
        w = w * (segment_ids != 0)
        rows = jnp.arange(tokens.shape[0])[:, None]
        return jnp.zeros((tokens.shape[0], self.vocab_size), jnp.float32).at[rows, tokens].max(w)


class DualEncoder(nnx.Module):
    """Query and document towers: tokens [B, S] -> embeddings [B, E]."""

    def __init__(self, cfg: DualEncoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pd = cfg.tower.weight_dtype
        self.query_tower = Encoder(cfg.tower, rngs=rngs)
        separate = cfg.sharing != TowerSharing.SHARED
        self.doc_tower = Encoder(cfg.tower, rngs=rngs) if separate else None
        if cfg.projection_dims:
            self.query_projection = Projection(
                cfg.pooled_dim, cfg.projection_dims, param_dtype=pd, rngs=rngs
            )
            own = cfg.sharing == TowerSharing.SEPARATE
            self.doc_projection = (
                Projection(cfg.pooled_dim, cfg.projection_dims, param_dtype=pd, rngs=rngs)
                if own
                else None
            )
        else:
            self.query_projection = self.doc_projection = None
        if cfg.pooling == "attention":
            self.pooler = AttentionPooler(cfg.tower.embed_dim, param_dtype=pd, rngs=rngs)
        elif cfg.pooling == "terms":
            self.pooler = TermPooler(
                cfg.tower.embed_dim, cfg.tower.vocab_size, param_dtype=pd, rngs=rngs
            )
        else:
            self.pooler = None
        if cfg.learn_temperature:
            self.log_temperature = nnx.Param(jnp.log(jnp.asarray(cfg.init_temperature)))

    def temperature(self) -> jax.Array | None:
        """The learned tau, or None when the loss config's fixed temperature applies."""
        return jnp.exp(self.log_temperature[...]) if self.config.learn_temperature else None

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        side: str = "query",
        normalize: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """[B, S] tokens of queries (side="query") or documents (side="document") -> [B, E].

        segment_ids default to tokens != 0 (padding id 0). Embeddings are float32 and, with
        `normalize`, unit length (a row of padding only embeds to zeros).
        """
        if side not in ("query", "document"):
            raise ValueError(f"side={side!r}; choose 'query' or 'document'")
        is_doc = side == "document"
        tower = self.doc_tower if is_doc and self.doc_tower is not None else self.query_tower
        projection = (
            self.doc_projection
            if is_doc and self.doc_projection is not None
            else self.query_projection
        )
        encoded = tower(tokens, segment_ids=segment_ids, rng=rng)
        if isinstance(self.pooler, TermPooler):
            x = self.pooler(encoded.hidden, tokens, encoded.segment_ids)
        elif self.pooler is not None:
            x = self.pooler(encoded.hidden, encoded.segment_ids)
        elif self.config.pooling == "lexical":
            x = lexical_pool(encoded.hidden, encoded.segment_ids, tower.embedder.embedding[...])
        else:
            x = pool(encoded.hidden, encoded.segment_ids, Pooling(self.config.pooling))
        x = x.astype(jnp.float32)
        if projection is not None:
            x = projection(x)
        if normalize:
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
        return x


def warm_start_dual_encoder(
    cfg: DualEncoderConfig,
    source: PyTree,
    *,
    seed: int = 0,
    source_type: str | None = None,
    fresh: PyTree | None = None,
) -> dict:
    """DualEncoder params with every tower copied from `source`, the rest freshly initialised.

    `source` is a decoder-only params tree (attention becomes bidirectional simply because the
    towers are encoders; `lm_head`, if any, is dropped) or an adapted encoder-decoder's tree (or
    its `encoder` subtree); see `encoder_source`. Names and shapes are checked against
    `cfg.tower`. `fresh`: the initialised parameters to keep for projections, pooler and
    temperature (default: a new DualEncoder from `seed`).
    """
    encoder = encoder_source(source, source_type)
    if fresh is None:
        fresh = params_io.model_params(DualEncoder(cfg, rngs=nnx.Rngs(seed)))
    params_io.check_compatible(fresh["query_tower"], encoder, "dual-encoder tower source")
    out = dict(fresh)
    out["query_tower"] = encoder
    if "doc_tower" in fresh:
        out["doc_tower"] = jax.tree.map(lambda x: x, encoder)
    return out
