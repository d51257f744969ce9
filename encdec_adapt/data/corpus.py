"""The embedded default corpus: English prose and code-search pairs from Python's standard library.

Everything is read from the running interpreter's own standard library with `ast` (nothing is
imported, so no module runs on import) and from `pydoc_data.topics`, so the corpus is identical on
every machine with the same Python version and needs no network.

- `stdlib_prose`: one document per module / class / function docstring, plus every pydoc topic.
- `stdlib_code_search`: (query = docstring summary line, positive = the function's source without
  its docstring, negatives = other functions of the same module and split).

Splits hash the qualified name (`module.Class.function`), so a function and its docstring land in
the same split of both datasets: no function is shared between train, validation and test, and the
prose train split holds no docstring of a validation / test function.

Both are TFDS builders generated on first use into `data_dir()` (`$ENCDEC_ADAPT_TFDS_DIR`, default
`~/.cache/encdec_adapt/tfds/py3.X`), in about ten seconds, and read back from there afterwards.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import pydoc_data.topics  # plain data: a dict of help texts
import sys
import sysconfig
import textwrap
from collections.abc import Iterator

import tensorflow as tf
import tensorflow_datasets as tfds

DATA_DIR_ENV = "ENCDEC_ADAPT_TFDS_DIR"

# Directories / modules that are tests, GUIs, demos, vendored or platform specific. Nothing is
# imported, so side effects on import (antigravity, this) cannot happen; they are skipped because
# their text is not prose (this.py is rot13).
_SKIP_DIRS = frozenset(
    [
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "venv",
        "msilib",
        "distutils",
    ]
)
_SKIP_MODULES = frozenset(
    [
        "antigravity",
        "this",
        "__phello__",
        "__hello__",
        "_osx_support",
        "_aix_support",
        "_bootsubprocess",
        "nturl2path",
        "winreg",
        "_winapi",
        "turtle",
        "_pydecimal",
    ]
)

# Split buckets of a qualified name's hash, out of 100.
SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}
NUM_NEGATIVES = 3
MIN_SUMMARY_WORDS = 3
MIN_DOC_CHARS = 40


def data_dir() -> str:
    """Where the embedded TFDS datasets are generated; one folder per Python minor version."""
    default = os.path.join("~", ".cache", "encdec_adapt", "tfds")
    root = os.path.expanduser(os.environ.get(DATA_DIR_ENV, default))
    return os.path.join(root, f"py{sys.version_info.major}.{sys.version_info.minor}")


def split_of(qualname: str) -> str:
    """'train' | 'validation' | 'test' from a stable hash of the qualified name."""
    bucket = int(hashlib.md5(qualname.encode()).hexdigest()[:8], 16) % 100
    return next(name for name, r in SPLIT_BUCKETS.items() if bucket in r)


def stdlib_files() -> list[tuple[str, str]]:
    """(module name, path) of the standard library's pure-Python modules, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and "-" not in d)
        rel = os.path.relpath(dirpath, root)
        package = [] if rel == "." else rel.split(os.sep)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            parts = package + ([] if name == "__init__.py" else [name[:-3]])
            if not parts or parts[0] in _SKIP_MODULES or any(p.startswith("test") for p in parts):
                continue
            out.append((".".join(parts), os.path.join(dirpath, name)))
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class Function:
    qualname: str
    summary: str  # first line of the docstring
    code: str  # source without the docstring, dedented


def _summary(doc: str) -> str:
    return doc.strip().split("\n\n")[0].split("\n")[0].strip()


def _function_code(node: ast.AST, lines: list[str]) -> str | None:
    """The function's source lines without its docstring, or None when nothing else is left."""
    doc = node.body[0]
    if doc.lineno == node.lineno or len(node.body) == 1:
        return None  # a one-line def or a docstring-only body: no code to retrieve
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    keep = lines[first - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("\n".join(keep)).strip("\n")


def _walk(tree: ast.Module, module: str, lines: list[str]):
    """Yields (qualname, docstring, Function | None) for the module and every class / function."""
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc, None
    stack = [(module, node) for node in tree.body]
    while stack:
        prefix, node = stack.pop(0)
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        qualname = f"{prefix}.{node.name}"
        doc = ast.get_docstring(node)
        fn = None
        if doc and not isinstance(node, ast.ClassDef):
            code = _function_code(node, lines)
            if code and len(_summary(doc).split()) >= MIN_SUMMARY_WORDS:
                fn = Function(qualname, _summary(doc), code)
        if doc:
            yield qualname, doc, fn
        stack.extend((qualname, child) for child in node.body)


@functools.cache
def extract() -> tuple[list[tuple[str, str]], list[Function]]:
    """([(qualname, document)], [Function]) over the whole standard library, in a fixed order."""
    docs, functions = [], []
    for module, path in stdlib_files():
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # e.g. files kept for other Python versions
        lines = source.splitlines()
        for qualname, doc, fn in _walk(tree, module, lines):
            if len(doc) >= MIN_DOC_CHARS:
                docs.append((qualname, doc))
            if fn is not None:
                functions.append(fn)
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        docs.append((f"pydoc_data.topics.{topic}", text.strip()))
    return docs, functions


def prose_examples(split: str) -> Iterator[tuple[str, dict]]:
    for i, (qualname, text) in enumerate(extract()[0]):
        if split_of(qualname) == split:
            yield f"{i:07d}", {"id": qualname, "text": text}


def code_search_examples(split: str) -> Iterator[tuple[str, dict]]:
    """Pairs with up to NUM_NEGATIVES hard negatives: the next functions of the same module."""
    by_module: dict[str, list[Function]] = {}
    for fn in extract()[1]:
        if split_of(fn.qualname) == split:
            by_module.setdefault(fn.qualname.split(".")[0], []).append(fn)
    i = 0
    for fns in by_module.values():
        for j, fn in enumerate(fns):
            others = [fns[(j + k) % len(fns)] for k in range(1, len(fns))]
            negatives = [o.code for o in others if o.code != fn.code][:NUM_NEGATIVES]
            yield (
                f"{i:07d}",
                {
                    "id": fn.qualname,
                    "query": fn.summary,
                    "positive": fn.code,
                    "negatives": negatives,
                },
            )
            i += 1


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # TFDS looks for checksums / metadata files next to a builder's source through
    # importlib_resources, which tensorflow-datasets 4.9.10 uses without declaring it; these
    # builders have no such files, so say so instead of looking.
    code_path = None

    def _generate_examples(self):  # required by the base class; splits use generators
        raise NotImplementedError


class StdlibProse(_EmbeddedBuilder):
    """Docstrings and pydoc topics of the running Python's standard library."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"id": tf.string, "text": tfds.features.Text()}),
            description=f"Standard-library prose of Python {sys.version.split()[0]}.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: prose_examples(split) for split in SPLIT_BUCKETS}


class StdlibCodeSearch(_EmbeddedBuilder):
    """Docstring summary line -> function source (docstring removed), with hard negatives."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tf.string,
                    "query": text,
                    "positive": text,
                    "negatives": tfds.features.Sequence(tfds.features.Text()),
                }
            ),
            description=f"Standard-library code search of Python {sys.version.split()[0]}.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: code_search_examples(split) for split in SPLIT_BUCKETS}


BUILDERS = {"stdlib_prose": StdlibProse, "stdlib_code_search": StdlibCodeSearch}


def builder(name: str, directory: str | None = None) -> tfds.core.DatasetBuilder:
    """The named embedded builder, generated into `directory` (default `data_dir()`) if needed."""
    if name not in BUILDERS:
        raise KeyError(f"unknown embedded dataset {name!r}; known: {sorted(BUILDERS)}")
    b = BUILDERS[name](data_dir=directory or data_dir())
    if not tf.io.gfile.exists(os.path.join(b.data_dir, "dataset_info.json")):
        tfds.disable_progress_bar()  # a few seconds of work: progress bars would only be noise
        try:
            b.download_and_prepare()
        finally:
            tfds.enable_progress_bar()
    return b


def load(name: str, split: str, shuffle_files: bool = False, seed: int | None = None):
    """tf.data.Dataset of the named embedded dataset (a seqio FunctionDataSource dataset_fn)."""
    read_config = tfds.ReadConfig(shuffle_seed=seed)
    return builder(name).as_dataset(
        split=split, shuffle_files=shuffle_files, read_config=read_config
    )
