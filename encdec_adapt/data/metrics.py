"""Metric functions for seqio tasks, called the way seqio / t5x call them.

Predict metrics take `(targets, predictions)`: lists of target and predicted texts (after the
task's postprocessor). Score metrics take `(targets, scores)`: the target texts and each
example's target log-likelihood (nats). Each returns {metric name: float}; accuracies and F1 are
percentages, as in T5's metrics.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _check_lengths(targets: Sequence, others: Sequence, what: str) -> None:
    if len(targets) != len(others):
        raise ValueError(f"{len(targets)} targets but {len(others)} {what}")


def sequence_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target (after stripping outer whitespace)."""
    _check_lengths(targets, predictions, "predictions")
    if not targets:
        return {"sequence_accuracy": 0.0}
    hits = sum(t.strip() == p.strip() for t, p in zip(targets, predictions))
    return {"sequence_accuracy": 100.0 * hits / len(targets)}


def normalize_words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (SQuAD-style normalisation, no articles)."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def token_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean over examples of the bag-of-words F1 between prediction and target (percent).

    Words are `normalize_words`; an example whose target and prediction both have no words
    scores 100, one where only one of them is empty scores 0.
    """
    _check_lengths(targets, predictions, "predictions")
    if not targets:
        return {"token_f1": 0.0}
    total = 0.0
    for target, prediction in zip(targets, predictions):
        t, p = normalize_words(target), normalize_words(prediction)
        if not t or not p:
            total += float(t == p)
            continue
        common = sum((collections.Counter(t) & collections.Counter(p)).values())
        if common:
            precision, recall = common / len(p), common / len(t)
            total += 2 * precision * recall / (precision + recall)
    return {"token_f1": 100.0 * total / len(targets)}


def mean_log_likelihood(targets: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    """Mean target log-likelihood per example (nats; higher is better)."""
    _check_lengths(targets, scores, "scores")
    if not len(scores):
        return {"mean_log_likelihood": 0.0}
    return {"mean_log_likelihood": float(sum(float(s) for s in scores) / len(scores))}
