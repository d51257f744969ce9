"""A tf.data iterator's position as JSON text: what the trainer checkpoints instead of a count.

`save(iterator)` writes the iterator with `tf.train.Checkpoint` (the public tf.data iterator
checkpointing t5x uses per host) into a temporary directory and returns the files' bytes,
zlib-compressed (the state repeats long op names: about 15x smaller) and base64-encoded, as a
JSON-able dict; `restore(iterator, blob)` writes them back and reads them
into a fresh iterator of the same pipeline. The state holds the pipeline's buffers (shuffle
buffer, packing and prefetch buffers, an in-memory cache being filled) and counters, never the
examples already consumed, so its size and the time to restore it do not grow with the
position.

A pipeline whose source cannot be checkpointed (`tf.data.Dataset.from_generator`, and other
Python-backed sources) makes `save` return None: the caller then falls back to replaying the
batches. Stateful map functions are saved without their state (tf.data's external state policy
IGNORE): the project's only ones are the `counters` statistics, which are not part of the data.
"""

from __future__ import annotations

import base64
import os
import tempfile
import zlib

import tensorflow as tf

_PREFIX = "iterator"


def options() -> tf.data.Options:
    """The options a checkpointable pipeline needs (apply with `ds.with_options`)."""
    opts = tf.data.Options()
    # The counters' tf.Variables are external state; without this tf.data refuses to save.
    opts.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return opts


class NotCheckpointable(Exception):
    """The pipeline has an op tf.data cannot checkpoint (message: TensorFlow's reason)."""


class StateMismatch(Exception):
    """A saved state that cannot be read into this pipeline (message: the reason)."""


def save(iterator) -> dict[str, str]:
    """The state of a tf.data iterator (`iter(dataset)`) as {file suffix: base64 of the
    zlib-compressed file}.

    Raises NotCheckpointable when tf.data cannot save this pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, _PREFIX)
        try:
            tf.train.Checkpoint(iterator=iterator).write(prefix)
        except (tf.errors.UnimplementedError, tf.errors.FailedPreconditionError) as e:
            raise NotCheckpointable(e.message.split("[Op:")[0].strip()) from None
        out = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                out[name[len(_PREFIX) :]] = base64.b64encode(zlib.compress(f.read())).decode(
                    "ascii"
                )
        return out


def restore(iterator, blob: dict[str, str]) -> None:
    """Sets a fresh iterator of the same pipeline to the state `save` returned.

    Raises StateMismatch when the state is damaged or does not fit the pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for suffix, text in blob.items():
                if "/" in suffix or os.sep in suffix:
                    raise ValueError(f"bad iterator state file name {suffix!r}")
                with open(os.path.join(tmp, _PREFIX + suffix), "wb") as f:
                    f.write(zlib.decompress(base64.b64decode(text)))
            checkpoint = tf.train.Checkpoint(iterator=iterator)
            checkpoint.read(os.path.join(tmp, _PREFIX)).assert_consumed()
        except (tf.errors.OpError, ValueError, AssertionError, zlib.error, AttributeError) as e:
            raise StateMismatch(str(e).splitlines()[0][:300] if str(e) else type(e).__name__) from e
