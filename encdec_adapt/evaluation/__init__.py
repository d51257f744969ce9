"""Evaluation and inference helpers that need no training runtime: the batch loop behind eval,
infer, seqio task metrics and retrieval eval (`evaluator.py`), the text encoder API (`encode.py`),
retrieval metrics and the BM25 baseline."""
