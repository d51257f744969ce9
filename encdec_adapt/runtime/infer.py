"""Gin entry points `evaluate` and `infer`: metrics, scores and predictions of a checkpoint.

    encdec-adapt eval --gin_file=models/gemma_tiny.gin --gin_file=runs/eval.gin \
        --gin.MODEL_DIR=/tmp/run --gin.EVAL_TASK=my_task
    encdec-adapt infer --gin_file=models/t5gemma_tiny.gin --gin_file=runs/predict.gin \
        --gin.MODEL_DIR=/tmp/run --gin.INFER_TASK=stdlib_span_corruption --gin.OUTPUT=/tmp/p.jsonl

Both read only the parameters: of the newest training checkpoint of `model_dir`, or of a params
checkpoint (`params_from`). The command line lives in `train.py` with `train`'s.
"""

from __future__ import annotations

import json

import gin
import jax
import numpy as np

from encdec_adapt.data import input_pipeline
from encdec_adapt.data.counters import COUNTERS
from encdec_adapt.data.jsonl_inputs import JsonlInputs
from encdec_adapt.errors import ConfigError
from encdec_adapt.evaluation import evaluator as evaluation
from encdec_adapt.models import decoding
from encdec_adapt.models.base import BaseModel
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, entrypoints, optim
from encdec_adapt.runtime.metrics_log import MetricsLogger
from encdec_adapt.runtime.trainer import Trainer
from encdec_adapt.storage import outputs, params_io


def _restore_params(trainer: Trainer, model_dir: str | None, params_from: str | None):
    """Parameters from a params checkpoint, or the newest training checkpoint of model_dir."""
    target = trainer.abstract_state().params
    if params_from:
        return params_io.load(params_from, target)
    if not model_dir:
        raise ConfigError("give a model_dir with training checkpoints or params_from")
    return checkpoints.restore_run_params(model_dir, target)[0]


@gin.configurable(module="encdec_adapt")
def evaluate(
    *,
    model: BaseModel = gin.REQUIRED,
    eval_data=gin.REQUIRED,
    model_dir: str | None = None,
    params_from: str | None = None,
    mesh_rules: sharding.MeshRules = sharding.MeshRules(),  # noqa: B008 - frozen
    eval_batches: int | None = None,
    task_metric_fns: bool = True,
    decode: decoding.DecodeConfig | None = decoding.DecodeConfig(),  # noqa: B008 - frozen
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of the newest checkpoint of `model_dir` (or of `params_from`) on `eval_data`;
    printed and appended to MODEL_DIR/metrics.jsonl as split "eval".

    Loss / accuracy always; with `task_metric_fns`, the seqio task's metric functions too
    (`evaluation.task_metrics`): its predict metrics decode with `decode` (None: skip them),
    its score metrics score the targets.
    """
    entrypoints.require("evaluate", model_dir=model_dir, params_from=params_from)
    input_pipeline.check_ends(eval_data, eval_batches)
    entrypoints.check_vocabulary(model, eval_data, "evaluate.eval_data")
    trainer = Trainer(model, optim.OptimizerConfig(), mesh_rules.make_mesh(), mesh_rules)
    params = _restore_params(trainer, model_dir, params_from)
    result = evaluation.run_eval(
        trainer, params, eval_data, eval_batches, decode, task_metric_fns, seed
    )
    if model_dir:
        logger = MetricsLogger(model_dir, 0, tensorboard=False)
        logger.write(0, result, "eval")
        logger.close()
    if jax.process_index() == 0:
        print(" | ".join(f"{k} {v:.6g}" for k, v in result.items()), flush=True)
    return result


@gin.configurable(module="encdec_adapt")
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
    `output_file`; returns the number of examples written.

    Args:
      infer_data: an input_pipeline.DataConfig (a seqio task) or a jsonl_inputs.JsonlInputs
        (raw texts; each record then also has "line", the input text as given, "truncated"
        (the features that were cut) and "empty_input").
      mode: "score": {"index", "log_likelihood", "tokens"} of the given targets;
        "predict": {"index", "inputs", "prediction", "prediction_ids", "score"} (texts decoded
        with the task's or the JSONL vocabularies; with beam search, the best beam). An
        encoder-decoder decodes from its inputs; a decoder-only model continues its prompt
        (the prefix-LM inputs of a seqio task, the input text of a JSONL line).
      num_batches: stop after this many batches (None: all).
      decode: decoding options (predict); seed: sampling key.

    Rows that pad the last batch are not written. Truncated inputs are counted and the counts
    printed at the end.
    """
    entrypoints.require(
        "infer", model_dir=model_dir, params_from=params_from, output_file=output_file
    )
    if mode not in ("score", "predict"):
        raise ConfigError(f"infer.mode={mode!r}: choose 'score' or 'predict'")
    jsonl = isinstance(infer_data, JsonlInputs)
    if jsonl and mode == "score" and not infer_data.target_key:
        raise ConfigError(
            "Invalid JsonlInputs: target_key=None, but infer.mode='score' needs targets "
            "(e.g. JsonlInputs.target_key = 'targets')"
        )
    if jsonl:
        outputs.check_not_input(output_file, infer_data.path)
    # The data first: a bad file or task name fails before any compute.
    iterator = input_pipeline.make_iterator(infer_data)
    entrypoints.check_vocabulary(model, infer_data, "infer.infer_data")
    vocabs = iterator.vocabs if jsonl else input_pipeline.vocabularies(infer_data.task)
    trainer = Trainer(model, optim.OptimizerConfig(), mesh_rules.make_mesh(), mesh_rules)
    params = _restore_params(trainer, model_dir, params_from)
    # A decoder-only task has only "targets": its prompts (if any) use the same vocabulary.
    in_vocab = vocabs.get("inputs", vocabs["targets"])
    in_eos, out_eos = in_vocab.eos_id, vocabs["targets"].eos_id
    lines = []
    for result in evaluation.run_batches(
        trainer,
        params,
        infer_data,
        predict=mode == "predict",
        score=mode == "score",
        decode_cfg=decode,
        seed=seed,
        num_batches=num_batches,
        iterator=iterator,
    ):
        examples = iterator.batch_examples(result.index) if jsonl else None
        for row in np.flatnonzero(result.valid):
            record = {"index": len(lines)}
            if jsonl:
                ex = examples[row]
                record.update(line=ex.line, inputs=ex.inputs)
                if ex.targets is not None:
                    record["targets"] = ex.targets
            else:
                ids = evaluation.input_ids(result.features, row, in_eos)
                record["inputs"] = in_vocab.decode(ids)
            if mode == "score":
                target = evaluation.target_ids(result.features, row, out_eos)
                n_target = evaluation.target_length(result.features, row)
                record["log_likelihood"] = float(result.log_likelihood[row])
                record["tokens"] = len(target) + (len(target) < n_target)  # + EOS (scored too)
            else:
                ids = evaluation.until_eos(result.tokens[row], decode.eos_id)
                record["prediction"] = vocabs["targets"].decode(ids)
                record["prediction_ids"] = ids
                record["score"] = float(result.scores[row])
            if jsonl:
                record.update(truncated=ex.truncated, empty_input=ex.empty_input)
            lines.append(json.dumps(record))
    entrypoints.write_text(output_file, "\n".join(lines) + "\n")
    if jax.process_index() == 0:
        print(f"infer: {len(lines)} examples ({mode}) written to {output_file}", flush=True)
        print(f"infer: {_cut_summary(iterator if jsonl else None)}", flush=True)
    return len(lines)


def _cut_summary(jsonl_iterator) -> str:
    """What was cut or flagged: a JSONL file's counts, or the seqio converters' counters."""
    if jsonl_iterator is not None:
        counts = jsonl_iterator.counts()
        lengths = jsonl_iterator.cfg.task_feature_lengths
        return (
            f"{counts['truncated/inputs']} inputs truncated to {lengths['inputs']} tokens, "
            f"{counts['truncated/targets']} targets truncated to {lengths['targets']} tokens, "
            f"{counts['empty_inputs']} empty inputs (decoded from EOS)"
        )
    cut = {k: v for k, v in COUNTERS.result().items() if k.startswith(("truncated", "dropped"))}
    return "cut by the feature converter: " + (
        ", ".join(f"{k} {v}" for k, v in cut.items()) or "nothing"
    )
