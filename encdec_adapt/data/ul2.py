"""UL2 mixture of denoisers as one seqio preprocessor (no public library ships it for seqio).

Each chunk of a document draws one denoiser (weights per chunk, i.e. roughly per token) and is
corrupted by it, with the denoiser's mode token prepended to the inputs:

- R ("[NLU]"): regular span corruption, (mean span 3, rate 0.15) and (8, 0.15);
- X ("[NLG]"): extreme span corruption, (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5);
- S ("[S2S]"): PrefixLM with a random split point.

Every span corruption chunk is cut to the longest length whose inputs and targets fit the task's
sequence lengths (see `span_corruption.raw_length`), so nothing is truncated downstream. Examples
carry `denoiser` (the index into `UL2Config.denoisers()`) for inspection and per-denoiser metrics.
Everything is bindable in gin, e.g. `UL2Config.x_spans = ((3, 0.5), (32, 0.5))`,
`UL2Config.weights = (1, 1, 1, 1, 1, 1, 4)`.
"""

from __future__ import annotations

import dataclasses

import gin
import numpy as np
import seqio
import tensorflow as tf

from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import prefix_lm as prefix_lm_lib
from encdec_adapt.data import span_corruption as sc
from encdec_adapt.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Denoiser:
    name: str  # e.g. "R(3,0.15)"
    mode_token: str
    span: sc.SpanSpec | None  # None: PrefixLM (the S-denoiser)
    weight: float


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class UL2Config:
    """UL2 denoisers: (mean span length, noise density) pairs per family, mode tokens, weights.

    weights: one per denoiser in the order R spans, X spans, S (if enabled); None = equal.
    """

    r_spans: tuple[tuple[float, float], ...] = ((3, 0.15), (8, 0.15))
    x_spans: tuple[tuple[float, float], ...] = ((3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5))
    use_s_denoiser: bool = True
    mode_tokens: tuple[str, str, str] = ("[NLU]", "[NLG]", "[S2S]")  # R, X, S
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        # gin gives lists; keep tuples so configs hash and compare by value.
        for name in ("r_spans", "x_spans"):
            object.__setattr__(self, name, tuple(tuple(p) for p in getattr(self, name)))
        object.__setattr__(self, "mode_tokens", tuple(self.mode_tokens))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    def denoisers(self) -> tuple[Denoiser, ...]:
        r_mode, x_mode, s_mode = self.mode_tokens
        specs = [(f"R({m:g},{d:g})", r_mode, sc.SpanSpec(d, m)) for m, d in self.r_spans]
        specs += [(f"X({m:g},{d:g})", x_mode, sc.SpanSpec(d, m)) for m, d in self.x_spans]
        if self.use_s_denoiser:
            specs.append(("S", s_mode, None))
        if not specs:
            raise ConfigError("UL2Config has no denoiser (empty r_spans, x_spans and no S)")
        weights = self.weights or (1.0,) * len(specs)
        if len(weights) != len(specs) or min(weights) < 0 or sum(weights) <= 0:
            raise ConfigError(
                f"UL2Config.weights {self.weights} must be {len(specs)} non-negative numbers "
                f"(one per denoiser: {[s[0] for s in specs]})"
            )
        return tuple(Denoiser(n, t, s, w) for (n, t, s), w in zip(specs, weights))


def ul2(
    ds: tf.data.Dataset,
    sequence_length: dict[str, int],
    output_features: dict[str, seqio.Feature],
    config: UL2Config | None = None,
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """seqio preprocessor: tokenized `targets` -> UL2 (inputs, targets, denoiser)."""
    config = config or UL2Config()
    denoisers = config.denoisers()
    vocab = output_features["targets"].vocabulary
    has_spans = any(d.span is not None for d in denoisers)
    max_spans = sc.num_sentinels(vocab) if has_spans else 0
    modes, lengths, branches = [], [], []
    for d in denoisers:
        mode = sc.mode_token_ids(output_features["inputs"].vocabulary, d.mode_token)
        budget_in, budget_tg = prefix_lm_lib.budgets(sequence_length, output_features, len(mode))
        if d.span is None:
            lengths.append(prefix_lm_lib.default_chunk_length(budget_in, budget_tg))
            branches.append(_prefix_lm_branch(mode, budget_in, budget_tg))
        else:
            lengths.append(sc.raw_length(budget_in, budget_tg, d.span, max_spans))
            branches.append(_span_branch(mode, d.span, max_spans, vocab.vocab_size))
        modes.append(mode)
    logits = tf.constant(np.log(np.array([d.weight for d in denoisers]) + 1e-30)[None], tf.float32)
    lengths_t = tf.constant(lengths, tf.int32)

    ds = sc.chunk(ds, max(lengths))

    @seqio.map_over_dataset(num_seeds=1)
    def choose(ex, seed):
        d = tf.random.stateless_categorical(logits, 1, seed, dtype=tf.int32)[0, 0]
        return {"targets": ex["targets"], "denoiser": d}

    def rechunk(ex):
        rows = sc.pieces(ex["targets"], tf.gather(lengths_t, ex["denoiser"]))
        return {"targets": rows, "denoiser": tf.fill([rows.nrows()], ex["denoiser"])}

    ds = choose(ds).map(rechunk, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    ds = sc.drop_short(ds, 2, counters)

    @seqio.map_over_dataset(num_seeds=1)
    def denoise(ex, seed):
        fns = [lambda b=b: b(ex["targets"], seed) for b in branches]
        inputs, targets = tf.switch_case(ex["denoiser"], fns)
        return {"inputs": inputs, "targets": targets, "denoiser": ex["denoiser"]}

    return denoise(ds)


def _span_branch(mode: list[int], spec: sc.SpanSpec, max_spans: int, vocab_size: int):
    def branch(tokens, seed):
        mask = sc.noise_mask(tf.size(tokens), spec, max_spans, seed)
        inputs, targets = sc.corrupt(tokens, mask, vocab_size)
        return tf.concat([tf.constant(mode, tokens.dtype), inputs], 0), targets

    return branch


def _prefix_lm_branch(mode: list[int], budget_in: int, budget_tg: int):
    def branch(tokens, seed):
        prefix, rest, _ = prefix_lm_lib.split_tokens(tokens, budget_in, budget_tg, seed)
        return tf.concat([tf.constant(mode, tokens.dtype), prefix], 0), rest

    return branch
