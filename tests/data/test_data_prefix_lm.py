"""PrefixLM: random split points that fit, exact reassembly, the KD full-sequence variant."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import seqio
import tensorflow as tf

from encdec_adapt.data import prefix_lm, vocab

LENGTHS = {"inputs": 64, "targets": 32}


def run(docs, seed=0, **kwargs):
    v = vocab.embedded_vocabulary()
    features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    with seqio.utils.map_seed_manager(seed):
        return list(prefix_lm.prefix_lm(ds, LENGTHS, features, **kwargs).as_numpy_iterator())


def docs_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 3900, size=n).astype(np.int32) for n in lengths]


def test_split_points_are_random_and_everything_fits():
    docs = docs_of([20] * 200)
    examples = run(docs)
    splits = [len(ex["inputs"]) for ex in examples]
    assert min(splits) == 1 and max(splits) == 19  # every split point of a short doc occurs
    assert len(set(splits)) == 19
    for ex, doc in zip(examples, docs):
        np.testing.assert_array_equal(np.concatenate([ex["inputs"], ex["targets"]]), doc)


def test_long_documents_are_chunked_and_fit_the_budgets():
    docs = docs_of([1000, 333, 95])
    examples = run(docs, seed=1, mode_token="[S2S]")
    rebuilt = np.concatenate([np.concatenate([e["inputs"][1:], e["targets"]]) for e in examples])
    np.testing.assert_array_equal(rebuilt, np.concatenate(docs))
    for ex in examples:
        assert ex["inputs"][0] == 6  # [S2S]
        assert len(ex["inputs"]) <= LENGTHS["inputs"] - 1  # room for EOS
        assert 1 <= len(ex["targets"]) <= LENGTHS["targets"] - 1


def test_full_sequence_variant_keeps_what_the_teacher_needs():
    for ex in run(docs_of([50, 200]), seed=2, full_sequence=True, mode_token="[S2S]"):
        k = int(ex["split"])
        np.testing.assert_array_equal(ex["full"][:k], ex["inputs"][1:])
        np.testing.assert_array_equal(ex["full"][k:], ex["targets"])


def test_seeds():
    docs = docs_of([40] * 30)
    a, b, c = run(docs, seed=3), run(docs, seed=3), run(docs, seed=4)
    lengths = lambda exs: [len(e["inputs"]) for e in exs]
    assert lengths(a) == lengths(b) and lengths(a) != lengths(c)


def test_chunk_length_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="chunk_length 200"):
        run(docs_of([10]), chunk_length=200)
