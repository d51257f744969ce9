"""Code identifiers split into words: `read_file` / `readFile` -> `read file` / `read File`.

A small vocabulary cuts `self._read_file(` into pieces that share nothing with the prose word
"read" of a docstring (SentencePiece's word-initial "▁read" is another id than "read" inside an
identifier), so a tiny model has to learn from scratch that they are the same word. Splitting
identifiers first is what code-search baselines (CodeSearchNet's bag-of-words encoders) and the
project's BM25 tokenizer do. The TensorFlow version (for seqio pipelines) and the Python version
(for `encode` on raw texts) give identical strings.
"""

from __future__ import annotations

import re

import seqio
import tensorflow as tf

from encdec_adapt.errors import ConfigError

# Applied in order, each a global non-overlapping left-to-right replacement with the same
# semantics in Python's `re` and RE2 (tf.strings.regex_replace).
_RULES = (
    ("_", " "),
    (r"([A-Z])([A-Z][a-z])", r"\1 \2"),  # HTTPResponse -> HTTP Response
    (r"([a-z0-9])([A-Z])", r"\1 \2"),  # readFile -> read File
)
_COMPILED = tuple((re.compile(p), r) for p, r in _RULES)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def split_identifiers(text: str, lowercase: bool = False) -> str:
    """Python strings: underscores become spaces, camelCase boundaries get a space; then, with
    `lowercase`, ASCII letters are lower-cased (as tf.strings.lower does; other letters keep)."""
    for pattern, rewrite in _COMPILED:
        text = pattern.sub(rewrite, text)
    return text.translate(_ASCII_LOWER) if lowercase else text


def split_identifiers_tf(text: tf.Tensor, lowercase: bool = False) -> tf.Tensor:
    """The same on a string tensor of any shape (elementwise)."""
    for pattern, rewrite in _RULES:
        text = tf.strings.regex_replace(text, pattern, rewrite)
    return tf.strings.lower(text) if lowercase else text


def split_identifiers_source(
    source, keys=("query", "positive", "negatives"), lowercase: bool = False
):
    """A seqio FunctionDataSource over `source` (a FunctionDataSource) with `keys` split.

    Everything that reads the task (training, `embed`'s retrieval split, BM25) then sees the
    same texts.
    """

    def dataset_fn(split, shuffle_files, seed=None):
        ds = source.get_dataset(split=split, shuffle=shuffle_files, seed=seed)

        def apply(ex):
            return {
                k: split_identifiers_tf(v, lowercase) if k in keys else v for k, v in ex.items()
            }

        return ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE)

    return seqio.FunctionDataSource(dataset_fn, splits=source.splits)


# Named text transforms for encoding raw texts the way a task's preprocessing shaped its training
# texts (`TextEncoder(text_transform=...)`, `embed.text_transform`).
TEXT_TRANSFORMS = {
    "split_identifiers": split_identifiers,
    "split_identifiers_lower": lambda text: split_identifiers(text, lowercase=True),
}


def text_transform(name: str | None):
    """A TEXT_TRANSFORMS name -> the str -> str function (None -> None)."""
    if name is None:
        return None
    if name not in TEXT_TRANSFORMS:
        raise ConfigError(f"unknown text transform {name!r}; known: {sorted(TEXT_TRANSFORMS)}")
    return TEXT_TRANSFORMS[name]
