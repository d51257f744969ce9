"""Evaluation of parameters on a data config: loss metrics, and the seqio task's metric functions.

`loss_metrics` sums the model's eval metrics (loss, accuracy) over batches. `task_metrics` is a
smaller version of t5x's / seqio's evaluator: it decodes (predict) and / or scores the eval data
and calls the task's `predict_metric_fns(targets, predictions)` and
`score_metric_fns(targets, scores)` with the target and predicted token ids decoded to text by
the task's "targets" vocabulary and passed through the task's postprocessor (`is_target=True`
for targets). Both serve the trainer's periodic eval and `encdec-adapt eval`; `run_batches`,
the fixed-shape predict / score loop, also serves `infer`.

For an embedding model (`model.can_embed`, e.g. `DualEncoderModel`) on a contrastive task,
`task_metrics` is the retrieval evaluation instead (`embedding_task_metrics`): the towers embed
the eval batches' queries and positives, and the task's (targets, predictions) metric functions
(`retrieval_metrics.retrieval_metric_fn`, attached by `tasks.register_contrastive_task`) get
targets = document embeddings, predictions = query embeddings.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from encdec_adapt.data import input_pipeline
from encdec_adapt.data.jsonl_inputs import JsonlIterator
from encdec_adapt.errors import ConfigError, InputError
from encdec_adapt.models.base import summarize
from encdec_adapt.parallel import sharding


def loss_metrics(trainer, params, data_cfg, num_batches: int | None) -> dict[str, float]:
    """Per-token means (loss, accuracy, ...) over `num_batches` batches of `data_cfg` (or one
    pass when None)."""
    totals: dict[str, float] = {}
    for _, batch, _ in batches(trainer, data_cfg, num_batches):
        sums = jax.device_get(trainer.eval_step(params, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        raise InputError(f"evaluation data {data_cfg} yielded no batches")
    return summarize(totals)


# ---- the predict / score loop ----------------------------------------------------------------


class BatchResult(NamedTuple):
    """What one global batch gave, on the host (every row of the global batch).

    index: batch number; valid: [B] bool, False for rows that pad the last batch;
    features: the batch's features [B, ...]; tokens: [B, L] generated ids (best beam) or None;
    scores: [B] decoding scores (sum of log-probabilities; beams: length-penalised) or None;
    log_likelihood: [B] target log-likelihood or None.
    """

    index: int
    valid: np.ndarray
    features: dict[str, np.ndarray]
    tokens: np.ndarray | None
    scores: np.ndarray | None
    log_likelihood: np.ndarray | None


def _pad_rows(local: dict[str, np.ndarray], data_cfg) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pads a short (last) local batch with all-zero rows to the full local batch size, so that
    every batch has one shape (no recompilation); returns (batch, valid [rows] bool).

    All-zero rows carry no loss weight, so loss sums are unchanged."""
    rows = data_cfg.batch_size // jax.process_count()
    n = len(next(iter(local.values())))
    valid = np.arange(rows) < n
    if n == rows:
        return local, valid
    pad = {k: np.zeros((rows - n, *v.shape[1:]), v.dtype) for k, v in local.items()}
    return {k: np.concatenate([v, pad[k]]) for k, v in local.items()}, valid


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(trainer, kind: str, decode_cfg=None):
    """The trainer's jitted predict / score / embed function, built once per (trainer, config),
    so that periodic evaluation does not recompile."""
    fns = _COMPILED.setdefault(trainer, {})
    key = (kind, decode_cfg)
    if key not in fns:
        if kind == "predict":
            fns[key] = trainer.predict_fn(decode_cfg)
        elif kind == "embed":
            fns[key] = _embed_fn(trainer)
        else:
            fns[key] = trainer.score_fn()
    return fns[key]


def _embed_fn(trainer):
    """jitted (params, {query_tokens, positive_tokens}) -> (queries [B, E], positives [B, E]):
    the model's `embed` on the query and the document side (no dropout)."""
    model = trainer.model

    def embed(params, batch):
        module = trainer.module(params)
        return (
            model.embed(module, batch["query_tokens"], "query"),
            model.embed(module, batch["positive_tokens"], "document"),
        )

    return jax.jit(embed)


def to_host(x) -> np.ndarray:
    """The full value of a global array (or of each process's numpy rows) on every process."""
    if isinstance(x, np.ndarray):
        if jax.process_count() == 1:
            return x
    elif x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batches(
    trainer,
    data_cfg,
    num_batches: int | None = None,
    *,
    iterator: Any = None,
    select: Callable[[int, dict], dict] | None = None,
) -> Iterator[tuple[int, dict[str, jax.Array], np.ndarray]]:
    """The one evaluation batch loop: (index, global batch, valid [B] bool) of every batch of
    `data_cfg` (or of `iterator`), in order, stopping after `num_batches` (None: one pass).

    Every batch has one shape (no recompilation): a short last batch is padded with all-zero
    rows, which are not valid (nor are the rows a JSONL file pads its last batch with).
    `select(index, local batch)` picks (and checks) the features to feed.
    """
    if iterator is None:
        input_pipeline.check_ends(data_cfg, num_batches)
    it = input_pipeline.make_iterator(data_cfg) if iterator is None else iterator
    for i, local in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        if select is not None:
            local = select(i, local)
        local, valid = _pad_rows(local, data_cfg)
        batch = trainer.shard_batch(local)
        valid = to_host(valid)
        if isinstance(it, JsonlIterator):  # a JSONL file pads its last batch itself
            valid = valid & (np.arange(len(valid)) < len(it.batch_examples(i)))
        yield i, batch, valid


def run_batches(
    trainer,
    params,
    data_cfg,
    *,
    predict: bool = False,
    score: bool = False,
    decode_cfg=None,
    seed: int = 0,
    num_batches: int | None = None,
    iterator: Any = None,
) -> Iterator[BatchResult]:
    """Predicts and / or scores every batch of `data_cfg` (or of `iterator`), in order.

    Args:
      predict: decode with `decode_cfg` (sampling key: fold_in(key(seed), batch index)).
      score: the targets' log-likelihood (needs targets in the batch).
      num_batches: stop after this many batches (None: one pass).
    """
    predict_fn = _compiled(trainer, "predict", decode_cfg) if predict else None
    score_fn = _compiled(trainer, "score") if score else None
    for i, batch, valid in batches(trainer, data_cfg, num_batches, iterator=iterator):
        tokens = scores = log_likelihood = None
        with sharding.use_mesh(trainer.mesh, trainer.rules):
            if predict_fn is not None:
                out = predict_fn(params, batch, jax.random.fold_in(jax.random.key(seed), i))
                tokens, scores = to_host(out.tokens), to_host(out.scores)
                if tokens.ndim == 3:  # beams, best first
                    tokens, scores = tokens[:, 0], scores[:, 0]
            if score_fn is not None:
                log_likelihood = to_host(score_fn(params, batch))
        features = {k: to_host(v) for k, v in batch.items()}
        yield BatchResult(i, valid, features, tokens, scores, log_likelihood)


# ---- token ids of a row ----------------------------------------------------------------------


def until_eos(ids, eos_id: int) -> list[int]:
    """Token ids before the first EOS, padding (0) removed."""
    out = []
    for t in np.asarray(ids).tolist():
        if t == eos_id:
            break
        if t != 0:
            out.append(t)
    return out


def input_ids(features: dict[str, np.ndarray], row: int, eos_id: int) -> list[int]:
    """The input ids of a row: the encoder inputs, or a decoder-only row's prompt (the tokens
    before the first loss-weighted position, or the whole row without one), up to EOS."""
    if "encoder_input_tokens" in features:
        return until_eos(features["encoder_input_tokens"][row], eos_id)
    tokens = features["decoder_target_tokens"][row]
    weighted = np.flatnonzero(features["decoder_loss_weights"][row] > 0)
    return until_eos(tokens[: weighted[0]] if len(weighted) else tokens, eos_id)


def target_ids(features: dict[str, np.ndarray], row: int, eos_id: int) -> list[int]:
    """The target ids of a row: its loss-weighted target tokens, up to EOS."""
    tokens = features["decoder_target_tokens"][row]
    weights = features.get("decoder_loss_weights")
    if weights is not None:
        tokens = tokens[weights[row] > 0]
    return until_eos(tokens, eos_id)


def target_length(features: dict[str, np.ndarray], row: int) -> int:
    """The number of target positions of a row that are scored (loss-weighted, or non-padding
    without loss weights): its target tokens and, unless the target was cut, its EOS."""
    weights = features.get("decoder_loss_weights")
    if weights is None:
        return int(np.count_nonzero(features["decoder_target_tokens"][row]))
    return int(np.count_nonzero(weights[row]))


# ---- the task's metric functions --------------------------------------------------------------


def metric_task(data_cfg):
    """The seqio Task of a DataConfig when it has metric functions, else None (mixtures: None,
    seqio evaluates their tasks one by one)."""
    import seqio  # lazy on purpose: TensorFlow (synthetic-data evals never import it)

    name = getattr(data_cfg, "task", None)
    if not isinstance(data_cfg, input_pipeline.DataConfig) or not name:
        return None
    input_pipeline.check_task_name(name)
    task = seqio.get_mixture_or_task(name)
    if not isinstance(task, seqio.Task) or not task.metric_fns:
        return None
    return task


def _as_float(name: str, value: Any) -> float:
    value = getattr(value, "value", value)  # seqio.metrics.Scalar
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} is not a number: {value!r}") from None


def task_metrics(
    trainer,
    params,
    data_cfg,
    decode_cfg=None,
    num_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """The task's metric functions on `num_batches` batches of `data_cfg` (None: one pass).

    Predict metrics run only with a `decode_cfg` (decoding costs time); score metrics always.
    Returns {} when the task has none of them. An embedding model (`model.can_embed`) runs
    `embedding_task_metrics` instead (retrieval over the eval batches; `decode_cfg` and `seed`
    do not apply).
    """
    task = metric_task(data_cfg)
    if task is None:
        return {}
    if trainer.model.can_embed:
        return embedding_task_metrics(trainer, params, data_cfg, task, num_batches)
    predict_fns = list(task.predict_metric_fns) if decode_cfg is not None else []
    score_fns = list(task.score_metric_fns)
    if not predict_fns and not score_fns:
        return {}
    vocab = task.output_features["targets"].vocabulary
    eos = vocab.eos_id
    targets, predictions, scores = [], [], []
    for result in run_batches(
        trainer,
        params,
        data_cfg,
        predict=bool(predict_fns),
        score=bool(score_fns),
        decode_cfg=decode_cfg,
        seed=seed,
        num_batches=num_batches,
    ):
        for row in np.flatnonzero(result.valid):
            target = vocab.decode(target_ids(result.features, row, eos))
            targets.append(task.postprocess_fn(target, example=None, is_target=True))
            if predict_fns:
                text = vocab.decode(until_eos(result.tokens[row], eos))
                predictions.append(task.postprocess_fn(text, example=None, is_target=False))
            if score_fns:
                scores.append(float(result.log_likelihood[row]))
    out: dict[str, float] = {}
    for fn in predict_fns:
        out.update({k: _as_float(k, v) for k, v in fn(targets, predictions).items()})
    for fn in score_fns:
        out.update({k: _as_float(k, v) for k, v in fn(targets, scores).items()})
    return out


# ---- embedding models: retrieval over the eval batches ------------------------------------------

#: the features an embedding model's eval batches hold (`DataConfig.feature_converter=
#: "dual_encoder"`); hard negatives (negative_tokens) are not retrieval candidates
EMBED_FEATURES = ("query_tokens", "positive_tokens")


class EmbeddedRows(NamedTuple):
    """The valid rows of the eval batches, in order (padding rows of a short last batch left
    out): queries [N, E] and positives [N, E] as the towers embed them, and the positives'
    tokens [N, Lp] (identical tokens are one document)."""

    queries: np.ndarray
    documents: np.ndarray
    document_tokens: np.ndarray


def embed_batches(trainer, params, data_cfg, num_batches: int | None = None) -> EmbeddedRows:
    """Embeds the query and the positive of every valid row of `num_batches` batches of
    `data_cfg` (None: one pass) with the model's compiled `embed` (fixed shapes: the last batch
    is padded with all-zero rows, which are dropped)."""
    embed = _compiled(trainer, "embed")
    queries, documents, tokens = [], [], []

    def select(i, local):
        missing = [k for k in EMBED_FEATURES if k not in local]
        if missing:
            raise ConfigError(
                f"retrieval evaluation of {type(trainer.model).__name__} needs the features "
                f"{EMBED_FEATURES} (feature_converter='dual_encoder'); batch {i} of "
                f"{data_cfg} has {sorted(local)}"
            )
        return {k: local[k] for k in EMBED_FEATURES}

    for _, batch, valid in batches(trainer, data_cfg, num_batches, select=select):
        with sharding.use_mesh(trainer.mesh, trainer.rules):
            q, d = embed(params, batch)
        rows = np.flatnonzero(valid)
        queries.append(to_host(q)[rows])
        documents.append(to_host(d)[rows])
        tokens.append(to_host(batch["positive_tokens"])[rows])
    if not queries:
        raise InputError(f"evaluation data {data_cfg} yielded no batches")
    return EmbeddedRows(*(np.concatenate(x) for x in (queries, documents, tokens)))


def embedding_task_metrics(
    trainer, params, data_cfg, task, num_batches: int | None = None
) -> dict[str, float]:
    """Retrieval metrics of the model's towers on `num_batches` eval batches of `data_cfg`.

    The eval batches' valid rows are the queries, and their positives the candidate documents:
    this measures retrieval among `num_batches` x batch_size candidates, not among the whole
    split (`encdec-adapt embed --gin.TASK=...` ranks the full split). As in
    `RetrievalSplit.from_pairs`, identical positives (same tokens) are one document relevant to
    each of their queries: their rows get the embedding of the first, so that
    `retrieval_metric_fn` (which merges identical target rows) sees one candidate. Hard
    negatives are not candidates (as in `embed.retrieval_split`). Padding rows do not count.

    Each of the task's (targets, predictions) metric functions gets targets = document
    embeddings [N, E], predictions = query embeddings [N, E]. Also returns the number of
    queries and of distinct candidate documents (`retrieval_queries`, `retrieval_documents`).
    """
    if task.score_metric_fns:
        names = [getattr(fn, "__name__", repr(fn)) for fn in task.score_metric_fns]
        raise ConfigError(
            f"task {task.name!r} has score metric functions {names}: an embedding model "
            f"({type(trainer.model).__name__}) gives embeddings, not target scores; register "
            "the task with (targets, predictions) metric functions such as retrieval_metric_fn"
        )
    fns = list(task.predict_metric_fns)
    if not fns:
        return {}
    rows = embed_batches(trainer, params, data_cfg, num_batches)
    _, first, inverse = np.unique(
        rows.document_tokens, axis=0, return_index=True, return_inverse=True
    )
    documents = rows.documents[first[inverse.reshape(-1)]]
    out: dict[str, float] = {}
    for fn in fns:
        out.update({k: _as_float(k, v) for k, v in fn(documents, rows.queries).items()})
    out["retrieval_queries"] = float(len(rows.queries))
    out["retrieval_documents"] = float(len(first))
    return out


def run_eval(
    trainer,
    params,
    data_cfg,
    num_batches: int | None,
    decode_cfg=None,
    task_metric_fns: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Loss metrics, and (when `task_metric_fns` and the task has them) the task's metrics:
    decode / score metrics, or for an embedding model the retrieval metrics of its towers over
    the eval batches (`embedding_task_metrics`)."""
    result = loss_metrics(trainer, params, data_cfg, num_batches)
    if task_metric_fns:
        result.update(task_metrics(trainer, params, data_cfg, decode_cfg, num_batches, seed))
    return result
