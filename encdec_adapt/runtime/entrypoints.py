"""What the gin entry points (`train`, `evaluate`, `infer`, `embed`) share: checks of their
arguments and the text files that process 0 writes."""

from __future__ import annotations

import os

import gin
import jax

from encdec_adapt.errors import ConfigError


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
    """Writes `path` (creating its directory) on process 0 only."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
