"""Retrieval metrics computed by hand in numpy, independently of
`encdec_adapt.evaluation.retrieval_metrics`, as references for the tests of code that reports
them (one relevant document per query, cosine similarity, ties broken by document order)."""

import numpy as np


def positive_ranks(query_emb, doc_emb, positives) -> np.ndarray:
    """[Q] 1-based rank of each query's relevant document among all documents by cosine
    similarity (float64), a tie going to the earlier document."""
    q = np.asarray(query_emb, np.float64)
    d = np.asarray(doc_emb, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    scores = q @ d.T
    ranks = []
    for i, p in enumerate(positives):
        own = scores[i, p]
        ranks.append(1 + np.sum(scores[i] > own) + np.sum(scores[i, :p] == own))
    return np.asarray(ranks)


def metrics_from_ranks(ranks) -> dict[str, float]:
    """One relevant document per query at 1-based `ranks`: nDCG@10 = 1 / log2(rank + 1)
    (IDCG = 1), Recall@k = [rank <= k], MRR@10 = 1 / rank, each 0 beyond its cutoff."""
    r = np.asarray(ranks, np.float64)
    return {
        "ndcg@10": float(np.mean(np.where(r <= 10, 1.0 / np.log2(r + 1.0), 0.0))),
        "recall@1": float(np.mean(r <= 1)),
        "recall@10": float(np.mean(r <= 10)),
        "recall@100": float(np.mean(r <= 100)),
        "mrr@10": float(np.mean(np.where(r <= 10, 1.0 / r, 0.0))),
    }
