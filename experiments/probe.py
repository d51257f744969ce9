"""Representation probes of a frozen encoder on the embedded code-search data.

Every probe reads the encoder's final-norm states, mean-pooled over non-padding tokens and
L2-normalised (mean pooling is the best pooling in the Gemma Encoder ablations), so the same
numbers can be computed for any encoder-decoder, trained any way:

  retrieval       docstring summary -> its function among all functions of the split, cosine
                  similarity, no training: nDCG@10, Recall@1, MRR@10 (`retrieval_metrics`);
  pair accuracy   share of queries whose own function scores above the first hard negative
                  (another function of the same module), no training;
  linear probe    logistic regression on the pair features [q * d, |q - d|] -> "is this its
                  function?", trained on train-split pairs (positive vs first hard negative),
                  accuracy on the probe split; full-batch gradient descent from zero, so the
                  result is a deterministic function of the embeddings.

    pairs = code_search_pairs("validation")
    scores = probe_encoder(encode_fn, vocabulary, pairs, train_pairs=code_search_pairs("train"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from encdec_adapt.data.token_fit import fit_text
from encdec_adapt.evaluation.retrieval_metrics import RetrievalSplit

EncodeFn = Callable[[jax.Array], jax.Array]  # [B, L] tokens -> [B, L, D] states


def code_search_pairs(split: str, limit: int | None = None) -> list[dict]:
    """(query, positive, negatives) dicts of the embedded `stdlib_code_search` split, in the
    dataset's order (deterministic); `limit` keeps the first ones. Examples whose negatives
    list is empty keep `negatives == []`."""
    from encdec_adapt.data import corpus

    pairs = []
    for ex in corpus.load("stdlib_code_search", split).as_numpy_iterator():
        pairs.append(
            {
                "id": ex["id"].decode(),
                "query": ex["query"].decode(),
                "positive": ex["positive"].decode(),
                "negatives": [n.decode() for n in ex["negatives"]],
            }
        )
    pairs.sort(key=lambda p: p["id"])  # TFDS file order is not a promise; ids are unique
    if not pairs:
        raise ValueError(f"stdlib_code_search split {split!r} is empty")
    return pairs[:limit] if limit else pairs


def tokenize(vocabulary, texts: Sequence[str], max_length: int, eos_id: int = 1) -> np.ndarray:
    """[N, max_length] int32: each text's ids then EOS, cut to the first max_length tokens as in
    training (`token_fit.fit_text`: an over-long text loses its EOS), padded with 0. An empty
    text is EOS alone."""
    out = np.zeros((len(texts), max_length), np.int32)
    for i, text in enumerate(texts):
        ids, _ = fit_text(vocabulary, text, max_length, eos_id)
        out[i, : len(ids)] = ids
    return out


def mean_pooled(encode_fn: EncodeFn, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """[N, L] tokens -> [N, D] float32 unit vectors: the mean of the states of non-padding
    tokens. Batches are padded to `batch_size` rows so `encode_fn` compiles once."""
    n, length = tokens.shape
    out = []
    for start in range(0, n, batch_size):
        rows = tokens[start : start + batch_size]
        batch = np.zeros((batch_size, length), np.int32)
        batch[: len(rows)] = rows
        states = np.asarray(encode_fn(jnp.asarray(batch)), np.float32)[: len(rows)]
        mask = (rows != 0)[..., None].astype(np.float32)
        pooled = (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
        out.append(pooled)
    pooled = np.concatenate(out, axis=0)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def retrieval(
    pairs: Sequence[dict], queries: np.ndarray, positives: np.ndarray
) -> dict[str, float]:
    """nDCG@10, Recall@1 and MRR@10 of exact cosine search, scored by the same code as
    `encdec-adapt embed` (`RetrievalSplit.evaluate_embeddings`).

    pairs: the probe pairs (their texts define the candidate set: identical positives become one
    document, relevant to every query that has it); queries, positives: [Q, D] embeddings of
    each pair's query and positive, in the order of `pairs`. The candidate set is every distinct
    positive of `pairs`, so nDCG@10 of random embeddings is about 10 / N for N >> 10 candidates
    but about 0.3 for 16 (compare probes only at the same number of pairs).
    """
    split = RetrievalSplit.from_pairs("probe", [(p["query"], p["positive"]) for p in pairs])
    first: dict[str, int] = {}
    for i, p in enumerate(pairs):
        first.setdefault(p["positive"], i)
    documents = positives[[first[doc] for doc in split.documents]]
    scores = split.evaluate_embeddings(queries, documents)
    return {k: scores[k] for k in ("ndcg@10", "recall@1", "mrr@10")}


def pair_features(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """[N, D] x [N, D] -> [N, 2D]: elementwise product and absolute difference."""
    return np.concatenate([queries * documents, np.abs(queries - documents)], axis=-1)


def logistic_regression(
    x: np.ndarray, y: np.ndarray, *, steps: int = 500, lr: float = 0.5, l2: float = 1e-3
) -> tuple[np.ndarray, float]:
    """Full-batch gradient descent on the L2-regularised logistic loss from zero weights.

    x: [N, F] features (standardised inside: the returned weights apply to standardised x, see
    `predict`), y: [N] in {0, 1}. Returns (weights [F + 2F stats packed], bias)."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = jnp.asarray((x - mean) / std, jnp.float32)
    t = jnp.asarray(y, jnp.float32)

    def loss(params):
        w, b = params
        logits = z @ w + b
        nll = jnp.mean(jnp.logaddexp(0.0, logits) - t * logits)
        return nll + l2 * jnp.sum(w * w)

    grad = jax.jit(jax.grad(loss))
    params = (jnp.zeros(z.shape[1], jnp.float32), jnp.zeros((), jnp.float32))
    for _ in range(steps):
        g = grad(params)
        params = jax.tree.map(lambda p, d: p - lr * d, params, g)
    w, b = (np.asarray(p) for p in params)
    return np.concatenate([w, mean, std]), float(b)


def predict(weights: np.ndarray, bias: float, x: np.ndarray) -> np.ndarray:
    """[N] in {0, 1} from `logistic_regression`'s packed weights."""
    f = x.shape[1]
    w, mean, std = weights[:f], weights[f : 2 * f], weights[2 * f :]
    return (((x - mean) / std) @ w + bias > 0).astype(np.int32)


def _embed_pairs(encode_fn, vocabulary, pairs, max_length, batch_size):
    """Unit vectors of the queries, positives and first hard negatives (None where absent)."""

    def embed(texts):
        return mean_pooled(encode_fn, tokenize(vocabulary, texts, max_length), batch_size)

    q = embed([p["query"] for p in pairs])
    d = embed([p["positive"] for p in pairs])
    with_neg = [i for i, p in enumerate(pairs) if p["negatives"]]
    n = embed([pairs[i]["negatives"][0] for i in with_neg]) if with_neg else None
    return q, d, with_neg, n


def probe_encoder(
    encode_fn: EncodeFn,
    vocabulary,
    pairs: list[dict],
    *,
    train_pairs: list[dict] | None = None,
    max_length: int = 128,
    batch_size: int = 32,
) -> dict[str, float]:
    """All probes of one frozen encoder.

    Args:
      encode_fn: [B, L] int32 tokens -> [B, L, D] encoder states (padding id 0); jit it.
      vocabulary: the seqio vocabulary of the encoder's inputs.
      pairs: probe split (`code_search_pairs("validation")`).
      train_pairs: pairs the linear probe is fitted on (None: no linear probe).
      max_length: tokens per text (longer texts are cut, as in training).
      batch_size: rows per encoder call.
    Returns:
      {"ndcg@10", "recall@1", "mrr@10", "pair_accuracy"[, "linear_probe_accuracy"]}.
    """
    q, d, with_neg, n = _embed_pairs(encode_fn, vocabulary, pairs, max_length, batch_size)
    out = retrieval(pairs, q, d)
    if n is not None:
        qn = q[with_neg]
        out["pair_accuracy"] = float(np.mean(np.sum(qn * d[with_neg], -1) > np.sum(qn * n, -1)))
    if train_pairs and n is not None:
        tq, td, t_with, tn = _embed_pairs(
            encode_fn, vocabulary, train_pairs, max_length, batch_size
        )
        if tn is not None:
            x = np.concatenate(
                [pair_features(tq[t_with], td[t_with]), pair_features(tq[t_with], tn)]
            )
            y = np.concatenate([np.ones(len(t_with)), np.zeros(len(t_with))])
            w, b = logistic_regression(x, y)
            xv = np.concatenate([pair_features(qn, d[with_neg]), pair_features(qn, n)])
            yv = np.concatenate([np.ones(len(with_neg)), np.zeros(len(with_neg))])
            out["linear_probe_accuracy"] = float(np.mean(predict(w, b, xv) == yv))
    return out
