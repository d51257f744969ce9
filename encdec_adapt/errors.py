"""The errors that mean "the user gave something wrong", as opposed to a bug.

`encdec-adapt COMMAND` (cli/main.py) maps them to exit code 2 with one line naming the culprit;
every other exception is an internal error (exit 1, with its traceback). Code that validates a
configuration value or a user's input raises one of these, never a bare ValueError:

  EncdecError           base: bad input of any kind (exit 2)
    ConfigError         a bad gin / config value or binding (`Invalid DecodeConfig: top_p=1.5 ...`)
    InputError          a bad user input: a file's content, a JSONL line, a flag, shapes
      UnknownTaskError  a seqio task / mixture name that is not registered (suggests close names)
    CheckpointError     a missing, unreadable or mismatched checkpoint (names the parameter)
    MissingFileError    a file or directory the user named does not exist (a FileNotFoundError)

and TrainingDiverged (a RuntimeError, exit 1): the updates of `train` stopped being finite;
StoppedBySignal: `train` stopped on SIGINT after saving (its exit code, 130).

ConfigError, InputError and CheckpointError are ValueErrors too, so callers that catch
ValueError keep working. This module imports nothing heavy.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EncdecError(Exception):
    """Bad input or configuration: the message names the culprit (binding, file:line, name)."""


class ConfigError(EncdecError, ValueError):
    """A bad gin / config value or binding, e.g. `Invalid OptimizerConfig: warmup_steps='x'...`.

    Messages name the field as `Class.field=value` or `Invalid Class: field=value` so that the
    command line can point at the gin line that set it.
    """


class InputError(EncdecError, ValueError):
    """Bad user input: a file's content (file:line), a flag value, a name, a shape."""


class CheckpointError(EncdecError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit (names the first parameter)."""


class MissingFileError(EncdecError, FileNotFoundError):
    """A file, directory or preset the user named does not exist."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint.

    Not an EncdecError: the command line exits 1 with the message (no traceback)."""


class StoppedBySignal(Exception):
    """`train` was stopped by a signal that asks for a non-zero exit (SIGINT: 130) after saving
    a checkpoint; the command line prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# Close names: up to this many, at least this similar (difflib ratio).
SUGGESTIONS, SUGGESTION_CUTOFF = 5, 0.5


def close_names(name: str, names: Iterable[str]) -> list[str]:
    """The registered names closest to `name` (the one suggestion rule of the package)."""
    return difflib.get_close_matches(name, list(names), n=SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)


class UnknownTaskError(InputError):
    """A seqio task or mixture name that is not registered; the message lists close names."""

    def __init__(self, name: str, tasks: Iterable[str], mixtures: Iterable[str] = ()):
        tasks, mixtures = sorted(tasks), sorted(mixtures)
        close = close_names(name, tasks + mixtures)
        hint = f"closest registered names: {', '.join(close)}" if close else "no similar names"
        super().__init__(
            f"unknown seqio task or mixture {name!r} ({hint}; {len(tasks)} tasks and "
            f"{len(mixtures)} mixtures are registered, `encdec-adapt tasks` lists them; is the "
            "module that registers it imported, e.g. by the gin file?)"
        )
        self.name, self.close = name, close
