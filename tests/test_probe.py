"""experiments.probe: retrieval scored as `encdec-adapt embed` scores it, and the pooling."""

import numpy as np
import pytest
import retrieval_reference

from encdec_adapt.evaluation.retrieval_metrics import RetrievalSplit
from experiments import probe


def _pairs(n, duplicate_last=False):
    pairs = [{"query": f"q{i}", "positive": f"def f{i}(): pass", "negatives": []} for i in range(n)]
    if duplicate_last:
        pairs[-1]["positive"] = pairs[0]["positive"]
    return pairs


def test_retrieval_matches_retrieval_split_and_dedups_positives():
    rng = np.random.default_rng(0)
    pairs = _pairs(40, duplicate_last=True)
    d = rng.normal(size=(40, 8)).astype(np.float32)
    d[-1] = d[0]  # the same text embeds the same way
    q = (d + 2.0 * rng.normal(size=(40, 8))).astype(np.float32)  # near their positives
    got = probe.retrieval(pairs, q, d)
    split = RetrievalSplit.from_pairs("x", [(p["query"], p["positive"]) for p in pairs])
    assert len(split.documents) == 39
    # By hand: 39 distinct documents (the last pair's positive is document 0).
    ranks = retrieval_reference.positive_ranks(q, d[:39], [*range(39), 0])
    assert np.sum(ranks == 1) > 1 and np.sum((ranks > 1) & (ranks <= 10)) > 1
    assert np.sum(ranks > 10) > 0  # hits, near misses and misses
    want = retrieval_reference.metrics_from_ranks(ranks)
    assert set(got) == {"ndcg@10", "recall@1", "mrr@10"}
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k


def test_retrieval_perfect_and_chance_depend_on_the_candidate_count():
    pairs = _pairs(16)
    eye = np.eye(16, dtype=np.float32)
    assert probe.retrieval(pairs, eye, eye)["ndcg@10"] == 1.0
    # Random embeddings: nDCG@10 is ~0.3 among 16 candidates but ~0.02 among 1000, which is
    # why a 16-pair smoke probe read 0.40 while `encdec-adapt embed` read 0.017.
    rng = np.random.default_rng(1)

    def chance(n):
        x = rng.normal(size=(n, 32)).astype(np.float32)
        y = rng.normal(size=(n, 32)).astype(np.float32)
        return probe.retrieval(_pairs(n), x, y)["ndcg@10"]

    assert 0.15 < chance(16) < 0.5
    assert chance(1000) < 0.05


def test_mean_pooling_ignores_padding():
    def encode(tokens):  # [B, L] -> [B, L, 2]: padding gets a huge state that must not count
        t = np.asarray(tokens, np.float32)
        return np.stack([np.where(t == 0, 1e6, 1.0), np.where(t == 0, -1e6, t)], -1)

    tokens = np.array([[3, 0, 0, 0], [3, 3, 0, 0]], np.int32)
    pooled = probe.mean_pooled(encode, tokens, batch_size=4)
    np.testing.assert_allclose(pooled[0], pooled[1], rtol=1e-6)
    np.testing.assert_allclose(pooled[0], np.array([1.0, 3.0]) / np.sqrt(10.0), rtol=1e-6)
