"""Text-level preprocessors shared by every task: drop (and count) empty documents."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from encdec_adapt.data import counters as counters_lib


def drop_empty(
    ds: tf.data.Dataset,
    features: Sequence[str] = ("targets",),
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """Drops examples where any of `features` (strings) is empty or whitespace; counts them as
    `empty_documents`."""
    counters = counters or counters_lib.COUNTERS

    def check(ex):
        empty = tf.constant(False)
        for name in features:
            if name not in ex:
                raise KeyError(f"drop_empty: feature {name!r} not in the example {sorted(ex)}")
            empty |= tf.strings.length(tf.strings.strip(ex[name])) == 0
        counters.add("empty_documents", tf.cast(empty, tf.int64))
        return ex, ~empty

    return keep_flagged(ds.map(check))


def keep_flagged(ds: tf.data.Dataset) -> tf.data.Dataset:
    """A dataset of (example, keep) pairs -> the examples whose `keep` is True."""
    return ds.filter(_flag).map(_example)


def _flag(ex, keep):
    return keep


def _example(ex, keep):
    return ex
