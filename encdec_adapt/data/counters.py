"""Named counters that tf.data pipelines update and Python reads back: nothing is cut silently.

Preprocessors and feature converters count what they drop or truncate (`empty_documents`,
`too_short`, `truncated/inputs`, `dropped/targets`, `truncated_tokens/inputs`, ...) in int64
tf.Variables. Read them with `COUNTERS.result()` (or your own `Counters` passed to the
preprocessors). tf.data runs ahead of the consumer (prefetch, parallel maps), so a read reflects
the examples produced so far, which may be a few batches more than those consumed.
"""

from __future__ import annotations

import threading

import tensorflow as tf


class Counters:
    """A set of named int64 counters, created on first use (also from inside traced tf.data fns)."""

    def __init__(self):
        self._variables: dict[str, tf.Variable] = {}
        self._lock = threading.Lock()

    def variable(self, name: str) -> tf.Variable:
        with self._lock:
            if name not in self._variables:
                # init_scope lifts creation out of a tf.function / dataset trace into eager mode.
                with tf.init_scope():
                    self._variables[name] = tf.Variable(
                        tf.constant(0, tf.int64), trainable=False, name=name.replace("/", "_")
                    )
            return self._variables[name]

    def add(self, name: str, amount) -> None:
        """Adds `amount` (a Python int or a scalar tensor) to the counter `name`."""
        self.variable(name).assign_add(tf.cast(amount, tf.int64))

    def result(self) -> dict[str, int]:
        return {name: int(v.numpy()) for name, v in sorted(self._variables.items())}

    def reset(self) -> None:
        for v in self._variables.values():
            v.assign(0)


COUNTERS = Counters()  # the process-wide default
