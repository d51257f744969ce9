"""PrefixLM: split a document at a random point; inputs = prefix, targets = the rest.

Documents are cut into chunks of at most `chunk_length` tokens (default: the inputs budget plus
half the targets budget), and the split point k of an n-token chunk is uniform over the points
where both halves fit: max(1, n - targets) <= k <= min(inputs, n - 1). Short chunks (most
docstrings) therefore split anywhere; long ones split so that the targets get between half and all
of their budget. Nothing is truncated.

The full-sequence variant (for PrefixLM + knowledge distillation) also keeps `full` (the chunk,
without mode token: what the decoder-only teacher scores) and `split` (= k, the number of prefix
tokens in `full`), so that `full[split:] == targets` before EOS.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import span_corruption as sc


def budgets(sequence_length, output_features, num_mode_ids: int) -> tuple[int, int]:
    """(inputs, targets) token budgets left after EOS and the mode token."""
    inputs = sequence_length["inputs"] - num_mode_ids - int(output_features["inputs"].add_eos)
    targets = sequence_length["targets"] - int(output_features["targets"].add_eos)
    if inputs < 1 or targets < 1:
        raise ValueError(f"sequence_length {dict(sequence_length)} leaves no room for PrefixLM")
    return inputs, targets


def default_chunk_length(inputs_budget: int, targets_budget: int) -> int:
    return inputs_budget + max(1, targets_budget // 2)


def split_tokens(tokens: tf.Tensor, inputs_budget: int, targets_budget: int, seed: tf.Tensor):
    """tokens [n], n >= 2 -> (prefix, rest, k) with k uniform over the split points that fit."""
    n = tf.size(tokens)
    lo = tf.maximum(1, n - targets_budget)
    hi = tf.minimum(inputs_budget, n - 1)
    k = tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)
    return tokens[:k], tokens[k:], k


def prefix_lm(
    ds: tf.data.Dataset,
    sequence_length: dict[str, int],
    output_features: dict[str, seqio.Feature],
    mode_token: str | None = None,
    full_sequence: bool = False,
    chunk_length: int | None = None,
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """seqio preprocessor: tokenized `targets` -> (inputs = prefix, targets = rest).

    With `full_sequence`, also `full` [n] and `split` (scalar int32) for a KD teacher.
    """
    prefix_ids = sc.mode_token_ids(output_features["inputs"].vocabulary, mode_token)
    budget_in, budget_tg = budgets(sequence_length, output_features, len(prefix_ids))
    n = chunk_length or default_chunk_length(budget_in, budget_tg)
    if n > budget_in + budget_tg:
        raise ValueError(
            f"prefix_lm chunk_length {n} cannot fit inputs {budget_in} + targets {budget_tg}"
        )
    ds = sc.chunk(ds, n)
    ds = sc.drop_short(ds, 2, counters)

    @seqio.map_over_dataset(num_seeds=1)
    def split(ex, seed):
        tokens = ex["targets"]
        prefix, rest, k = split_tokens(tokens, budget_in, budget_tg, seed)
        out = {"inputs": tf.concat([tf.constant(prefix_ids, tokens.dtype), prefix], 0)}
        out["targets"] = rest
        if full_sequence:
            out["full"], out["split"] = tokens, k
        return out

    return split(ds)
