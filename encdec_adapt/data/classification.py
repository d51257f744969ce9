"""Sequence-classification examples for encoder classifiers: {"inputs": text, "label": int}.

`module_topic`: which standard-library package a docstring summary comes from (TOPICS, the
8 packages with the most documented functions; examples of other packages are dropped and
counted as `other_topic`). A single-text task a linear head over pooled states can learn.

`code_match` turns code-search pairs into a binary task: does this function implement this
docstring summary? Each source example with at least one hard negative gives two examples,
query + separator + its own function (label 1) and query + separator + its first hard negative
(another function of the same module, label 0), so the classes are balanced and the negative is
hard (same module, similar names and imports). Examples without negatives are dropped and
counted as `too_few_negatives`.

With `negative="other"` the negative is instead the function of the example `OTHER_OFFSET`
places further in the source (wrapping around): almost always another module, so the task is
easier (names and vocabulary differ); every source example is kept.
"""

from __future__ import annotations

import tensorflow as tf

from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import text
from encdec_adapt.errors import ConfigError

SEPARATOR = " | code: "
NEGATIVES = ("hard", "other")
TOPICS = (
    "asyncio",
    "email",
    "importlib",
    "logging",
    "mailbox",
    "multiprocessing",
    "xml",
    "unittest",
)
OTHER_OFFSET = 97  # > the functions of almost every module, so the partner is in another one


def code_match(
    ds: tf.data.Dataset,
    prompt: str = "task: code match | query: ",
    separator: str = SEPARATOR,
    query_key: str = "query",
    positive_key: str = "positive",
    negatives_key: str = "negatives",
    negative: str = "hard",
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """(query, positive, negatives) strings -> two {"inputs", "label"} examples each.

    negative: "hard" (the first hard negative) or "other" (another example's function).
    """
    if negative not in NEGATIVES:
        raise ConfigError(f"code_match: negative={negative!r}; choose from {NEGATIVES}")
    counters = counters or counters_lib.COUNTERS
    ds = ds.map(
        lambda ex: {k: ex[k] for k in (query_key, positive_key, negatives_key)},
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    ds = text.drop_empty(ds, (query_key, positive_key), counters)
    if negative == "other":
        return _other_function_pairs(ds, prompt, separator, query_key, positive_key)

    def enough(ex):
        none = tf.size(ex[negatives_key]) < 1
        counters.add("too_few_negatives", tf.cast(none, tf.int64))
        return ex, ~none

    ds = text.keep_flagged(ds.map(enough))

    def pair(ex):
        head = tf.strings.join([prompt, ex[query_key], separator])
        inputs = tf.stack(
            [
                tf.strings.join([head, ex[positive_key]]),
                tf.strings.join([head, ex[negatives_key][0]]),
            ]
        )
        return tf.data.Dataset.from_tensor_slices(
            {"inputs": inputs, "label": tf.constant([1, 0], tf.int64)}
        )

    return ds.flat_map(pair)


def _other_function_pairs(ds, prompt, separator, query_key, positive_key):
    """Pairs whose negative is the function of the example OTHER_OFFSET places on (rotated)."""
    rotated = ds.skip(OTHER_OFFSET).concatenate(ds.take(OTHER_OFFSET))

    def pair(ex, other):
        head = tf.strings.join([prompt, ex[query_key], separator])
        inputs = tf.stack(
            [
                tf.strings.join([head, ex[positive_key]]),
                tf.strings.join([head, other[positive_key]]),
            ]
        )
        return tf.data.Dataset.from_tensor_slices(
            {"inputs": inputs, "label": tf.constant([1, 0], tf.int64)}
        )

    return tf.data.Dataset.zip(ds, rotated).flat_map(pair)


def module_topic(
    ds: tf.data.Dataset,
    topics: tuple[str, ...] = TOPICS,
    prompt: str = "task: module | query: ",
    text_key: str = "query",
    id_key: str = "id",
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """{id: "package.module.function", query: summary} -> {"inputs": prompt + summary, "label":
    index of the top-level package in `topics`}; other packages are dropped (counted)."""
    counters = counters or counters_lib.COUNTERS
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(topics)), tf.range(len(topics), dtype=tf.int64)
        ),
        default_value=-1,
    )
    ds = ds.map(lambda ex: {"text": ex[text_key], "id": ex[id_key]})
    ds = text.drop_empty(ds, ("text",), counters)

    def labelled(ex):
        label = table.lookup(tf.strings.split(ex["id"], ".")[0])
        other = label < 0
        counters.add("other_topic", tf.cast(other, tf.int64))
        return {"inputs": tf.strings.join([prompt, ex["text"]]), "label": label}, ~other

    return text.keep_flagged(ds.map(labelled))
