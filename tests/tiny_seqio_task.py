"""A tiny deterministic seqio task for tests: random token documents, no download.

Registered on import (idempotent) as TASK; gin files can `import tiny_seqio_task` when tests/
is on the path.
"""

import numpy as np
import seqio
import tensorflow as tf

TASK = "tiny_synthetic_lm"
VOCAB = 64


def _dataset(split, shuffle_files=False, seed=None):
    del shuffle_files, seed
    rng = np.random.default_rng(0 if split == "train" else 1)
    docs = [rng.integers(2, VOCAB, rng.integers(5, 30)).astype(np.int32) for _ in range(64)]
    # from_tensor_slices, not from_generator: tf.data can checkpoint it (O(1) data resume)
    ragged = tf.ragged.constant(docs, dtype=tf.int32)
    return tf.data.Dataset.from_tensor_slices(ragged).map(lambda d: {"targets": d})


if TASK not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(_dataset, splits=["train", "validation"]),
        output_features={
            "targets": seqio.Feature(seqio.PassThroughVocabulary(VOCAB, eos_id=1), add_eos=True)
        },
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
    )
