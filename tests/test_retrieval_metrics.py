"""Retrieval metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from encdec_adapt.evaluation import retrieval_metrics as rm


def test_ndcg_hand_computed():
    relevant = {"a": 1.0, "b": 2.0}
    ranked = ["x", "b", "y", "a"]
    dcg = 2.0 / math.log2(3) + 1.0 / math.log2(5)
    idcg = 2.0 / math.log2(2) + 1.0 / math.log2(3)
    assert rm.ndcg_at_k(relevant, ranked, 10) == pytest.approx(dcg / idcg)
    assert rm.ndcg_at_k(relevant, ["b", "a"], 10) == pytest.approx(1.0)
    assert rm.ndcg_at_k(relevant, ["x", "y", "b"], 2) == 0.0


def test_recall_and_mrr():
    relevant = {"a": 1.0, "b": 1.0}
    assert rm.recall_at_k(relevant, ["a", "x", "b"], 1) == 0.5
    assert rm.recall_at_k(relevant, ["a", "x", "b"], 3) == 1.0
    assert rm.mrr_at_k(relevant, ["x", "y", "b"], 10) == pytest.approx(1 / 3)
    assert rm.mrr_at_k(relevant, ["x", "y", "b"], 2) == 0.0


def test_evaluate_averages_and_counts_missing_queries():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    out = rm.evaluate(qrels, {"q1": ["d1", "d2"]})
    assert out["recall@1"] == 0.5 and out["mrr@10"] == 0.5 and out["ndcg@10"] == 0.5
    with pytest.raises(ValueError, match="qrels is empty"):
        rm.evaluate({}, {})


def test_top_k_exact_and_stable():
    docs = np.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    queries = np.asarray([[1.0, 0.1], [0.0, 1.0]])
    assert rm.top_k(queries, docs, ["a", "b", "c"], k=2) == [["a", "c"], ["b", "a"]]


# ---- against scikit-learn on random rankings with more than 100 candidates -------------------
#
# scikit-learn's ndcg_score is the independent reference for nDCG: its gain is the relevance
# grade itself (linear, as here) and its discount 1 / log_b(rank + 1) with log_base=2 (as here);
# `test_sklearn_ndcg_conventions` pins both on a hand case, so a change of its defaults fails
# loudly instead of silently changing the reference. Its ties are averaged (ignore_ties=False)
# while `rank_scores` breaks them by document order, so the tests give it scores without ties:
# continuous ones, or, for tied scores, each document's position in the stable order.
# Recall@k and MRR@10 are checked against plain numpy over the same positions, and in the one-
# relevant-document case against scikit-learn's top_k_accuracy_score and
# label_ranking_average_precision_score (= 1 / rank with one relevant label).


def _stable_order(scores: np.ndarray) -> np.ndarray:
    """Document indices best first, a tie going to the earlier document."""
    return np.argsort(-scores, kind="stable")


def _strict_scores(scores: np.ndarray) -> np.ndarray:
    """Scores without ties that rank like `_stable_order`."""
    out = np.empty(len(scores))
    out[_stable_order(scores)] = -np.arange(len(scores), dtype=np.float64)
    return out


def _numpy_recall_mrr(grades: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    relevant = grades > 0
    hits = relevant[_stable_order(scores)]  # [N] bool, best first
    out = {
        f"recall@{k}": hits[:k].sum() / relevant.sum() if relevant.any() else 0.0
        for k in (1, 10, 100)
    }
    first = np.flatnonzero(hits[:10])
    out["mrr@10"] = 1.0 / (first[0] + 1) if len(first) else 0.0
    return out


def _random_queries(rng, num_queries: int, tied: bool):
    """(grades [N], scores [N]) per query, N in 101..300, graded relevance 0..3 on a few
    documents (some queries with none), scores that favour relevant documents so that the
    metrics are neither all 0 nor all 1."""
    out = []
    for _ in range(num_queries):
        n = int(rng.integers(101, 301))
        grades = np.zeros(n)
        num_relevant = int(rng.integers(0, 16))
        grades[rng.choice(n, num_relevant, replace=False)] = rng.integers(1, 4, num_relevant)
        scores = rng.normal(size=n) + 0.7 * grades
        if tied:
            scores = np.round(scores)  # a handful of distinct values: many ties
        out.append((grades, scores))
    return out


def test_sklearn_ndcg_conventions():
    from sklearn.metrics import ndcg_score

    grades, scores = np.asarray([[3.0, 0.0, 1.0, 2.0]]), np.asarray([[0.1, 0.4, 0.3, 0.2]])
    # ranking: d1 (0), d2 (1), d3 (2), d0 (3); linear gain, 1 / log2(rank + 1) discount
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 2 / math.log2(4) + 3 / math.log2(5)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_score(grades, scores) == pytest.approx(dcg / idcg, rel=1e-12)
    dcg3 = 1 / math.log2(3) + 2 / math.log2(4)
    assert ndcg_score(grades, scores, k=3) == pytest.approx(dcg3 / idcg, rel=1e-12)
    relevant = {"d0": 3.0, "d2": 1.0, "d3": 2.0}
    assert rm.ndcg_at_k(relevant, ["d1", "d2", "d3", "d0"], 3) == pytest.approx(dcg3 / idcg)


@pytest.mark.parametrize("tied", [False, True], ids=["continuous", "tied"])
def test_metrics_match_sklearn_and_numpy_on_random_rankings(tied):
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(7 + tied)
    queries = _random_queries(rng, 300, tied)
    qrels, ranked, want = {}, {}, {name: [] for name in rm.METRICS}
    for i, (grades, scores) in enumerate(queries):
        ids = [f"d{j}" for j in range(len(grades))]
        qrels[f"q{i}"] = {ids[j]: float(g) for j, g in enumerate(grades) if g > 0}
        ranked[f"q{i}"] = rm.rank_scores(scores[None], ids, k=100)[0]
        # the project's per-query nDCG against scikit-learn's, query by query
        ref = ndcg_score(grades[None], _strict_scores(scores)[None], k=10) if grades.any() else 0.0
        got = rm.ndcg_at_k(qrels[f"q{i}"], ranked[f"q{i}"], 10)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12), i
        want["ndcg@10"].append(ref)
        for name, value in _numpy_recall_mrr(grades, scores).items():
            want[name].append(value)
    if tied:  # the ties are real: scikit-learn's tie averaging would give other numbers
        tie_averaged = [ndcg_score(g[None], s[None], k=10) for g, s in queries if g.any()]
        assert not np.allclose(
            tie_averaged, [w for w, (g, _) in zip(want["ndcg@10"], queries) if g.any()]
        )
    got = rm.evaluate(qrels, ranked)
    for name in rm.METRICS:
        assert got[name] == pytest.approx(np.mean(want[name]), rel=1e-9), name
        assert 0.05 < got[name] < 0.95, (name, got[name])  # neither trivially 0 nor 1


def test_single_relevant_split_matches_sklearn():
    from sklearn.metrics import (
        label_ranking_average_precision_score,
        ndcg_score,
        top_k_accuracy_score,
    )

    rng = np.random.default_rng(11)
    num_queries, num_docs = 300, 150
    positives = rng.integers(0, num_docs, num_queries)
    scores = rng.normal(size=(num_queries, num_docs))
    scores[np.arange(num_queries), positives] += rng.uniform(0.0, 3.5, num_queries)
    split = rm.RetrievalSplit(
        name="random",
        queries=tuple(f"query {i}" for i in range(num_queries)),
        documents=tuple(f"doc {j}" for j in range(num_docs)),
        positives=tuple(int(p) for p in positives),
    )
    got = split.evaluate_scores(scores)
    one_hot = np.zeros_like(scores)
    one_hot[np.arange(num_queries), positives] = 1.0
    labels = np.arange(num_docs)
    want = {
        "ndcg@10": ndcg_score(one_hot, scores, k=10),
        **{
            f"recall@{k}": top_k_accuracy_score(positives, scores, k=k, labels=labels)
            for k in (1, 10, 100)
        },
    }
    # reciprocal rank per query (average precision with one relevant label), cut at 10
    rr = np.asarray(
        [
            label_ranking_average_precision_score(one_hot[i : i + 1], scores[i : i + 1])
            for i in range(num_queries)
        ]
    )
    want["mrr@10"] = float(np.mean(np.where(rr >= 1 / 10, rr, 0.0)))
    for name in rm.METRICS:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
        assert 0.05 < got[name] < 0.999, (name, got[name])
