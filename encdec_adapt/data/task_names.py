"""Registered seqio task names: the check that names close matches, and a task's vocabularies.

seqio (and with it TensorFlow) is imported inside the functions, on purpose: a synthetic-data
run never imports TensorFlow.
"""

from __future__ import annotations

from encdec_adapt.errors import UnknownTaskError


def check_task_name(name: str) -> None:
    """Raises UnknownTaskError naming close matches when `name` is not a registered task."""
    import seqio  # lazy on purpose: TensorFlow

    tasks, mixtures = seqio.TaskRegistry.names(), seqio.MixtureRegistry.names()
    if name not in tasks and name not in mixtures:
        raise UnknownTaskError(name, tasks, mixtures)


def vocabularies(task: str) -> dict:
    """The seqio vocabulary of each output feature of a task or mixture ({"inputs": ..., ...})."""
    import seqio  # lazy on purpose: TensorFlow

    check_task_name(task)
    features = seqio.get_mixture_or_task(task).output_features
    return {name: feature.vocabulary for name, feature in features.items()}
