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
