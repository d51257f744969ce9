"""What the gin entry points (`train`, `evaluate`, `infer`, `embed`) share: checks of their
arguments and the text files that process 0 writes."""

from __future__ import annotations

import gin
import jax

from encdec_adapt.data import input_pipeline
from encdec_adapt.errors import ConfigError, InputError
from encdec_adapt.storage import outputs


def require(entry: str, **values) -> None:
    """Values bound to %gin.REQUIRED macros reach the entry point as the sentinel itself:
    raises ConfigError naming the first one (and the macro that feeds it)."""
    for name, value in values.items():
        if value is gin.REQUIRED:
            raise ConfigError(
                f"Missing required value: {entry}.{name}=%gin.REQUIRED (set the macro that "
                f"feeds it on the command line, e.g. --gin.{name.upper()}=...)"
            )


def check_positive(name: str, value) -> None:
    """Raises ConfigError unless `value` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int")


def write_text(path: str, text: str) -> None:
    """Writes `path` whole (temporary name, then rename; its directory created; a bare file name
    is in the working directory) on process 0 only."""
    if jax.process_index() == 0:
        outputs.write_file(path, text)


def check_vocabulary(model, data_cfg, binding: str) -> None:
    """Raises InputError when the data's tokenizer can produce ids the model has no embedding
    row for, before any compute. `binding` names the data setting, e.g. "train.train_data"."""
    name = getattr(data_cfg, "task", None) or getattr(data_cfg, "path", None) or "synthetic"
    check_vocab_size(model, input_pipeline.vocab_size(data_cfg), f"{binding} ({name})")


def check_vocab_size(model, data_size: int | None, what: str) -> None:
    """Raises InputError when a tokenizer of `data_size` ids (`what` names it) feeds a model with
    fewer embedding rows: ids >= the model's vocab_size would be looked up out of range (NaN
    losses, scores and embeddings)."""
    model_size = model.vocab_size()
    if data_size is None or model_size is None or data_size <= model_size:
        return
    raise InputError(
        f"{what}: its tokenizer has {data_size} ids but the model's vocabulary (embedding rows, "
        f"vocab_size) is {model_size}: ids >= {model_size} have no embedding. Use the model's "
        "tokenizer, or a model config with vocab_size >= the tokenizer's"
    )
