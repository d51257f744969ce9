"""Contrastive tasks with the retrieval metrics attached: the tasks layer joins data/ (the seqio
task) and evaluation/ (its metric functions), which do not know each other."""

from __future__ import annotations

from encdec_adapt.data import registry
from encdec_adapt.evaluation.retrieval_metrics import retrieval_metric_fn


def register_contrastive_task(*args, retrieval_metric: bool = True, **kwargs):
    """`registry.register_contrastive_task`, with `retrieval_metric` (default) attaching
    `retrieval_metrics.retrieval_metric_fn`: the trainer's periodic eval and `encdec-adapt eval`
    of an embedding model then report nDCG@10, Recall@1/10/100 and MRR@10 of the towers among
    the eval batches' documents (`evaluation.embedding_task_metrics`); False: only the
    contrastive loss and in-batch accuracy."""
    metric_fns = kwargs.pop("metric_fns", ())
    if retrieval_metric:
        metric_fns = [retrieval_metric_fn, *metric_fns]
    return registry.register_contrastive_task(*args, metric_fns=metric_fns, **kwargs)
