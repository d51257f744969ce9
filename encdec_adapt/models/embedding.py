"""Model API (models.py) of embedding towers and encoder classifiers, so that the generic trainer
trains them: `DualEncoderModel` (contrastive loss over the global batch) and `ClassifierModel`.

Both report metric *sums* like the token models: loss_sum, weight and correct, where the weight
is the number of rows (queries / examples) instead of target tokens, so `models.summarize`,
logging and evaluation work unchanged ("accuracy" is in-batch top-1 retrieval of the positive for
the dual encoder, classification accuracy for the classifier). Rows whose tokens are all
padding (an evaluation loop pads its last batch with them) count for nothing: they are neither
examples nor in-batch candidates.

Warm starts (`train.warm_start_from`) from a decoder-only or an adapted encoder-decoder params
checkpoint go through `warm_start_params`: the towers / the encoder are copied from the source
(attention becomes bidirectional), projections, pooler, temperature and head stay fresh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encdec_adapt.errors import ConfigError
from encdec_adapt.models.base import BaseModel, Batch, Metrics
from encdec_adapt.models.contrastive import (
    ContrastiveConfig,
    contrastive_loss,
    l2_normalize,
    sharded_contrastive_loss,
)
from encdec_adapt.nn.classifier import Classifier, warm_start_classifier
from encdec_adapt.nn.config import ClassifierConfig
from encdec_adapt.nn.dual_encoder import DualEncoder, DualEncoderConfig, warm_start_dual_encoder
from encdec_adapt.parallel import sharding

PyTree = Any

#: model_type (model.json) of the models here
DUAL_ENCODER = "dual_encoder"
CLASSIFIER = "classifier"
#: checkpoint model types whose Gemma stack can initialise an encoder
ENCODER_SOURCES = ("decoder_only", "encoder_decoder", CLASSIFIER)


def encoder_flops_per_token(c, length: int) -> float:
    """Training FLOPs per token of a bidirectional Gemma encoder `c` on `length`-token rows:
    6 x matmul parameters + attention scores and values (no vocabulary logits)."""
    attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    ffw = 3 * c.embed_dim * c.hidden_dim
    return c.num_layers * (6 * (attn + ffw) + 12 * c.num_heads * c.head_dim * length)


def batch_axes(rows: int, mesh: Any, rules: Any) -> tuple[Any, tuple[str, ...]] | None:
    """(mesh, mesh axes) that shard `rows` batch rows on `mesh` with `rules`, or None when the
    batch is not split (no mesh, one batch shard, or rows not divisible)."""
    if mesh is None:
        return None
    spec = sharding.logical_to_spec(("activation_batch",), (rows,), mesh, rules)[0]
    if spec is None:
        return None
    return mesh, (spec,) if isinstance(spec, str) else tuple(spec)


def _valid_rows(tokens: jax.Array) -> jax.Array:
    """[B, L] tokens -> [B] bool: False for rows of padding only."""
    return jnp.any(tokens != 0, axis=1)


def _key_data(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _count_nonpad(batch: dict, names: tuple[str, ...]) -> int:
    return int(sum(np.count_nonzero(batch[n]) for n in names if n in batch))


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class DualEncoderModel(BaseModel):
    """Query / document towers (`dual_encoder.DualEncoder`) trained with `contrastive.py`.

    Reads query_tokens [B, Lq], positive_tokens [B, Lp] and, with hard negatives,
    negative_tokens [B, N, Lp] (`DataConfig.feature_converter="dual_encoder"`). The loss sees
    the whole global batch as negatives; when the batch is split over devices it runs as
    `sharded_contrastive_loss` (each device holds a [B / devices, B] similarity block).

    Attributes:
      config: the towers' DualEncoderConfig (its `tower` usually %MODEL_CONFIG).
      loss: the ContrastiveConfig; its temperature applies unless the towers learn one.
      grad_cache_chunk: > 0 embeds the batch in chunks of this many rows without keeping
        activations, takes the loss gradient with respect to the embeddings, then re-embeds
        chunk by chunk to backpropagate (GradCache): memory of one chunk, gradients of the full
        batch. 0: one plain forward / backward.
      mesh: (mesh, rules) the loss's batch is split over; set by the trainer (`on_mesh`), not
        in gin. None: one unsplit batch (`contrastive_loss`).
    """

    config: DualEncoderConfig = None
    loss: ContrastiveConfig = ContrastiveConfig()  # noqa: RUF009 - frozen
    grad_cache_chunk: int = 0
    mesh: tuple[Any, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    model_type = DUAL_ENCODER
    features = ("query_tokens", "positive_tokens", "negative_tokens")
    can_embed = True
    can_score = False

    def __post_init__(self):
        if not isinstance(self.config, DualEncoderConfig):
            raise ConfigError(
                f"DualEncoderModel.config must be a DualEncoderConfig (e.g. "
                f"@DualEncoderConfig() with DualEncoderConfig.tower = %MODEL_CONFIG), got "
                f"{self.config!r}"
            )
        if not isinstance(self.loss, ContrastiveConfig):
            raise ConfigError(
                f"DualEncoderModel.loss must be a ContrastiveConfig, got {self.loss!r}"
            )
        chunk = self.grad_cache_chunk
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ConfigError(f"DualEncoderModel.grad_cache_chunk={chunk!r} must be an int >= 0")

    def build(self, rngs: nnx.Rngs) -> DualEncoder:
        return DualEncoder(self.config, rngs=rngs)

    def on_mesh(self, mesh, rules) -> DualEncoderModel:
        """A copy whose loss sees the global batch split over `mesh` (the sharded loss)."""
        return dataclasses.replace(self, mesh=(mesh, rules))

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def logits(self, module, batch, rng):
        raise NotImplementedError("DualEncoderModel has embeddings, not logits; use embed()")

    # ------------------------------------------------------------------ embeddings

    def embed(
        self,
        module: DualEncoder,
        tokens: jax.Array,
        side: str = "query",
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """[B, L] tokens (0 = padding) of queries or documents -> [B, E] float32, unit length."""
        return module(tokens, side=side, normalize=True, rng=rng)

    def _embed_batch(self, module: DualEncoder, batch: Batch, rng: jax.Array | None):
        """(queries [B, E], positives [B, E], negatives [B, N, E] or None)."""
        rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        q = self.embed(module, batch["query_tokens"], "query", rngs[0])
        p = self.embed(module, batch["positive_tokens"], "document", rngs[1])
        n = None
        if "negative_tokens" in batch:
            neg = batch["negative_tokens"]
            b, k, length = neg.shape
            n = self.embed(module, neg.reshape(b * k, length), "document", rngs[2])
            n = n.reshape(b, k, -1)
        return q, p, n

    def _loss(self, q, p, n, temperature, valid) -> tuple[jax.Array, dict]:
        """Mean loss over the valid rows of the global batch (contrastive + spread-out)."""
        axes = batch_axes(q.shape[0], *(self.mesh or (None, None)))
        fn = contrastive_loss if axes is None else sharded_contrastive_loss(*axes)
        return fn(q, p, self.loss, negatives=n, temperature=temperature, valid=valid)

    @staticmethod
    def _correct(q, p, n, valid) -> jax.Array:
        """Valid queries whose positive scores above every other valid in-batch positive and
        the query's own hard negatives (full width)."""
        q, p = l2_normalize(q), l2_normalize(p)
        s = q @ p.T  # [B, B]
        pos = jnp.diagonal(s)
        others = jnp.where(jnp.eye(s.shape[0], dtype=bool) | ~valid[None, :], -jnp.inf, s)
        best = jnp.max(others, axis=1)
        if n is not None:
            best = jnp.maximum(best, jnp.max(jnp.einsum("bd,bkd->bk", q, l2_normalize(n)), 1))
        return jnp.sum(((pos > best) & valid).astype(jnp.float32))

    def _metrics(self, loss, parts, q, p, n, valid) -> Metrics:
        rows = jnp.sum(valid.astype(jnp.float32))
        return {
            "loss_sum": loss * rows,
            "contrastive_sum": parts["contrastive_loss"] * rows,
            "weight": rows,
            "correct": self._correct(q, p, n, valid),
        }

    # ------------------------------------------------------------------ model API

    def loss_weight(self, batch: Batch) -> jax.Array:
        """Queries in the batch: the loss is a mean over queries."""
        return jnp.sum(_valid_rows(batch["query_tokens"]).astype(jnp.float32))

    def count_tokens(self, batch: dict) -> int:
        """Non-padding tokens of queries, positives and negatives."""
        return _count_nonpad(batch, ("query_tokens", "positive_tokens", "negative_tokens"))

    def loss_fn(self, module, batch, rng, normalizer=None):
        """(loss * B / normalizer, metric sums); with the default normalizer B this is the mean
        contrastive loss of the batch. With grad accumulation each micro-batch is its own set of
        negatives; use `grad_cache_chunk` to keep the whole batch as negatives."""
        if self.grad_cache_chunk:
            return self._grad_cache_loss(module, batch, rng, normalizer)
        q, p, n = self._embed_batch(module, batch, rng)
        valid = _valid_rows(batch["query_tokens"])
        loss, parts = self._loss(q, p, n, module.temperature(), valid)
        metrics = self._metrics(loss, parts, q, p, n, valid)
        if normalizer is None:
            normalizer = metrics["weight"]
        return metrics["loss_sum"] / normalizer, metrics

    def eval_fn(self, module, batch) -> Metrics:
        q, p, n = self._embed_batch(module, batch, None)
        valid = _valid_rows(batch["query_tokens"])
        loss, parts = self._loss(q, p, n, module.temperature(), valid)
        return self._metrics(loss, parts, q, p, n, valid)

    def warm_start_params(self, source, source_type, fresh):
        """Towers from a decoder-only / encoder-decoder / classifier checkpoint."""
        if source_type not in ENCODER_SOURCES:
            return None
        return warm_start_dual_encoder(self.config, source, source_type=source_type, fresh=fresh)

    def flops_per_token(self, lengths: dict[str, int]) -> float:
        """Encoder FLOPs per embedded token (+ the [D, V] scores of lexical pooling)."""
        c = self.config.tower
        t = max(lengths.get("query", 0), lengths.get("positive", 0))
        lexical = 6 * c.embed_dim * c.vocab_size if self.config.pooling == "lexical" else 0
        return encoder_flops_per_token(c, t) + lexical

    # ------------------------------------------------------------------ gradient caching

    def _grad_cache_loss(self, module, batch, rng, normalizer):
        """GradCache: the loss of the full batch with the activation memory of one chunk.

        1. embed every chunk without gradients (stop_gradient; activations are not kept);
        2. the loss and its gradient with respect to the embeddings (and the temperature);
        3. re-embed each chunk under `jax.vjp` and pull the cached embedding gradients back
           to the parameters, accumulating them.
        The returned scalar carries exactly these parameter gradients through a
        `jax.custom_vjp`, so `jax.grad` of loss_fn equals the plain gradient.
        """
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        chunk = self.grad_cache_chunk
        feats = {k: v for k, v in batch.items() if k in self.features}
        rows = feats["query_tokens"].shape[0]
        if rows % chunk:
            raise ConfigError(
                f"DualEncoderModel.grad_cache_chunk={chunk} does not divide the batch of {rows} "
                f"rows"
            )
        model = self
        valid = _valid_rows(feats["query_tokens"])

        def embed_all(p, f, r):
            return model._embed_batch(nnx.merge(graphdef, p, rest), f, r)

        def chunked(f):  # [B, ...] -> [B / chunk, chunk, ...] contiguous chunks
            return jax.tree.map(lambda x: x.reshape(rows // chunk, chunk, *x.shape[1:]), f)

        def chunk_rng(r, i):
            return None if r is None else jax.random.fold_in(jax.random.wrap_key_data(r), i)

        def embeddings(p, f, r):
            def one(_, xs):
                i, fc = xs
                return None, embed_all(p, fc, chunk_rng(r, i))

            _, out = jax.lax.scan(one, None, (jnp.arange(rows // chunk), chunked(f)))
            return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)

        def loss_of(p, embs):
            q, pos, n = embs
            tau = nnx.merge(graphdef, p, rest).temperature()
            loss, parts = model._loss(q, pos, n, tau, valid)
            return loss, (parts, q, pos, n)

        @jax.custom_vjp
        def total(p, f, r):
            embs = jax.lax.stop_gradient(embeddings(p, f, r))
            return loss_of(p, embs)

        def total_fwd(p, f, r):
            embs = embeddings(jax.lax.stop_gradient(p), f, r)
            (loss, aux), (g_p, g_embs) = jax.value_and_grad(loss_of, (0, 1), has_aux=True)(p, embs)
            return (loss, aux), (p, f, r, g_p, g_embs)

        def total_bwd(res, cotangents):
            p, f, r, g_p, g_embs = res
            scale = cotangents[0]  # d(output) / d(loss); aux carries no gradient

            def one(acc, xs):
                i, fc, gc = xs
                _, pull = jax.vjp(lambda pp: embed_all(pp, fc, chunk_rng(r, i)), p)
                (g,) = pull(gc)
                return jax.tree.map(jnp.add, acc, g), None

            acc = jax.tree.map(lambda x: x * scale, g_p)
            g_chunks = jax.tree.map(lambda g: g * scale, chunked_embs(g_embs))
            acc, _ = jax.lax.scan(one, acc, (jnp.arange(rows // chunk), chunked(f), g_chunks))
            zeros_f = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), f)
            zeros_r = None if r is None else np.zeros(r.shape, jax.dtypes.float0)
            return acc, zeros_f, zeros_r

        def chunked_embs(embs):
            return tuple(
                None if e is None else e.reshape(rows // chunk, chunk, *e.shape[1:]) for e in embs
            )

        total.defvjp(total_fwd, total_bwd)
        # raw key data: a typed key has no float0 cotangent to return
        loss, (parts, q, pos, n) = total(params, feats, None if rng is None else _key_data(rng))
        metrics = self._metrics(loss, parts, q, pos, n, valid)
        if normalizer is None:
            normalizer = metrics["weight"]
        return metrics["loss_sum"] / normalizer, metrics


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class ClassifierModel(BaseModel):
    """An encoder classifier (`classifier.Classifier`: bidirectional Gemma encoder, pooling,
    linear head) trained with softmax cross-entropy.

    Reads encoder_input_tokens [B, L] and labels [B] (`DataConfig.feature_converter=
    "classification"`). Metric sums: loss_sum, weight (examples), correct (argmax == label).

    Attributes:
      config: the ClassifierConfig (its `encoder` usually %MODEL_CONFIG).
      label_smoothing: uniform label smoothing of the training loss.
    """

    config: ClassifierConfig = None
    label_smoothing: float = 0.0

    model_type = CLASSIFIER
    features = ("encoder_input_tokens", "labels")
    can_score = False  # class logits, not target tokens

    def __post_init__(self):
        if not isinstance(self.config, ClassifierConfig):
            raise ConfigError(
                f"ClassifierModel.config must be a ClassifierConfig (e.g. @ClassifierConfig() "
                f"with ClassifierConfig.encoder = %MODEL_CONFIG), got {self.config!r}"
            )
        ls = self.label_smoothing
        if not isinstance(ls, int | float) or isinstance(ls, bool) or not 0.0 <= ls < 1.0:
            raise ConfigError(f"ClassifierModel.label_smoothing={ls!r} must be a number in [0, 1)")

    def build(self, rngs: nnx.Rngs) -> Classifier:
        return Classifier(self.config, rngs=rngs)

    def logits(self, module: Classifier, batch: Batch, rng: jax.Array | None) -> jax.Array:
        """[B, C] float32 class logits."""
        return module(batch["encoder_input_tokens"], rng=rng)

    def _sums(self, logits, batch, smoothing: float) -> Metrics:
        labels = batch["labels"]
        valid = _valid_rows(batch["encoder_input_tokens"]).astype(jnp.float32)
        c = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jax.nn.one_hot(labels, c) * (1.0 - smoothing) + smoothing / c
        loss = -jnp.sum(target * logp, axis=-1)
        right = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(loss * valid),
            "weight": jnp.sum(valid),
            "correct": jnp.sum(right * valid),
        }

    def loss_weight(self, batch: Batch) -> jax.Array:
        """Examples in the batch (rows that are not all padding)."""
        return jnp.sum(_valid_rows(batch["encoder_input_tokens"]).astype(jnp.float32))

    def count_tokens(self, batch: dict) -> int:
        return _count_nonpad(batch, ("encoder_input_tokens",))

    def loss_fn(self, module, batch, rng, normalizer=None):
        sums = self._sums(self.logits(module, batch, rng), batch, self.label_smoothing)
        if normalizer is None:
            normalizer = sums["weight"]
        return sums["loss_sum"] / normalizer, sums

    def eval_fn(self, module, batch) -> Metrics:
        return self._sums(self.logits(module, batch, None), batch, 0.0)

    def warm_start_params(self, source, source_type, fresh):
        """The encoder from a decoder-only / encoder-decoder checkpoint; the head stays fresh."""
        if source_type not in ("decoder_only", "encoder_decoder"):
            return None
        return warm_start_classifier(self.config, source, source_type=source_type, fresh=fresh)

    def flops_per_token(self, lengths: dict[str, int]) -> float:
        return encoder_flops_per_token(self.config.encoder, lengths.get("inputs", 0))
