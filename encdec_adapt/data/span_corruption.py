"""T5 span corruption in tf ops, and the noise-span helpers the UL2 denoisers share.

A document of n tokens gets n * noise_density noise tokens, cut into noise / mean_noise_span_length
spans (both randomly rounded, so unbiased); noise and kept spans alternate, starting with a kept
span, with lengths from a uniform random segmentation. Each noise span is replaced in the inputs by
one sentinel (seqio extra id i = vocab_size - 1 - i, counting down from the top of the vocabulary)
and the targets are, for every span i, sentinel i followed by the span's tokens:

    tokens   a b c d e f g h        (noise: c d, g)
    inputs   a b <0> e f <1> h
    targets  <0> c d <1> g

Randomness comes from stateless ops on a per-example seed (`seqio.map_over_dataset(num_seeds=..)`),
so a fixed dataset seed gives identical examples. The longest possible outputs are a function of
the document length, which is how `raw_length` chooses a chunk size whose outputs always fit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import seqio
import tensorflow as tf

from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import text
from encdec_adapt.errors import ConfigError

_AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class SpanSpec:
    """One span-corruption setting: noise density (fraction of tokens) and mean span length."""

    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_noise_span_length < 1.0:
            raise ConfigError(
                f"mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}"
            )


def _max_counts(length: int, spec: SpanSpec, max_spans: int) -> tuple[int, int]:
    """The largest (num_noise, num_spans) `_tf_counts` can draw for a document length."""
    num_noise = min(max(math.ceil(length * spec.noise_density), 1), length - 1)
    most = min(max_spans, num_noise, length - num_noise)
    num_spans = min(max(math.ceil(num_noise / spec.mean_noise_span_length), 1), most)
    return num_noise, num_spans


def _tf_counts(length, spec: SpanSpec, max_spans: int, seed) -> tuple[tf.Tensor, tf.Tensor]:
    """(num_noise, num_spans), each rounded up with probability equal to its fractional part.

    Randomised rounding keeps both the noise rate and the mean span length unbiased even when a
    chunk holds only one or two spans (X-denoisers with span 64 in a 128-token target budget),
    where rounding to nearest would miss the mean span length by up to 50%.
    """
    n = tf.cast(length, tf.float64)
    u = tf.random.stateless_uniform([2], seed, dtype=tf.float64)
    num_noise = tf.clip_by_value(tf.floor(n * spec.noise_density + u[0]), 1.0, n - 1.0)
    most = tf.minimum(tf.constant(max_spans, tf.float64), tf.minimum(num_noise, n - num_noise))
    num_spans = tf.floor(num_noise / spec.mean_noise_span_length + u[1])
    num_spans = tf.clip_by_value(num_spans, 1.0, most)
    return tf.cast(num_noise, tf.int32), tf.cast(num_spans, tf.int32)


def corrupted_lengths(length: int, spec: SpanSpec, max_spans: int) -> tuple[int, int]:
    """Longest (inputs, targets), without EOS / mode tokens, of a corrupted `length`-token chunk."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise, num_spans = _max_counts(length, spec, max_spans)
    # inputs grow with spans and shrink with noise: bound each side separately.
    least_noise = min(max(math.floor(length * spec.noise_density), 1), length - 1)
    return length - least_noise + num_spans, num_noise + num_spans


def raw_length(inputs_length: int, targets_length: int, spec: SpanSpec, max_spans: int) -> int:
    """The longest chunk whose corrupted inputs / targets fit the given lengths (and all shorter).

    The lengths passed here are the budgets left after EOS / mode tokens.
    """
    best = None
    for n in range(2, 64 * (inputs_length + targets_length)):
        i, t = corrupted_lengths(n, spec, max_spans)
        if i > inputs_length or t > targets_length:
            break
        best = n
    if best is None:
        raise ValueError(
            f"inputs length {inputs_length} / targets length {targets_length} cannot hold a "
            f"corrupted chunk of 2 tokens at {spec}"
        )
    return best


def random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor):
    """Lengths [num_segments] >= 1 summing to num_items, uniform over such segmentations."""
    cuts = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed))[: num_segments - 1]
    bounds = tf.concat([[0], tf.sort(cuts) + 1, [num_items]], axis=0)
    return bounds[1:] - bounds[:-1]


def noise_mask(length: tf.Tensor, spec: SpanSpec, max_spans: int, seed: tf.Tensor) -> tf.Tensor:
    """[length] bool, True on noise tokens; alternating kept / noise spans, kept first."""
    length = tf.cast(length, tf.int32)
    seeds = tf.random.experimental.stateless_split(seed, 3)
    num_noise, num_spans = _tf_counts(length, spec, max_spans, seeds[0])
    noise_lengths = random_segmentation(num_noise, num_spans, seeds[1])
    kept_lengths = random_segmentation(length - num_noise, num_spans, seeds[2])
    span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])
    span_ids = tf.repeat(tf.range(2 * num_spans), span_lengths)  # [length]
    return span_ids % 2 == 1


def corrupt(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """tokens [n], noise mask [n] -> (inputs, targets), noise spans replaced by sentinels."""
    previous = tf.concat([[False], mask[:-1]], axis=0)
    first_noise = mask & ~previous
    sentinels = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))  # vocab - 1 - span
    inputs = tf.boolean_mask(tf.where(first_noise, sentinels, tokens), ~mask | first_noise)
    # Each noise token emits (sentinel, token) when it opens a span and (token) otherwise.
    pairs = tf.stack([tf.where(first_noise, sentinels, -1), tokens], axis=1)
    pairs = tf.boolean_mask(pairs, mask)
    flat = tf.reshape(pairs, [-1])
    return inputs, tf.boolean_mask(flat, flat >= 0)


def uncorrupt(inputs, targets, vocab_size: int, num_sentinels: int) -> np.ndarray:
    """The original tokens from (inputs, targets) of `corrupt` (numpy; for tests and inspection)."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    is_sentinel = lambda t: t >= vocab_size - num_sentinels
    spans, current = {}, None
    for t in targets.tolist():
        if is_sentinel(t):
            current = spans.setdefault(t, [])
        elif current is None:
            raise ValueError(f"targets do not start with a sentinel: {targets[:8]}")
        else:
            current.append(t)
    out = []
    for t in inputs.tolist():
        out.extend(spans.pop(t) if is_sentinel(t) else [t])
    if spans:
        raise ValueError(f"sentinels {sorted(spans)} of the targets are missing from the inputs")
    return np.asarray(out, np.int64)


def pieces(tokens: tf.Tensor, length) -> tf.RaggedTensor:
    """tokens [n] -> ragged [ceil(n / length), <= length]: consecutive pieces, the last shorter."""
    n = tf.size(tokens)
    rest = n % length
    sizes = tf.concat([tf.fill([n // length], length), tf.fill([tf.minimum(rest, 1)], rest)], 0)
    return tf.RaggedTensor.from_row_lengths(tokens, sizes)


def chunk(ds: tf.data.Dataset, length: int, feature: str = "targets") -> tf.data.Dataset:
    """Splits `feature` into consecutive pieces of at most `length` tokens, one example each.

    Other features are dropped (they would no longer describe the piece).
    """
    ds = ds.map(lambda ex: {feature: pieces(ex[feature], length)}, num_parallel_calls=_AUTOTUNE)
    return ds.unbatch()


def num_sentinels(vocab: seqio.Vocabulary) -> int:
    """How many sentinels the vocabulary has: its seqio extra ids (at most as many spans)."""
    if not vocab.extra_ids:
        raise ValueError(
            f"span corruption needs sentinel ids, but the vocabulary {vocab!r} has extra_ids=0: "
            "build it with extra ids (e.g. seqio.SentencePieceVocabulary(path, extra_ids=100))"
        )
    return vocab.extra_ids


def mode_token_ids(vocab: seqio.Vocabulary, token: str | None) -> list[int]:
    """Ids of a mode token: the vocabulary's reserved id for it (`reserved_vocab`), one id when
    the SentencePiece model has it as a piece, else its encoding."""
    if not token:
        return []
    # A vocabulary that maps mode tokens to reserved ids of its own (reserved_vocab).
    reserved = getattr(vocab, "mode_token_ids", None)
    if reserved and token in reserved:
        return [reserved[token]]
    sp = getattr(vocab, "tokenizer", None)
    if sp is not None:
        piece = sp.piece_to_id(token)
        if piece != sp.unk_id() and sp.id_to_piece(piece) == token:
            return [piece]
    return list(vocab.encode(token))


def span_corruption(
    ds: tf.data.Dataset,
    sequence_length: dict[str, int],
    output_features: dict[str, seqio.Feature],
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    mode_token: str | None = None,
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """seqio preprocessor: tokenized `targets` -> T5 span-corruption (inputs, targets).

    Documents are cut into chunks sized so that inputs and targets, with EOS (when the output
    feature adds it) and the optional mode token, fit `sequence_length`: nothing is truncated
    later. Chunks of one token cannot be corrupted: dropped and counted as `too_short`.
    """
    spec = SpanSpec(noise_density, mean_noise_span_length)
    vocab = output_features["targets"].vocabulary
    prefix = mode_token_ids(output_features["inputs"].vocabulary, mode_token)
    budget_in = sequence_length["inputs"] - len(prefix) - int(output_features["inputs"].add_eos)
    budget_tg = sequence_length["targets"] - int(output_features["targets"].add_eos)
    max_spans = num_sentinels(vocab)
    n = raw_length(budget_in, budget_tg, spec, max_spans)
    ds = chunk(ds, n)
    ds = drop_short(ds, 2, counters)
    return _corrupt_map(ds, spec, max_spans, vocab.vocab_size, prefix)


def drop_short(ds, min_length: int, counters=None, feature: str = "targets"):
    """Drops examples whose `feature` has fewer than `min_length` tokens, counting `too_short`."""
    counters = counters or counters_lib.COUNTERS

    def keep(ex):
        short = tf.size(ex[feature]) < min_length
        counters.add("too_short", tf.cast(short, tf.int64))
        return ex, ~short

    return text.keep_flagged(ds.map(keep))


def _corrupt_map(ds, spec: SpanSpec, max_spans: int, vocab_size: int, prefix: list[int]):
    @seqio.map_over_dataset(num_seeds=1)
    def fn(ex, seed):
        tokens = ex["targets"]
        mask = noise_mask(tf.size(tokens), spec, max_spans, seed)
        inputs, targets = corrupt(tokens, mask, vocab_size)
        inputs = tf.concat([tf.constant(prefix, inputs.dtype), inputs], axis=0)
        return {"inputs": inputs, "targets": targets}

    return fn(ds)
