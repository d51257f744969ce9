"""Contrastive pairs: (query, positive[, N hard negatives]) with optional task prompts.

A text-level seqio preprocessor: it selects and prompts the strings; `seqio.preprocessors.tokenize`
and `append_eos` then give `query` [Lq], `positive` [Lp] and `negatives` ragged [N, None].
Examples with an empty query or positive are dropped (`empty_documents`); with
`num_negatives=N > 0`, examples with fewer than N negatives are dropped (`too_few_negatives`), so
every example has exactly N (a batch of them stacks to [B, N, L]).

Prompts follow EmbeddingGemma-style task strings, e.g.
query_prompt="task: code retrieval | query: ", document_prompt="title: none | text: ".
"""

from __future__ import annotations

import tensorflow as tf

from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import text


def contrastive_pairs(
    ds: tf.data.Dataset,
    num_negatives: int = 0,
    query_prompt: str = "",
    document_prompt: str = "",
    query_key: str = "query",
    positive_key: str = "positive",
    negatives_key: str = "negatives",
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """Raw examples -> {"query", "positive"[, "negatives"]} strings, prompted and filtered."""
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    counters = counters or counters_lib.COUNTERS

    def select(ex):
        out = {"query": ex[query_key], "positive": ex[positive_key]}
        if num_negatives:
            if negatives_key not in ex:
                raise KeyError(
                    f"num_negatives={num_negatives} but the source has no {negatives_key!r} "
                    f"feature (it has {sorted(ex)})"
                )
            out["negatives"] = ex[negatives_key]
        return out

    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    ds = text.drop_empty(ds, ("query", "positive"), counters)
    if num_negatives:

        def enough(ex):
            short = tf.size(ex["negatives"]) < num_negatives
            counters.add("too_few_negatives", tf.cast(short, tf.int64))
            return ex, ~short

        ds = text.keep_flagged(ds.map(enough))

    def prompt(ex):
        out = {
            "query": tf.strings.join([query_prompt, ex["query"]]),
            "positive": tf.strings.join([document_prompt, ex["positive"]]),
        }
        if num_negatives:
            out["negatives"] = tf.strings.join([document_prompt, ex["negatives"][:num_negatives]])
        return out

    return ds.map(prompt, num_parallel_calls=tf.data.AUTOTUNE)
