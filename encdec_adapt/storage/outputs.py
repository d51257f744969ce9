"""Every output the project writes appears whole or not at all.

A file is written under a temporary name beside its target and renamed into place; a directory
(params checkpoint, HF model directory, embeddings) is built under a temporary name and swapped
in. `--overwrite` replaces only a directory of the kind the command writes (`Kind`): the old
directory is moved aside, the new one renamed into place, and only then is the old one removed,
so a kill at any moment leaves the old output, the new one, or both (the old one under
`NAME.old-*`), never neither. An output that names one of the command's inputs is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid
from collections.abc import Callable, Iterator

from encdec_adapt.errors import CheckpointError, InputError


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of output directory: `name` for messages, `recognise(path)` says whether an
    existing directory is one (only those are replaced with overwrite)."""

    name: str
    recognise: Callable[[str], bool]


def _unique(path: str, tag: str) -> str:
    return f"{path}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def absolute(path: str) -> str:
    """The absolute form of an output path (a bare file name lives in the working directory)."""
    return os.path.abspath(path or ".")


def check_not_input(output: str, *inputs: str | None) -> None:
    """Raises InputError when `output` is (or contains, or lies inside) one of `inputs`: writing
    it would destroy what the command reads."""
    out = os.path.realpath(absolute(output))
    for given in inputs:
        if not given:
            continue
        src = os.path.realpath(absolute(given))
        if out == src or src.startswith(out + os.sep) or out.startswith(src + os.sep):
            raise InputError(
                f"output {output} is the same as, or overlaps, the input {given}: choose "
                "another output path"
            )


def check_target(path: str, overwrite: bool, kind: Kind | None = None) -> None:
    """Raises CheckpointError when `path` exists and may not be replaced: without `overwrite`,
    or (with it) when it is not a `kind` output (a user's directory or file is never removed).
    Commands call it before any slow work, so a bad output fails fast."""
    if not os.path.lexists(path) or _empty_dir(path):
        return
    if not overwrite:
        raise CheckpointError(f"{path} already exists (pass --overwrite to replace it)")
    if kind is not None and not kind.recognise(path):
        raise CheckpointError(
            f"{path} exists and is not a {kind.name}: --overwrite replaces only a {kind.name} "
            "(remove it yourself, or choose another output)"
        )
    if kind is None and os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory: --overwrite replaces only a file")


def _empty_dir(path: str) -> bool:
    # A user may create the output directory first: an empty one is as good as none.
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _swap_in(tmp: str, path: str) -> None:
    """Moves the finished `tmp` to `path`; an existing `path` is moved aside first and removed
    only after the new one is in place."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    if _empty_dir(path):
        os.rmdir(path)
        os.replace(tmp, path)
        return
    old = _unique(path, "old")
    os.replace(path, old)
    os.replace(tmp, path)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


@contextlib.contextmanager
def new_directory(path: str, *, overwrite: bool, kind: Kind) -> Iterator[str]:
    """Yields a temporary directory to fill; on success it becomes `path` (replacing an older
    `kind` output when `overwrite`); on error it is removed and `path` is untouched."""
    path = absolute(path)
    check_target(path, overwrite, kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _unique(path, "tmp")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_target(path, overwrite, kind)  # something may have appeared meanwhile
    _swap_in(tmp, path)


def write_file(path: str, data: str | bytes, *, overwrite: bool = True) -> None:
    """Writes a whole file atomically (temporary name in the same directory, then rename)."""
    path = absolute(path)
    check_target(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _unique(path, "tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
