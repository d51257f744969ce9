"""Evaluation tasks of the embedded corpus: copies of pretraining tasks with seqio metric
functions (`encdec_adapt.data.metrics`), for `encdec-adapt eval` and the trainer's periodic eval.

  stdlib_prefix_lm_eval        stdlib_prefix_lm + sequence accuracy, token F1, mean target
                               log-likelihood
  stdlib_span_corruption_eval  stdlib_span_corruption + sequence accuracy, mean target
                               log-likelihood

Registered by `encdec_adapt.tasks.embedded.register` after the tasks they copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import seqio

from encdec_adapt.data import metrics

# name -> (task it copies, its metric functions)
EVAL_TASKS: dict[str, tuple[str, tuple[Callable, ...]]] = {
    "stdlib_prefix_lm_eval": (
        "stdlib_prefix_lm",
        (metrics.sequence_accuracy, metrics.token_f1, metrics.mean_log_likelihood),
    ),
    "stdlib_span_corruption_eval": (
        "stdlib_span_corruption",
        (metrics.sequence_accuracy, metrics.mean_log_likelihood),
    ),
}


def register_with_metrics(
    name: str, base: str, metric_fns: Sequence[Callable], overwrite: bool = True
) -> seqio.Task:
    """Registers `name`: task `base` (same source, preprocessors and output features) with
    `metric_fns`, each taking (targets, predictions) or (targets, scores) as in seqio."""
    task = seqio.get_mixture_or_task(base)
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f"{name!r} is already registered; pass overwrite=True to replace it")
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=task.source,
        preprocessors=task.preprocessors,
        output_features=task.output_features,
        metric_fns=list(metric_fns),
    )


def register(overwrite: bool = True) -> None:
    for name, (base, metric_fns) in EVAL_TASKS.items():
        register_with_metrics(name, base, metric_fns, overwrite=overwrite)
