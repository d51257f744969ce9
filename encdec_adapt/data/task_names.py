"""Registered seqio task names: the check that names close matches, and a task's vocabularies.

seqio (and with it TensorFlow) is imported inside the functions, on purpose: a synthetic-data
run never imports TensorFlow.
"""

from __future__ import annotations

import difflib


class UnknownTaskError(ValueError):
    """A seqio task or mixture name that is not registered; the message lists close names."""


def check_task_name(name: str) -> None:
    """Raises UnknownTaskError naming close matches when `name` is not a registered task."""
    import seqio  # lazy on purpose: TensorFlow

    names = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownTaskError(
        f"Unknown seqio task or mixture {name!r} ({len(names)} registered; is the module that "
        f"registers it imported in the gin file?).{hint}"
    )


def vocabularies(task: str) -> dict:
    """The seqio vocabulary of each output feature of a task or mixture ({"inputs": ..., ...})."""
    import seqio  # lazy on purpose: TensorFlow

    check_task_name(task)
    features = seqio.get_mixture_or_task(task).output_features
    return {name: feature.vocabulary for name, feature in features.items()}
