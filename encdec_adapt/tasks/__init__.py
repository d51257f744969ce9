"""seqio task and mixture registrations, one module per family; importing this registers them all.

- `embedded`: the default tasks on the embedded standard-library corpus (no download).
- `c4`: the same recipes on C4 / Wikipedia TFDS datasets for real runs (Gemma tokenizer).

Register your own with one call to `register_pretraining_task` / `register_contrastive_task`.
"""

from encdec_adapt.data.registry import (
    get_dataset,
    get_task_or_mixture,
    register_mixture,
    register_pretraining_task,
)
from encdec_adapt.tasks import c4, embedded
from encdec_adapt.tasks.contrastive import register_contrastive_task

__all__ = [
    "c4",
    "embedded",
    "get_dataset",
    "get_task_or_mixture",
    "register_contrastive_task",
    "register_mixture",
    "register_pretraining_task",
]
