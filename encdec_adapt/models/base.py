"""The t5x-style model API: what a network computes for training, evaluation and scoring.

A *model* wraps a *network* (an nnx.Module such as `transformer.DecoderOnly`) and knows its batch
features, its loss and its metrics. It holds no parameters and no optimizer: `runtime/trainer.py`
owns the state, `runtime/optim.py` the updates. Metrics are returned as float32 *sums*
(loss_sum, weight, correct, ...) so that they add across micro-batches, steps and hosts;
`summarize` turns sums into means.

`BaseModel` declares every hook the runtime calls (training, evaluation, scoring, decoding,
embedding, warm starts, export, distillation teachers, token counts, FLOPs), each with a default
or a NotImplementedError, and the capability properties (`can_predict`, `can_score`,
`can_embed`) that say which of them a model implements: callers never probe with getattr.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.models import decoding, losses, vocab_loss

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PyTree = Any


def summarize(sums: dict[str, Any]) -> dict[str, float]:
    """Sums from `loss_fn` / `eval_fn` -> per-token means (loss, z_loss, accuracy) and counts."""
    w = max(float(sums["weight"]), 1e-9)
    out = {"loss": float(sums["loss_sum"]) / w, "accuracy": float(sums["correct"]) / w}
    if "z_loss_sum" in sums:
        out["z_loss"] = float(sums["z_loss_sum"]) / w
    if "kd_sum" in sums:
        out["kd_loss"] = float(sums["kd_sum"]) / w
    out["tokens"] = float(sums["weight"])
    return out


def decoder_weights(batch: Batch) -> Any:
    """[B, T] loss weights of the decoder targets: the batch's `decoder_loss_weights`, or (when the
    feature converter wrote none) the non-padding target tokens. Works on jax and numpy batches."""
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = batch["decoder_target_tokens"] > 0
    return weights


class BaseModel(abc.ABC):
    """The model API; subclasses are frozen dataclasses configured by gin.

    Attributes every subclass has: config (the network's architecture), z_loss,
    label_smoothing (token models).
    """

    #: what `params_io` writes to model.json as the model type
    model_type: str = ""
    #: batch features the network reads, each int32 [B, L]
    features: tuple[str, ...] = ()
    #: regexes of parameters the trainer never updates (e.g. a distillation teacher)
    frozen_patterns: tuple[str, ...] = ()
    #: params checkpoint of a frozen teacher, loaded into `teacher_subtree` on a fresh start
    teacher_checkpoint: str | None = None
    #: the parameter subtree the teacher lives under (None: no teacher)
    teacher_subtree: str | None = None
    #: the parameter subtree a warm start (`train.warm_start_from`) fills (None: all)
    warm_start_subtree: str | None = None
    #: tokens per chunk of the vocabulary loss (models/vocab_loss.py): None decides by size,
    #: 0 never chunks; token models make it a gin field
    loss_chunk_tokens: int | None = 0

    # ---- capabilities -----------------------------------------------------------------------

    @property
    def can_predict(self) -> bool:
        """`predict_batch` generates target tokens."""
        return False

    @property
    def can_score(self) -> bool:
        """`score_batch` gives target log-likelihoods."""
        return True

    @property
    def can_embed(self) -> bool:
        """`embed` maps tokens to embeddings (an embedding model: retrieval evaluation)."""
        return False

    # ---- the network --------------------------------------------------------------------------

    @abc.abstractmethod
    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised network."""

    @abc.abstractmethod
    def logits(
        self, module: nnx.Module, batch: Batch, rng: jax.Array | None, return_hidden=False
    ) -> jax.Array:
        """[B, T, V] logits predicting `decoder_target_tokens` ([B, T, D] final hidden states
        with `return_hidden`, for the chunked vocabulary loss)."""

    def config_dict(self) -> dict:
        """What `params_io` writes to model.json (rebuilds the network)."""
        return self.config.to_dict()

    def vocab_size(self) -> int | None:
        """The fewest embedding rows of any of the network's token tables (every `vocab_size`
        in its config): token ids must stay below it. None when the config has none."""
        sizes = []

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "vocab_size" and isinstance(value, int):
                        sizes.append(value)
                    else:
                        walk(value)

        walk(self.config_dict())
        return min(sizes) if sizes else None

    def on_mesh(self, mesh: Any, rules: Any) -> BaseModel:
        """This model for steps traced on `mesh` with `rules` (the trainer calls it once): a
        model whose loss depends on how the batch is split (the contrastive loss over the
        global batch) returns a copy that knows the mesh; the default ignores it."""
        return self

    def submodel(self, name: str) -> BaseModel:
        """The model of parameter subtree `name` (e.g. a distillation's "student" / "teacher")."""
        raise KeyError(f"{type(self).__name__} has no sub-model {name!r}")

    # ---- training -----------------------------------------------------------------------------

    def flops_per_token(self, lengths: dict[str, int]) -> float:
        """Training FLOPs (forward + backward) per target token, for MFU."""
        raise NotImplementedError(f"{type(self).__name__} does not count its FLOPs")

    def loss_weight(self, batch: Batch) -> jax.Array:
        """float32 scalar the trainer divides the summed loss of a global batch by (also across
        micro-batches): the sum of the decoder loss weights (target tokens) by default."""
        return jnp.sum(decoder_weights(batch).astype(jnp.float32))

    def count_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens of one host batch (numpy), for the tokens/s log: the target tokens by default."""
        return int(decoder_weights(batch).sum())

    def token_loss(
        self, module: nnx.Module, batch: Batch, rng: jax.Array | None
    ) -> tuple[losses.TokenLoss, jax.Array]:
        weights = decoder_weights(batch)
        chunk = self.loss_chunk(module, batch)
        if chunk:  # never materialises [B, T, V] logits (models/vocab_loss.py)
            hidden = self.logits(module, batch, rng, return_hidden=True)
            head, cap = module.output_head()
            tl = vocab_loss.cross_entropy(
                hidden,
                head,
                batch["decoder_target_tokens"],
                weights,
                soft_cap=cap,
                chunk_tokens=chunk,
                z_loss=self.z_loss,
                label_smoothing=self.label_smoothing,
            )
            return tl, hidden
        logits = self.logits(module, batch, rng)
        tl = losses.cross_entropy(
            logits,
            batch["decoder_target_tokens"],
            weights,
            z_loss=self.z_loss,
            label_smoothing=self.label_smoothing,
        )
        return tl, logits

    def loss_chunk(self, module: nnx.Module, batch: Batch) -> int:
        """Tokens per chunk of the vocabulary loss, 0 for full logits (`loss_chunk_tokens`)."""
        targets = batch["decoder_target_tokens"]
        vocab = module.output_head()[0].shape[0]
        return vocab_loss.resolve_chunk_tokens(self.loss_chunk_tokens, targets.size, vocab)

    def loss_fn(
        self,
        module: nnx.Module,
        batch: Batch,
        rng: jax.Array | None,
        normalizer: jax.Array | float | None = None,
    ) -> tuple[jax.Array, Metrics]:
        """(scalar loss to differentiate, metric sums).

        Args:
          normalizer: the loss is sum / normalizer; default: the sum of loss weights of `batch`.
            Gradient accumulation passes the weight of the whole batch, so that micro-batch
            gradients add up to the full-batch gradient.
        """
        tl, _ = self.token_loss(module, batch, rng)
        if normalizer is None:
            normalizer = jnp.maximum(tl.weight, 1.0)
        metrics = {
            "loss_sum": tl.loss,
            "z_loss_sum": tl.z_loss,
            "weight": tl.weight,
            "correct": tl.correct,
        }
        return tl.loss / normalizer, metrics

    # ---- evaluation and inference -------------------------------------------------------------

    def eval_fn(self, module: nnx.Module, batch: Batch) -> Metrics:
        """Metric sums without dropout, label smoothing or z-loss."""
        logits = self.logits(module, batch, None)
        weights = decoder_weights(batch)
        tl = losses.cross_entropy(logits, batch["decoder_target_tokens"], weights)
        return {"loss_sum": tl.loss, "weight": tl.weight, "correct": tl.correct}

    def predict_batch(
        self,
        module: nnx.Module,
        batch: Batch,
        decode_cfg: decoding.DecodeConfig,
        rng: jax.Array | None = None,
    ) -> decoding.Decoded:
        """Generated target tokens [B, L] (or [B, beams, L]) and their scores (`can_predict`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no predict_batch; score with infer.mode='score'"
        )

    def score_batch(self, module: nnx.Module, batch: Batch) -> jax.Array:
        """[B] sum of target-token log-likelihoods (weighted by the loss weights)."""
        logits = self.logits(module, batch, None).astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights", targets > 0).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        token = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token * weights, axis=-1)

    def embed(
        self,
        module: nnx.Module,
        tokens: jax.Array,
        side: str = "query",
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """[B, L] tokens of queries or documents -> [B, E] embeddings (`can_embed`)."""
        raise NotImplementedError(f"{type(self).__name__} is not an embedding model")

    # ---- checkpoints --------------------------------------------------------------------------

    def warm_start_params(self, source: Any, source_type: str, fresh: Any) -> Any | None:
        """This model's parameters initialised from a params checkpoint of another model type.

        Args:
          source: the checkpoint's nested parameter dict (host arrays).
          source_type: its model.json model_type ("decoder_only", "encoder_decoder", ...).
          fresh: this model's freshly initialised parameters (for what the source lacks).
        Returns:
          a parameter tree like `fresh`, or None: the checkpoint is read as this model's own
          layout (names and shapes checked, the clear error on a mismatch).
        """
        return None

    def export(self, params: PyTree) -> tuple[BaseModel, PyTree]:
        """(model, parameters) that `export-params` writes for this model's training state:
        itself by default; a distillation run exports its student."""
        return self, params
