"""T5 span corruption: rates, span lengths, sentinels, exact reassembly, seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import sample_stats
import seqio
import tensorflow as tf

from encdec_adapt.data import counters, vocab
from encdec_adapt.data import span_corruption as sc

LENGTHS = {"inputs": 512, "targets": 128}


def features():
    v = vocab.embedded_vocabulary()
    return {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}


def token_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 3900, size=int(n)).astype(np.int32) for n in lengths]


def as_dataset(docs):
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )


def corrupt_all(docs, seed, **kwargs):
    with seqio.utils.map_seed_manager(seed):
        ds = sc.span_corruption(as_dataset(docs), LENGTHS, features(), **kwargs)
    return list(ds.as_numpy_iterator())


def doc_lengths(n, raw, seed=0):
    """Random lengths that never leave a 1-token chunk (those are dropped, not corrupted)."""
    lengths = np.random.default_rng(seed).integers(2, 4 * raw, size=3 * n)
    return [x for x in lengths if x % raw != 1][:n]


def test_noise_density_and_mean_span_length_over_many_examples():
    raw = sc.raw_length(LENGTHS["inputs"] - 1, LENGTHS["targets"] - 1, sc.SpanSpec(), 96)
    docs = token_docs(doc_lengths(150, raw))
    examples = corrupt_all(docs, seed=1)
    noise, spans, tokens = [], [], []  # per example (one chunk each)
    for ex in examples:
        is_sentinel = ex["targets"] >= 4096 - 96
        spans.append(is_sentinel.sum())
        noise.append((~is_sentinel).sum())
        tokens.append(noise[-1] + (ex["inputs"] < 4096 - 96).sum())
    total = sum(len(d) for d in docs)
    assert len(examples) > 300 and sum(tokens) == total
    assert abs(sum(noise) / total - 0.15) <= 0.01, sum(noise) / total
    assert abs(sum(noise) / sum(spans) - 3.0) <= 0.3, sum(noise) / sum(spans)
    # Tolerances from the sample: 4 standard errors. Binomial (as if each token were noised
    # independently: 4 SE ~0.0034 here) ...
    rate = sum(noise) / total
    assert abs(rate - 0.15) <= 4 * sample_stats.binomial_se(sum(noise), total), rate
    # ... and the actual per-chunk spread (randomised rounding of the noise count and the span
    # count: 4 SE ~1.4e-4 on the rate, ~0.012 on the mean span length of 3).
    rate, se = sample_stats.ratio_and_se(noise, tokens)
    assert abs(rate - 0.15) <= 4 * se + 1e-12, (rate, se)
    span, se = sample_stats.ratio_and_se(noise, spans)
    assert abs(span - 3.0) <= 4 * se + 1e-12, (span, se)
    assert se < 0.01, se  # far below the fixed 10% above


def test_inputs_and_targets_reassemble_to_the_original_tokens():
    raw = sc.raw_length(LENGTHS["inputs"] - 1, LENGTHS["targets"] - 1, sc.SpanSpec(), 96)
    docs = token_docs(doc_lengths(40, raw), seed=2)
    examples = corrupt_all(docs, seed=3)
    rebuilt = [sc.uncorrupt(ex["inputs"], ex["targets"], 4096, 96) for ex in examples]
    np.testing.assert_array_equal(np.concatenate(rebuilt), np.concatenate(docs))
    for ex in examples:  # outputs fit with room for EOS: nothing to truncate downstream
        assert len(ex["inputs"]) <= LENGTHS["inputs"] - 1
        assert len(ex["targets"]) <= LENGTHS["targets"] - 1


def test_sentinels_count_down_from_the_top_of_the_vocabulary():
    tokens = tf.constant([10, 11, 12, 13, 14, 15, 16, 17])
    mask = tf.constant([False, False, True, True, False, False, True, False])
    inputs, targets = sc.corrupt(tokens, mask, vocab_size=4096)
    assert inputs.numpy().tolist() == [10, 11, 4095, 14, 15, 4094, 17]
    assert targets.numpy().tolist() == [4095, 12, 13, 4094, 16]
    v = vocab.embedded_vocabulary()
    assert v.decode([vocab.sentinel_id(v, 0)]) == "<extra_id_0>"


def test_mode_token_is_prepended_as_one_id():
    docs = token_docs([300, 40])
    for ex in corrupt_all(docs, seed=0, mode_token="[NLU]"):
        assert ex["inputs"][0] == 4  # "[NLU]" is a user-defined piece of the embedded model
        assert len(ex["inputs"]) <= LENGTHS["inputs"] - 1


def test_same_seed_same_examples_different_seed_different():
    docs = token_docs([700, 300, 1200])
    a, b, c = (corrupt_all(docs, seed=s) for s in (7, 7, 8))
    flat = lambda exs: np.concatenate([np.concatenate([e["inputs"], e["targets"]]) for e in exs])
    np.testing.assert_array_equal(flat(a), flat(b))
    assert len(flat(a)) != len(flat(c)) or not np.array_equal(flat(a), flat(c))


def test_one_token_documents_are_dropped_and_counted():
    own = counters.Counters()
    examples = corrupt_all(token_docs([1, 50, 1]), seed=0, counters=own)
    assert len(examples) == 1
    assert own.result()["too_short"] == 2


def test_raw_length_is_the_longest_chunk_that_fits():
    spec = sc.SpanSpec(0.5, 8.0)
    n = sc.raw_length(200, 100, spec, 96)
    i, t = sc.corrupted_lengths(n, spec, 96)
    assert i <= 200 and t <= 100
    i, t = sc.corrupted_lengths(n + 1, spec, 96)
    assert i > 200 or t > 100


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="noise_density"):
        sc.SpanSpec(noise_density=1.5)
    with pytest.raises(ValueError, match="mean_noise_span_length"):
        sc.SpanSpec(mean_noise_span_length=0.5)
    with pytest.raises(ValueError, match="missing from the inputs"):
        sc.uncorrupt([10, 11], [4095, 12], 4096, 96)


def test_vocabulary_without_extra_ids_is_refused():
    plain = seqio.SentencePieceVocabulary(vocab.EMBEDDED_MODEL, extra_ids=0)
    feats = {"inputs": seqio.Feature(plain), "targets": seqio.Feature(plain)}
    with pytest.raises(ValueError, match="extra_ids=0"):
        sc.span_corruption(as_dataset(token_docs([10])), LENGTHS, feats)
