"""Every path the project reads or writes: a local path or a URL of a registered filesystem
(gs://bucket/dir), through etils `epath` (the path library Orbax uses).

Functions take and return strings. A local path behaves as with `os`; a URL goes through epath's
fsspec backend (gcsfs for gs://). `check` refuses, naming it, a URL whose scheme has no backend
installed (s3:// without s3fs) and a malformed one (gs:/bucket): without it such a string would
be taken as a relative local path and create ./gs:/bucket/... .

Why the fsspec backend and not TensorFlow's gfile (epath's default when TensorFlow is installed):
TensorFlow's GCS client has its endpoint compiled in (https://www.googleapis.com), so it cannot be
pointed at a GCS emulator and would stay untested; gcsfs honours STORAGE_EMULATOR_HOST. Setting
EPATH_USE_TF yourself still wins.
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
import re
from collections.abc import Iterator
from typing import IO

# Before epath decides a backend (it caches the choice on first use of a URL).
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath

from encdec_adapt.errors import ConfigError

# scheme -> the module its fsspec filesystem needs (epath knows these schemes).
_BACKENDS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def scheme(path: str) -> str | None:
    """The URL scheme of `path` ("gs"), or None for a local path."""
    m = _URL.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (object store) rather than a local path."""
    return scheme(path) is not None


def check(path: str, what: str = "path") -> str:
    """Returns `path` when it is a local path or a URL this installation can open; raises
    ConfigError naming it otherwise (`what` says which setting it came from)."""
    path = os.fspath(path)
    s = scheme(path)
    if s is None:
        m = _SCHEME_LIKE.match(path)
        if m:
            raise ConfigError(
                f"{what} {path!r} looks like a URL but is malformed (write "
                f"{m.group(1)}://bucket/dir, or ./{path} for a local directory)"
            )
        return path
    module = _BACKENDS.get(s)
    if module is None:
        raise ConfigError(
            f"{what} {path!r}: unsupported scheme {s}:// (supported: local paths, "
            + ", ".join(f"{k}://" for k in _BACKENDS)
            + ")"
        )
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{what} {path!r}: no filesystem for {s}:// is installed (pip install {module})"
        )
    rest = path[len(s) + 3 :]
    if not rest.strip("/") or rest.startswith("/"):
        raise ConfigError(f"{what} {path!r} names no bucket (write {s}://bucket/dir)")
    return path


def epath_of(path: str) -> epath.Path:
    """The epath.Path of a checked `path`."""
    return epath.Path(check(path))


def absolute(path: str) -> str:
    """The absolute form of `path` (a bare file name lives in the working directory); a URL is
    returned as it is, without a trailing slash."""
    path = check(os.fspath(path) if path else ".")
    if is_remote(path):
        return path.rstrip("/") if path.rstrip("/").count("/") > 2 else path
    return os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    """`path`/`parts` ('/' for a URL, os.path.join for a local path)."""
    if is_remote(path):
        return posixpath.join(path, *parts)
    return os.path.join(path, *parts)


def dirname(path: str) -> str:
    """The directory holding `path`."""
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def basename(path: str) -> str:
    """The last part of `path`."""
    return posixpath.basename(path.rstrip("/")) if is_remote(path) else os.path.basename(path)


def exists(path: str) -> bool:
    """Whether `path` exists (a local symlink counts, even dangling)."""
    if is_remote(path):
        return epath_of(path).exists()
    return os.path.lexists(path)


def isdir(path: str) -> bool:
    """Whether `path` is a directory (on an object store: a prefix holding objects)."""
    if is_remote(path):
        return epath_of(path).is_dir()
    return os.path.isdir(path)


def isfile(path: str) -> bool:
    """Whether `path` is a file (an object)."""
    if is_remote(path):
        return epath_of(path).is_file()
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """The names in directory `path`."""
    if is_remote(path):
        return sorted(p.name for p in epath_of(path).iterdir())
    return os.listdir(path)


def walk_files(path: str) -> Iterator[str]:
    """Every file under directory `path`, as paths relative to it ('/'-separated)."""
    if not is_remote(path):
        for root, _, files in os.walk(path):
            rel = os.path.relpath(root, path)
            for name in files:
                yield name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
        return
    # fsspec walks yield the directories without the scheme: "bucket/dir/sub"
    prefix = path.split("://", 1)[1].rstrip("/")
    for dirpath, _, files in epath_of(path).walk():
        rel = os.fspath(dirpath).split("://", 1)[-1].rstrip("/")[len(prefix) :].lstrip("/")
        for name in files:
            yield f"{rel}/{name}" if rel else name


def makedirs(path: str) -> None:
    """Creates directory `path` and its parents (a no-op on an object store, which has none)."""
    if is_remote(path):
        epath_of(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r", encoding: str | None = "utf-8") -> IO:
    """Opens `path` ("r", "rb", "w", "wb"; "a" for a local file only). An object written through
    it appears whole when the file is closed, or not at all."""
    if "b" in mode:
        encoding = None
    if is_remote(path):
        if "a" in mode or "+" in mode:
            raise ValueError(f"{path}: an object store cannot append ({mode!r})")
        return epath_of(path).open(mode, encoding=encoding)
    return open(path, mode, encoding=encoding)


def read_bytes(path: str) -> bytes:
    """The content of file `path`."""
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """The text of file `path` (UTF-8)."""
    with open_file(path, "r") as f:
        return f.read()


def remove(path: str) -> None:
    """Removes file `path`."""
    if is_remote(path):
        epath_of(path).unlink()
    else:
        os.remove(path)


def rmtree(path: str) -> None:
    """Removes directory `path` and everything in it."""
    if is_remote(path):
        epath_of(path).rmtree()
    else:
        import shutil

        shutil.rmtree(path)


def copy_file(src: str, dst: str) -> None:
    """Copies file `src` to `dst` (either may be remote), replacing `dst`."""
    if is_remote(src) or is_remote(dst):
        epath_of(src).copy(epath_of(dst), overwrite=True)
    else:
        import shutil

        shutil.copyfile(src, dst)


def move(src: str, dst: str) -> None:
    """Moves file or directory `src` to the free name `dst`.

    Local: one atomic rename. On an object store there is no rename: every object is copied,
    then the source objects are deleted; a kill in between leaves both (never neither), and
    readers may see `dst` partly copied.
    """
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    if isfile(src):
        copy_file(src, dst)
        remove(src)
        return
    for rel in list(walk_files(src)):
        copy_file(join(src, rel), join(dst, rel))
    rmtree(src)


def local_path(path: str) -> str | None:
    """`path` when it is local (os-level tools such as tf.data can open it), else None."""
    return None if is_remote(path) else path


def create_exclusive(path: str, text: str) -> bool:
    """Writes `text` to `path` only if nothing is there; False when something is.

    Local: O_CREAT|O_EXCL. gs://: an upload with the precondition ifGenerationMatch=0 (the GCS
    JSON API refuses it atomically when the object exists), through google-cloud-storage. Other
    schemes have no such primitive: they check, then write (two writers racing within that gap
    can both succeed).
    """
    if not is_remote(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    if scheme(path) == "gs":
        from google.api_core import exceptions
        from google.cloud import storage

        bucket, _, name = path[len("gs://") :].partition("/")
        blob = storage.Client().bucket(bucket).blob(name)
        try:
            blob.upload_from_string(text, if_generation_match=0)
        except exceptions.PreconditionFailed:
            return False
        return True
    if exists(path):
        return False
    with open_file(path, "w") as f:
        f.write(text)
    return True


class AppendFile:
    """A text file that grows by lines (a log). Local: a file opened for appending. On an object
    store, which cannot append: the whole object is rewritten from a copy in memory at every
    `flush`, so it is always a complete prefix of the log (a run resumed later reads it back and
    goes on)."""

    def __init__(self, path: str):
        self.path = path
        self._local = None
        self._text: list[str] = []
        if is_remote(path):
            if exists(path):
                self._text.append(read_text(path))
        else:
            self._local = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, text: str) -> None:
        if self._local is not None:
            self._local.write(text)
        else:
            self._text.append(text)

    def flush(self) -> None:
        if self._local is not None:
            self._local.flush()
            return
        whole = "".join(self._text)
        self._text = [whole]
        with open_file(self.path, "w") as f:
            f.write(whole)

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        else:
            self.flush()


class MirroredDirectory:
    """A local directory whose files are copied to `remote` on `sync` (for writers that can only
    write local files, such as TensorBoard's event writer on the fsspec backend). For a local
    `remote`, the directory is `remote` itself and `sync` does nothing."""

    def __init__(self, remote: str):
        import tempfile

        self.remote = remote
        if is_remote(remote):
            self.local = tempfile.mkdtemp(prefix="encdec_mirror_")
        else:
            self.local = remote
        self._sizes: dict[str, int] = {}

    def sync(self) -> None:
        """Copies every local file that changed since the last sync to the remote directory."""
        if self.local == self.remote:
            return
        for rel in walk_files(self.local):
            src = os.path.join(self.local, rel)
            size = os.path.getsize(src)
            if self._sizes.get(rel) != size:
                copy_file(src, join(self.remote, rel))
                self._sizes[rel] = size
