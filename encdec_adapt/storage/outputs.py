"""Every output the project writes appears whole or not at all.

A file is written under a temporary name beside its target and renamed into place; a directory
(params checkpoint, HF model directory, embeddings) is built under a temporary name and swapped
in. `--overwrite` replaces only a directory of the kind the command writes (`Kind`): the old
directory is moved aside, the new one renamed into place, and only then is the old one removed,
so a kill at any moment leaves the old output, the new one, or both (the old one under
`NAME.old-*`), never neither. An output that names one of the command's inputs is refused.

Outputs may be URLs (gs://bucket/dir, `paths`). An object store has no rename: a "rename" is a
copy of every object then the deletion of the source (`paths.move`). What remains atomic there:
each object (a file) appears whole or not at all, so `write_file` is still all-or-nothing; a
directory is built under its temporary name and copied into place, so a kill during the copy can
leave `path` partly filled next to the complete temporary one (never neither), and a reader
racing the copy may see some of its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator

from encdec_adapt.errors import CheckpointError, InputError
from encdec_adapt.storage import paths


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of output directory: `name` for messages, `recognise(path)` says whether an
    existing directory is one (only those are replaced with overwrite)."""

    name: str
    recognise: Callable[[str], bool]


def _unique(path: str, tag: str) -> str:
    return f"{path}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def absolute(path: str) -> str:
    """The absolute form of an output path (a bare file name lives in the working directory; a
    URL is kept as it is). Raises ConfigError for an unsupported URL."""
    return paths.absolute(path or ".")


def _real(path: str) -> str:
    return path if paths.is_remote(path) else os.path.realpath(path)


def check_not_input(output: str, *inputs: str | None) -> None:
    """Raises InputError when `output` is (or contains, or lies inside) one of `inputs`: writing
    it would destroy what the command reads."""
    out = _real(absolute(output))
    for given in inputs:
        if not given:
            continue
        src = _real(absolute(given))
        if out == src or src.startswith(out + "/") or out.startswith(src + "/"):
            raise InputError(
                f"output {output} is the same as, or overlaps, the input {given}: choose "
                "another output path"
            )


def check_target(path: str, overwrite: bool, kind: Kind | None = None) -> None:
    """Raises CheckpointError when `path` exists and may not be replaced: without `overwrite`,
    or (with it) when it is not a `kind` output (a user's directory or file is never removed).
    Commands call it before any slow work, so a bad output fails fast."""
    if not paths.exists(path) or _empty_dir(path):
        return
    if not overwrite:
        raise CheckpointError(f"{path} already exists (pass --overwrite to replace it)")
    if kind is not None and not kind.recognise(path):
        raise CheckpointError(
            f"{path} exists and is not a {kind.name}: --overwrite replaces only a {kind.name} "
            "(remove it yourself, or choose another output)"
        )
    if kind is None and paths.isdir(path):
        raise CheckpointError(f"{path} is a directory: --overwrite replaces only a file")


def _empty_dir(path: str) -> bool:
    # A user may create the output directory first: an empty one is as good as none.
    if paths.is_remote(path):
        return False  # an object store has no empty directories
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _swap_in(tmp: str, path: str) -> None:
    """Moves the finished `tmp` to `path`; an existing `path` is moved aside first and removed
    only after the new one is in place."""
    if not paths.exists(path):
        paths.move(tmp, path)
        return
    if _empty_dir(path):
        os.rmdir(path)
        os.replace(tmp, path)
        return
    old = _unique(path, "old")
    paths.move(path, old)
    paths.move(tmp, path)
    if paths.isdir(old) and not os.path.islink(old):
        paths.rmtree(old)
    else:
        paths.remove(old)


@contextlib.contextmanager
def new_directory(path: str, *, overwrite: bool, kind: Kind) -> Iterator[str]:
    """Yields a temporary directory to fill; on success it becomes `path` (replacing an older
    `kind` output when `overwrite`); on error it is removed and `path` is untouched."""
    path = absolute(path)
    check_target(path, overwrite, kind)
    paths.makedirs(paths.dirname(path))
    tmp = _unique(path, "tmp")
    paths.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            if paths.exists(tmp):
                paths.rmtree(tmp)
        raise
    check_target(path, overwrite, kind)  # something may have appeared meanwhile
    _swap_in(tmp, path)


def write_file(path: str, data: str | bytes, *, overwrite: bool = True) -> None:
    """Writes a whole file atomically (temporary name in the same directory, then rename)."""
    path = absolute(path)
    check_target(path, overwrite)
    paths.makedirs(paths.dirname(path))
    mode = "wb" if isinstance(data, bytes) else "w"
    if paths.is_remote(path):
        # One object is written whole or not at all: no temporary name needed (and a rename
        # would be a second copy).
        with paths.open_file(path, mode) as f:
            f.write(data)
        return
    tmp = _unique(path, "tmp")
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
