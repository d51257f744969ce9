"""BM25 baseline: tokenisation of prose and code, scoring by hand, ranking."""

import math

import pytest

from encdec_adapt.evaluation.bm25 import BM25, tokenize


def test_tokenize_splits_identifiers():
    assert tokenize("Read the FILE") == ["read", "the", "file"]
    assert tokenize("def read_file(path)") == ["def", "read", "file", "path"]
    assert tokenize("parseHTTPResponse") == ["parsehttpresponse", "parse", "http", "response"]


def test_scores_by_hand():
    docs = ["apple banana", "apple apple cherry", "banana"]
    index = BM25(docs, k1=1.2, b=0.75)
    avg = (2 + 3 + 1) / 3
    idf_apple = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    tf, length = 2, 3
    want = idf_apple * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))
    assert index.scores("apple")[1] == pytest.approx(want, rel=1e-5)
    assert index.scores("durian").tolist() == [0.0, 0.0, 0.0]


def test_rank_prefers_matching_code():
    docs = ["def read_file(path): return open(path).read()", "def add(a, b): return a + b"]
    index = BM25(docs)
    assert index.rank("Read a file and return its contents.", ["read", "add"]) == ["read", "add"]
    with pytest.raises(ValueError, match="at least one document"):
        BM25([])
