"""Retrieval metrics over ranked lists: nDCG@k (linear gain, log2(rank + 1) discount), Recall@k
and MRR@k, averaged over queries; exact top-k search over embeddings; and the retrieval
evaluation of a split of (query, positive) pairs.

`qrels` maps each query to its relevant documents and their grades ({doc: grade}, grade > 0);
`ranked` lists each query's retrieved document ids, best first.

A `RetrievalSplit` is the evaluation set made from a contrastive split: the corpus is the split's
unique positives, the queries are its queries, and each query's one relevant document is its own
positive. `evaluate_embeddings` ranks that corpus by cosine similarity; `retrieval_metric_fn` is
the same evaluation with the seqio metric signature (targets, predictions).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

#: the metrics `evaluate` reports, in table order
METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10")

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
    metrics: dict[str, list[float]] = {name: [] for name in METRICS}
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
    return rank_scores(scores, doc_ids, k)


def rank_scores(scores: np.ndarray, doc_ids: Sequence[str], k: int = 100) -> list[list[str]]:
    """[Q, N] scores -> per query the ids of its k best documents (ties: document order)."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(doc_ids):
        raise ValueError(f"scores {scores.shape} do not match {len(doc_ids)} document ids")
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[doc_ids[j] for j in row] for row in order]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero): dot products become cosines."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class RetrievalSplit:
    """Queries and a corpus of unique documents; query i's one relevant document is
    `documents[positives[i]]`.

    Texts are raw (no task prompts); `query_prompt` / `document_prompt` are what embedding
    towers prepend (the lexical baseline reads the raw texts).
    """

    name: str
    queries: tuple[str, ...]
    documents: tuple[str, ...]
    positives: tuple[int, ...]
    query_prompt: str = ""
    document_prompt: str = ""

    def __post_init__(self):
        if not self.queries:
            raise ValueError(f"retrieval split {self.name!r} has no queries")
        if len(self.positives) != len(self.queries):
            raise ValueError(
                f"retrieval split {self.name!r}: {len(self.queries)} queries but "
                f"{len(self.positives)} positives"
            )
        bad = [p for p in self.positives if not 0 <= p < len(self.documents)]
        if bad:
            raise ValueError(
                f"retrieval split {self.name!r}: positive index {bad[0]} outside the "
                f"{len(self.documents)} documents"
            )

    @classmethod
    def from_pairs(
        cls, name: str, pairs: Sequence[tuple[str, str]], query_prompt="", document_prompt=""
    ) -> RetrievalSplit:
        """(query, positive) pairs -> the split; identical positives become one document
        (first-seen order), so a document shared by two queries is relevant to both."""
        index: dict[str, int] = {}
        for _, doc in pairs:
            index.setdefault(doc, len(index))
        return cls(
            name=name,
            queries=tuple(q for q, _ in pairs),
            documents=tuple(index),
            positives=tuple(index[d] for _, d in pairs),
            query_prompt=query_prompt,
            document_prompt=document_prompt,
        )

    @property
    def query_ids(self) -> list[str]:
        return [f"q{i}" for i in range(len(self.queries))]

    @property
    def doc_ids(self) -> list[str]:
        return [f"d{j}" for j in range(len(self.documents))]

    def qrels(self) -> dict[str, dict[str, float]]:
        return {f"q{i}": {f"d{p}": 1.0} for i, p in enumerate(self.positives)}

    def evaluate_scores(self, scores: np.ndarray, k: int = 100) -> dict[str, float]:
        """[Q, N] query-document scores (higher is better) -> the metrics of `evaluate`."""
        ranked = rank_scores(scores, self.doc_ids, k)
        return evaluate(self.qrels(), dict(zip(self.query_ids, ranked)))

    def evaluate_embeddings(self, query_emb: np.ndarray, doc_emb: np.ndarray) -> dict[str, float]:
        """[Q, E] query and [N, E] document embeddings, ranked by cosine -> the metrics."""
        q, d = np.asarray(query_emb), np.asarray(doc_emb)
        if q.ndim != 2 or d.ndim != 2 or q.shape[0] != len(self.queries):
            raise ValueError(
                f"query embeddings {q.shape} / document embeddings {d.shape} do not fit "
                f"{len(self.queries)} queries and {len(self.documents)} documents"
            )
        if d.shape[0] != len(self.documents) or q.shape[1] != d.shape[1]:
            raise ValueError(
                f"document embeddings {d.shape} do not fit {len(self.documents)} documents "
                f"and query embeddings {q.shape}"
            )
        return self.evaluate_scores(l2_normalize(q) @ l2_normalize(d).T)


def retrieval_metric_fn(targets, predictions) -> dict[str, float]:
    """A seqio metric function (`seqio.Task(metric_fns=[retrieval_metric_fn])`).

    Args:
      targets: [N, E] embeddings of each example's positive document.
      predictions: [N, E] embeddings of each example's query.

    The corpus is the set of unique target rows (identical texts embed identically, so a
    document shared by several queries is one corpus entry relevant to each of them); queries
    rank it by cosine similarity. Returns nDCG@10, Recall@1/10/100 and MRR@10.

    `tasks.register_contrastive_task` attaches it to contrastive tasks; the trainer's
    periodic eval and `encdec-adapt eval` of an embedding model call it on the eval batches'
    embeddings (`evaluation.embedding_task_metrics`).
    """
    t = np.asarray(targets, np.float32)
    p = np.asarray(predictions, np.float32)
    if t.ndim != 2 or t.shape != p.shape:
        raise ValueError(
            f"retrieval_metric_fn: targets {t.shape} and predictions {p.shape} must both be "
            "[examples, embedding dim]"
        )
    docs, positives = np.unique(t, axis=0, return_inverse=True)
    split = RetrievalSplit(
        name="metric",
        queries=tuple(str(i) for i in range(len(p))),
        documents=tuple(str(j) for j in range(len(docs))),
        positives=tuple(int(j) for j in positives.reshape(-1)),
    )
    return split.evaluate_embeddings(p, docs)
