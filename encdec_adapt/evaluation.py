"""Evaluation of parameters on a data config: loss metrics, and the seqio task's metric functions.

`loss_metrics` sums the model's eval metrics (loss, accuracy) over batches; `task_metrics`
(t5x's evaluator, smaller) decodes and / or scores the eval split and calls the task's
`predict_metric_fns(targets, predictions)` and `score_metric_fns(targets, scores)` with texts.
Both run for the trainer's periodic eval and the `encdec-adapt eval` command.
"""

from __future__ import annotations

import jax

from encdec_adapt import input_pipeline
from encdec_adapt.models import summarize


def loss_metrics(trainer, params, data_cfg, num_batches: int | None) -> dict[str, float]:
    """Per-token means (loss, accuracy, ...) over `num_batches` batches of `data_cfg` (or one
    pass when None)."""
    it = input_pipeline.make_iterator(data_cfg)
    totals: dict[str, float] = {}
    for i, local in enumerate(it):
        if num_batches is not None and i >= num_batches:
            break
        sums = jax.device_get(trainer.eval_step(params, trainer.shard_batch(local)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        raise ValueError(f"evaluation data {data_cfg} yielded no batches")
    return summarize(totals)
