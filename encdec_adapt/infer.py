"""Gin entry points `evaluate` and `infer`: metrics, scores and predictions of a checkpoint.

    encdec-adapt eval --gin_file=gin/models/gemma_tiny.gin --gin_file=gin/runs/eval.gin \
        --gin.MODEL_DIR=/tmp/run --gin.EVAL_TASK=my_task
    encdec-adapt infer --gin_file=gin/models/t5gemma_tiny.gin --gin_file=gin/runs/predict.gin \
        --gin.MODEL_DIR=/tmp/run --gin.INFER_TASK=stdlib_span_corruption --gin.OUTPUT=/tmp/p.jsonl

Both read only the parameters: of the newest training checkpoint of `model_dir`, or of a params
checkpoint (`params_from`). The command line lives in `train.py` with `train`'s.
"""

from __future__ import annotations

import gin
import jax
import numpy as np

from encdec_adapt import (
    checkpoints,
    decoding,
    evaluation,
    input_pipeline,
    optim,
    params_io,
    sharding,
)
from encdec_adapt.metrics_log import MetricsLogger
from encdec_adapt.models import BaseModel
from encdec_adapt.train import _require, _write_text
from encdec_adapt.trainer import Trainer


def _restore_params(trainer: Trainer, model_dir: str | None, params_from: str | None):
    """Parameters from a params checkpoint, or the newest training checkpoint of model_dir."""
    target = trainer.abstract_state().params
    if params_from:
        return params_io.load(params_from, target)
    if not model_dir:
        raise ValueError("give a model_dir with training checkpoints or params_from")
    ckpt = checkpoints.Checkpointer(model_dir, checkpoints.CheckpointConfig(async_save=False))
    try:
        return ckpt.restore_params(target)
    finally:
        ckpt.close()


@gin.configurable
def evaluate(
    *,
    model: BaseModel = gin.REQUIRED,
    eval_data=gin.REQUIRED,
    model_dir: str | None = None,
    params_from: str | None = None,
    mesh_rules: sharding.MeshRules = sharding.MeshRules(),  # noqa: B008 - frozen
    eval_batches: int | None = None,
) -> dict[str, float]:
    """Loss / accuracy of the newest checkpoint of `model_dir` (or of `params_from`) on
    `eval_data`; printed and appended to MODEL_DIR/metrics.jsonl as split "eval"."""
    _require("evaluate", model_dir=model_dir, params_from=params_from)
    trainer = Trainer(model, optim.OptimizerConfig(), mesh_rules.make_mesh(), mesh_rules)
    params = _restore_params(trainer, model_dir, params_from)
    result = evaluation.loss_metrics(trainer, params, eval_data, eval_batches)
    if model_dir:
        logger = MetricsLogger(model_dir, 0, tensorboard=False)
        logger.write(0, result, "eval")
        logger.close()
    if jax.process_index() == 0:
        print(" | ".join(f"{k} {v:.6g}" for k, v in result.items()), flush=True)
    return result


@gin.configurable
def infer(
    *,
    model: BaseModel = gin.REQUIRED,
    infer_data=gin.REQUIRED,
    output_file: str = gin.REQUIRED,
    model_dir: str | None = None,
    params_from: str | None = None,
    mesh_rules: sharding.MeshRules = sharding.MeshRules(),  # noqa: B008 - frozen
    num_batches: int | None = None,
    mode: str = "score",
    decode: decoding.DecodeConfig = decoding.DecodeConfig(),  # noqa: B008 - frozen
    seed: int = 0,
) -> int:
    """Scores or decodes every example of `infer_data`, one JSON line per example in
    `output_file`; returns the number of examples.

    mode "score": {"index", "log_likelihood", "tokens"} of the given targets.
    mode "predict": {"index", "inputs", "prediction", "prediction_ids", "score"} (texts decoded
    with the task's vocabularies; with beam search, the best beam).
    """
    import json

    _require("infer", model_dir=model_dir, params_from=params_from, output_file=output_file)
    if mode not in ("score", "predict"):
        raise ValueError(f"infer.mode={mode!r}: choose 'score' or 'predict'")
    trainer = Trainer(model, optim.OptimizerConfig(), mesh_rules.make_mesh(), mesh_rules)
    params = _restore_params(trainer, model_dir, params_from)
    if mode == "score":
        score = trainer.score_fn()
    else:
        predict = trainer.predict_fn(decode)
        vocabs = input_pipeline.vocabularies(infer_data.task)
    count = 0
    lines = []
    for i, local in enumerate(input_pipeline.make_iterator(infer_data)):
        if num_batches is not None and i >= num_batches:
            break
        batch = trainer.shard_batch(local)
        with sharding.use_mesh(trainer.mesh, trainer.rules):
            if mode == "score":
                scores = _to_host(score(params, batch))
            else:
                out = predict(params, batch, jax.random.fold_in(jax.random.key(seed), i))
                tokens, scores = _to_host(out.tokens), _to_host(out.scores)
        if mode == "score":
            weights = _to_host(
                batch.get("decoder_loss_weights", batch["decoder_target_tokens"] > 0)
            )
            for s, w in zip(scores, np.sum(weights, axis=-1)):
                record = {"index": count, "log_likelihood": float(s), "tokens": int(w)}
                lines.append(json.dumps(record))
                count += 1
            continue
        if tokens.ndim == 3:  # beams, best first
            tokens, scores = tokens[:, 0], scores[:, 0]
        inputs = _to_host(batch["encoder_input_tokens"])
        for row_in, row_out, s in zip(inputs, tokens, scores):
            ids = _until_eos(row_out, decode.eos_id)
            record = {
                "index": count,
                "inputs": vocabs["inputs"].decode(_until_eos(row_in, decode.eos_id)),
                "prediction": vocabs["targets"].decode(ids),
                "prediction_ids": ids,
                "score": float(s),
            }
            lines.append(json.dumps(record))
            count += 1
    _write_text(output_file, "\n".join(lines) + "\n")
    return count


def _until_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    """Token ids before the first EOS, padding (0) removed."""
    out = []
    for t in ids.tolist():
        if t == eos_id:
            break
        if t != 0:
            out.append(t)
    return out


def _to_host(x: jax.Array) -> np.ndarray:
    """The full value of a global array on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
