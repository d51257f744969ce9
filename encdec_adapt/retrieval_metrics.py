"""Retrieval metrics over ranked lists: nDCG@k (linear gain, log2(rank + 1) discount), Recall@k
and MRR@k, averaged over queries; plus exact top-k search over embeddings.

`qrels` maps each query to its relevant documents and their grades ({doc: grade}, grade > 0);
`ranked` lists each query's retrieved document ids, best first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Qrels = Mapping[str, Mapping[str, float]]
Ranking = Mapping[str, Sequence[str]]


def ndcg_at_k(relevant: Mapping[str, float], ranked: Sequence[str], k: int) -> float:
    dcg = sum(relevant.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(relevant: Mapping[str, float], ranked: Sequence[str], k: int) -> float:
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted & set(ranked[:k])) / len(wanted) if wanted else 0.0


def mrr_at_k(relevant: Mapping[str, float], ranked: Sequence[str], k: int) -> float:
    for rank, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0.0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def evaluate(qrels: Qrels, ranked: Ranking) -> dict[str, float]:
    """nDCG@10, Recall@1/10/100 and MRR@10 averaged over the queries of `qrels`.

    A query of `qrels` with no ranking counts as retrieving nothing (scores 0), so a retriever
    cannot look better by skipping hard queries.
    """
    if not qrels:
        raise ValueError("evaluate: qrels is empty")
    metrics = {"ndcg@10": [], "recall@1": [], "recall@10": [], "recall@100": [], "mrr@10": []}
    for query, relevant in qrels.items():
        docs = list(ranked.get(query, ()))
        metrics["ndcg@10"].append(ndcg_at_k(relevant, docs, 10))
        for k in (1, 10, 100):
            metrics[f"recall@{k}"].append(recall_at_k(relevant, docs, k))
        metrics["mrr@10"].append(mrr_at_k(relevant, docs, 10))
    return {name: float(np.mean(values)) for name, values in metrics.items()}


def top_k(
    query_emb: np.ndarray, doc_emb: np.ndarray, doc_ids: Sequence[str], k: int = 100
) -> list[list[str]]:
    """Exact search by dot product: [Q, D] x [N, D] -> per query the ids of the k best documents.

    Ties are broken by document order, so rankings are deterministic.
    """
    scores = np.asarray(query_emb, np.float32) @ np.asarray(doc_emb, np.float32).T
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[doc_ids[j] for j in row] for row in order]
