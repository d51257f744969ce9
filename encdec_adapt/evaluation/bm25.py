"""BM25 (Okapi) lexical retrieval: the baseline that embedding towers must beat.

Words are lower-cased alphanumeric runs, and code identifiers are also split at underscores and
camelCase boundaries, so a docstring's "read file" can match a function's `read_file` / `readFile`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from encdec_adapt.evaluation.retrieval_metrics import RetrievalSplit

_WORD = re.compile(r"[A-Za-z0-9]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words; identifiers add their parts ("readFile" -> readfile, read, file)."""
    out = []
    for word in _WORD.findall(text.replace("_", " ")):
        out.append(word.lower())
        parts = _CAMEL.findall(word)
        if len(parts) > 1:
            out.extend(p.lower() for p in parts)
    return out


class BM25:
    """An index over documents; `scores(query)` -> [N] BM25 scores.

    k1 and b are the usual saturation and length-normalisation constants; idf is the
    non-negative variant log(1 + (N - df + 0.5) / (df + 0.5)).
    """

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75):
        if not documents:
            raise ValueError("BM25 needs at least one document")
        self.k1, self.b = k1, b
        self.doc_terms = [Counter(tokenize(d)) for d in documents]
        self.lengths = np.asarray([sum(c.values()) for c in self.doc_terms], np.float32)
        self.avg_length = max(float(self.lengths.mean()), 1e-6)
        df = Counter(term for c in self.doc_terms for term in c)
        n = len(documents)
        self.idf = {t: math.log(1.0 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, c in enumerate(self.doc_terms):
            for term, tf in c.items():
                self.postings.setdefault(term, []).append((i, tf))

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.doc_terms), np.float32)
        norm = self.k1 * (1.0 - self.b + self.b * self.lengths / self.avg_length)
        for term in set(tokenize(query)):
            for i, tf in self.postings.get(term, ()):
                out[i] += self.idf[term] * tf * (self.k1 + 1.0) / (tf + norm[i])
        return out

    def rank(self, query: str, doc_ids: Sequence[str], k: int = 100) -> list[str]:
        """The ids of the k best documents, ties broken by document order."""
        order = np.argsort(-self.scores(query), kind="stable")[:k]
        return [doc_ids[i] for i in order]

    def score_matrix(self, queries: Sequence[str]) -> np.ndarray:
        """[Q, N] scores of every query against every document."""
        return np.stack([self.scores(q) for q in queries]) if queries else np.zeros((0, 0))


def evaluate_bm25(split: RetrievalSplit, k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """The split's metrics (nDCG@10, Recall@1/10/100, MRR@10) for BM25 over its raw texts."""
    index = BM25(split.documents, k1=k1, b=b)
    return split.evaluate_scores(index.score_matrix(split.queries))
