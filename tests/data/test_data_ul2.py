"""UL2 mixture of denoisers: per-denoiser rates / span lengths, mode tokens, reassembly, config."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import collections

import gin
import numpy as np
import pytest
import sample_stats
import seqio
import tensorflow as tf

from encdec_adapt.data import prefix_lm, ul2, vocab
from encdec_adapt.data import span_corruption as sc

LENGTHS = {"inputs": 512, "targets": 128}
MODE_IDS = {"[NLU]": 4, "[NLG]": 5, "[S2S]": 6}


def features():
    v = vocab.embedded_vocabulary()
    return {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}


def chunk_lengths(config):
    """Each denoiser's chunk length, as ul2() computes it (budgets: EOS and one mode id)."""
    budget_in, budget_tg = LENGTHS["inputs"] - 2, LENGTHS["targets"] - 1
    out = []
    for d in config.denoisers():
        if d.span is None:
            out.append(prefix_lm.default_chunk_length(budget_in, budget_tg))
        else:
            out.append(sc.raw_length(budget_in, budget_tg, d.span, 96))
    return out


def run(config, num_docs, seed, data_seed=None):
    """UL2 over documents of whole first-level chunks; returns (docs, examples)."""
    top = max(chunk_lengths(config))
    rng = np.random.default_rng(seed if data_seed is None else data_seed)
    docs = [
        rng.integers(10, 3900, size=top * int(k)).astype(np.int32)
        for k in rng.integers(1, 4, num_docs)
    ]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    with seqio.utils.map_seed_manager(seed):
        out = ul2.ul2(ds, LENGTHS, features(), config=config)
    return docs, list(out.as_numpy_iterator())


def reassemble(ex, denoiser):
    inputs = ex["inputs"][1:]  # without the mode token
    if denoiser.span is None:
        return np.concatenate([inputs, ex["targets"]])
    return sc.uncorrupt(inputs, ex["targets"], 4096, 96)


def test_each_denoiser_hits_its_rate_span_length_and_mode_token():
    config = ul2.UL2Config()
    lengths = chunk_lengths(config)
    _, examples = run(config, num_docs=500, seed=0)
    denoisers = config.denoisers()
    stats = collections.defaultdict(lambda: np.zeros(3))  # noise tokens, spans, tokens
    per_chunk = collections.defaultdict(list)  # the same, per whole chunk
    seen = collections.Counter()
    for ex in examples:
        d = denoisers[ex["denoiser"]]
        seen[d.name] += 1
        assert ex["inputs"][0] == MODE_IDS[d.mode_token], d.name
        assert len(ex["inputs"]) <= LENGTHS["inputs"] - 1
        assert len(ex["targets"]) <= LENGTHS["targets"] - 1
        original = reassemble(ex, d)
        # Rates are measured on whole chunks: a document's last piece can be shorter than one
        # span of 64 tokens, which no corruption of it could match.
        if d.span is not None and len(original) == lengths[ex["denoiser"]]:
            sentinel = ex["targets"] >= 4096 - 96
            stats[d.name] += [(~sentinel).sum(), sentinel.sum(), len(original)]
            per_chunk[d.name].append([(~sentinel).sum(), sentinel.sum(), len(original)])
    assert set(seen) == {d.name for d in denoisers}
    for d in denoisers:
        if d.span is None:
            continue
        noise, spans, tokens = stats[d.name]
        assert spans >= 40, (d.name, spans)
        rate, span = noise / tokens, noise / spans
        assert abs(rate - d.span.noise_density) <= 0.01, (d.name, rate)
        mean = d.span.mean_noise_span_length
        assert abs(span - mean) <= 0.1 * mean, (d.name, span)
        # Tolerances from the sample: 4 standard errors, binomial for the rate, and the spread
        # of the per-chunk counts (randomised rounding) for the rate and the mean span length.
        assert abs(rate - d.span.noise_density) <= 4 * sample_stats.binomial_se(noise, tokens)
        chunk_noise, chunk_spans, chunk_tokens = np.asarray(per_chunk[d.name]).T
        rate, se = sample_stats.ratio_and_se(chunk_noise, chunk_tokens)
        assert abs(rate - d.span.noise_density) <= 4 * se + 1e-12, (d.name, rate, se)
        span, se = sample_stats.ratio_and_se(chunk_noise, chunk_spans)
        assert abs(span - mean) <= 4 * se + 1e-12, (d.name, span, se)


def test_every_denoiser_reassembles_exactly():
    config = ul2.UL2Config()
    lengths = chunk_lengths(config)
    assert all(max(lengths) % n != 1 for n in lengths)  # no 1-token piece is dropped here
    docs, examples = run(config, num_docs=60, seed=1)
    denoisers = config.denoisers()
    rebuilt = [reassemble(ex, denoisers[ex["denoiser"]]) for ex in examples]
    np.testing.assert_array_equal(np.concatenate(rebuilt), np.concatenate(docs))


def test_s_denoiser_splits_at_random_points():
    config = ul2.UL2Config(r_spans=(), x_spans=())
    _, examples = run(config, num_docs=60, seed=2)
    prefix_lengths = {len(ex["inputs"]) - 1 for ex in examples}
    assert all(ex["inputs"][0] == MODE_IDS["[S2S]"] for ex in examples)
    assert len(prefix_lengths) > 20


def test_same_seed_same_examples_different_seed_different():
    config = ul2.UL2Config()
    _, a = run(config, 20, seed=5, data_seed=0)
    _, b = run(config, 20, seed=5, data_seed=0)
    _, c = run(config, 20, seed=6, data_seed=0)
    assert [e["denoiser"] for e in a] == [e["denoiser"] for e in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    flat = lambda exs: [e["inputs"].tolist() + e["targets"].tolist() for e in exs]
    assert flat(a) != flat(c)


def test_weights_pick_the_denoisers():
    config = ul2.UL2Config(weights=(0, 0, 1, 0, 0, 0, 3))
    _, examples = run(config, 80, seed=3)
    names = collections.Counter(config.denoisers()[e["denoiser"]].name for e in examples)
    assert set(names) == {"X(3,0.5)", "S"}


def test_gin_binds_rates_lengths_and_weights():
    gin.clear_config()
    try:
        gin.parse_config(
            "UL2Config.r_spans = [[5, 0.2]]\n"
            "UL2Config.x_spans = []\n"
            "UL2Config.use_s_denoiser = False\n"
            "UL2Config.weights = [2]\n"
        )
        config = ul2.UL2Config()
    finally:
        gin.clear_config()
    (d,) = config.denoisers()
    assert d.span == sc.SpanSpec(0.2, 5.0) and d.weight == 2.0 and d.mode_token == "[NLU]"


def test_bad_weights_name_the_denoisers():
    with pytest.raises(ValueError, match="one per denoiser"):
        ul2.UL2Config(weights=(1, 2)).denoisers()
