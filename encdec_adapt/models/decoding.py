"""Autoregressive decoding: greedy, temperature / top-k / top-p sampling, and beam search.

The loops are model-agnostic and run inside `jax.lax.while_loop` with fixed shapes, so one
compilation serves every batch of the same shape. A model plugs in through

  step_fn(tokens [B], state) -> (logits [B, V], state)

where `state` is any pytree whose non-scalar leaves have the batch as their leading axis (a KV
cache, the encoder outputs, the next position of each row); decoding starts from the logits of the
prompt (`init_logits`, [B, V]). Beam search tiles the state to B * beam rows and reorders it with
the beams. Finished rows keep emitting padding (id 0) and stop adding to their score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.errors import ConfigError
from encdec_adapt.nn.attention import Attention
from encdec_adapt.nn.transformer import init_cache

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
NEG_INF = -1.0e7  # finite, so that inf - inf never appears in beam bookkeeping

METHODS = ("greedy", "sample", "beam")


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to decode.

    Attributes:
      method: "greedy", "sample" or "beam".
      max_decode_len: generated tokens per row, EOS included.
      temperature / top_k / top_p: sampling controls (top_k 0 and top_p 1.0 mean off).
      beam_size: beams per row; length_penalty: alpha of the GNMT penalty ((5 + len) / 6) ** alpha
        that beam scores are divided by (0: raw log-likelihood).
      eos_id / pad_id: end-of-sequence and padding ids.
    """

    method: str = "greedy"
    max_decode_len: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_size: int = 4
    length_penalty: float = 0.6
    eos_id: int = 1
    pad_id: int = 0

    def __post_init__(self):
        problems = []
        for name, kind in (
            ("max_decode_len", int),
            ("temperature", (int, float)),
            ("top_k", int),
            ("top_p", (int, float)),
            ("beam_size", int),
            ("length_penalty", (int, float)),
            ("eos_id", int),
            ("pad_id", int),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                problems.append(
                    f"{name}={value!r} (must be {'an int' if kind is int else 'a number'})"
                )
        if problems:  # the range checks below need numbers
            raise ConfigError("Invalid DecodeConfig: " + "; ".join(problems))
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} (choose from {METHODS})")
        if self.max_decode_len < 1:
            problems.append(f"max_decode_len={self.max_decode_len} (must be >= 1)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (must be >= 0)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} (must be >= 0)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.beam_size < 1:
            problems.append(f"beam_size={self.beam_size} (must be >= 1)")
        if problems:
            raise ConfigError("Invalid DecodeConfig: " + "; ".join(problems))


class Decoded(NamedTuple):
    """tokens: [B, L] (greedy / sample) or [B, beams, L] best first, padded after EOS;
    scores: [B] or [B, beams] (sum of token log-probabilities; beams: length-penalised)."""

    tokens: jax.Array
    scores: jax.Array


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Masks [B, V] logits outside the top-k and outside the smallest set of mass >= top_p."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def sample_or_greedy(
    step_fn: StepFn,
    init_logits: jax.Array,
    state: Any,
    cfg: DecodeConfig,
    rng: jax.Array | None = None,
) -> Decoded:
    """Greedy (cfg.method "greedy" or temperature 0) or sampled decoding."""
    batch = init_logits.shape[0]
    greedy = cfg.method == "greedy" or cfg.temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("sampling needs an rng key")
    rng = jax.random.key(0) if rng is None else rng

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < cfg.max_decode_len) & ~jnp.all(done)

    def body(carry):
        i, logits, state, tokens, done, scores, rng = carry
        logits = logits.astype(jnp.float32)
        # The chosen token's log-probability without writing out [B, V] log-probabilities.
        log_z = jax.nn.logsumexp(logits, axis=-1)
        if greedy:
            tok = jnp.argmax(logits, axis=-1)
        else:
            rng, key = jax.random.split(rng)
            filtered = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
            tok = jax.random.categorical(key, filtered, axis=-1)
        tok = jnp.where(done, cfg.pad_id, tok).astype(jnp.int32)
        tok_logp = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0] - log_z
        scores = scores + jnp.where(done, 0.0, tok_logp)
        tokens = tokens.at[:, i].set(tok)
        done = done | (tok == cfg.eos_id)
        logits, state = step_fn(tok, state)
        return i + 1, logits, state, tokens, done, scores, rng

    carry = (
        jnp.zeros((), jnp.int32),
        init_logits,
        state,
        jnp.full((batch, cfg.max_decode_len), cfg.pad_id, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), jnp.float32),
        rng,
    )
    _, _, _, tokens, _, scores, _ = jax.lax.while_loop(cond, body, carry)
    return Decoded(tokens, scores)


def _length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree: Any, indices: jax.Array, batch: int, beams: int) -> Any:
    """Reorders rows of [B * beams, ...] leaves by per-row beam indices [B, beams]."""
    flat = (indices + jnp.arange(batch)[:, None] * beams).reshape(-1)

    def one(x):
        if x.ndim == 0:
            return x
        return jnp.take(x, flat, axis=0)

    return jax.tree.map(one, tree)


def tile_beams(tree: Any, beams: int) -> Any:
    """[B, ...] leaves -> [B * beams, ...], each row repeated `beams` times."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, beams, axis=0), tree)


def beam_search(step_fn: StepFn, init_logits: jax.Array, state: Any, cfg: DecodeConfig) -> Decoded:
    """Beam search with a GNMT length penalty; returns all beams, best first.

    `state` is given for B rows; it is tiled to B * beam_size rows here. Finished hypotheses
    compete with live ones by length-penalised score; the loop stops early once no live beam can
    beat the worst finished one of its row.
    """
    batch, vocab = init_logits.shape
    k, length = cfg.beam_size, cfg.max_decode_len
    alpha = cfg.length_penalty
    state = tile_beams(state, k)
    logits = jnp.repeat(init_logits, k, axis=0)

    # Only the first beam is live at the start, so the first expansion is not k copies of itself.
    alive_logp = jnp.where(jnp.arange(k)[None, :] == 0, 0.0, NEG_INF) * jnp.ones((batch, 1))
    alive_seq = jnp.full((batch, k, length), cfg.pad_id, jnp.int32)
    fin_seq = jnp.full((batch, k, length), cfg.pad_id, jnp.int32)
    fin_score = jnp.full((batch, k), NEG_INF)

    def cond(carry):
        i, _, _, alive_logp, _, _, fin_score = carry
        # The best a live beam can still reach: its log-prob now, at the most favourable penalty.
        best_alive = alive_logp[:, 0] / _length_penalty(jnp.asarray(length), alpha)
        worst_fin = jnp.min(fin_score, axis=1)
        all_full = jnp.all(fin_score > NEG_INF / 2, axis=1)
        done = all_full & (worst_fin >= best_alive)
        return (i < length) & ~jnp.all(done)

    def body(carry):
        i, logits, state, alive_logp, alive_seq, fin_seq, fin_score = carry
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        cand = (alive_logp[:, :, None] + logp).reshape(batch, k * vocab)
        top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # 2k: enough to keep k live after EOS
        beam, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seq = jnp.take_along_axis(alive_seq, beam[:, :, None], axis=1).at[:, :, i].set(tok)
        is_eos = tok == cfg.eos_id

        # New finished set: the best k of the old finished and the candidates ending in EOS.
        new_fin = jnp.where(is_eos, top_logp / _length_penalty(i + 1, alpha), NEG_INF)
        all_seq = jnp.concatenate([fin_seq, seq], axis=1)
        all_score = jnp.concatenate([fin_score, new_fin], axis=1)
        fin_score, idx = jax.lax.top_k(all_score, k)
        fin_seq = jnp.take_along_axis(all_seq, idx[:, :, None], axis=1)

        # New live set: the best k candidates that did not end.
        live = jnp.where(is_eos, NEG_INF, top_logp)
        alive_logp, idx = jax.lax.top_k(live, k)
        alive_seq = jnp.take_along_axis(seq, idx[:, :, None], axis=1)
        parent = jnp.take_along_axis(beam, idx, axis=1)
        next_tok = jnp.take_along_axis(tok, idx, axis=1).reshape(-1)
        state = _gather_beams(state, parent, batch, k)
        logits, state = step_fn(next_tok, state)
        return i + 1, logits, state, alive_logp, alive_seq, fin_seq, fin_score

    carry = (jnp.zeros((), jnp.int32), logits, state, alive_logp, alive_seq, fin_seq, fin_score)
    _, _, _, alive_logp, alive_seq, fin_seq, fin_score = jax.lax.while_loop(cond, body, carry)

    # Live beams that never finished compete at their current length.
    alive_score = jnp.where(
        alive_logp > NEG_INF / 2, alive_logp / _length_penalty(jnp.asarray(length), alpha), NEG_INF
    )
    all_seq = jnp.concatenate([fin_seq, alive_seq], axis=1)
    all_score = jnp.concatenate([fin_score, alive_score], axis=1)
    scores, order = jax.lax.top_k(all_score, k)  # stable: finished win ties
    return Decoded(jnp.take_along_axis(all_seq, order[:, :, None], axis=1), scores)


def decode(
    step_fn: StepFn,
    init_logits: jax.Array,
    state: Any,
    cfg: DecodeConfig,
    rng: jax.Array | None = None,
) -> Decoded:
    """Dispatches on `cfg.method`."""
    if cfg.method == "beam":
        return beam_search(step_fn, init_logits, state, cfg)
    return sample_or_greedy(step_fn, init_logits, state, cfg, rng)


# ---- model adapters -------------------------------------------------------------------------

_PROJECTIONS = ("q", "k", "v", "o")


def _swap_head_axis(w: jax.Array) -> jax.Array:
    """[N, D, H] <-> [D, N, H] (query / key / value), [N, H, D] <-> [H, N, D] (output)."""
    return jnp.swapaxes(w, 0, 1)


def _loop_model(model: nnx.Module) -> Callable[[], nnx.Module]:
    """A function that rebuilds `model` inside a decoding loop's body, its attention weights
    brought into the layout the step's matmuls read once, before the loop.

    XLA:CPU runs each attention projection as a 2-D matmul over a copy of the weight in
    [D, N, H] (query / key / value) or [H, N, D] (output) order, and inside a while loop it makes
    that copy at every step (a sixth of a step at batch 1, measured). Here each weight is
    transposed once outside the loop and back inside it; the `optimization_barrier` keeps XLA
    from cancelling the pair across the loop boundary, and the inner transpose folds into the
    matmul. The model's math is unchanged (a matmul may add in another order: last-bit
    differences, as between batch sizes). Other backends fold the transposes into their
    matmuls anyway, so there `model` itself is returned (no second copy of the weights).
    Weights the loop does not read (an encoder's) are dropped by XLA with their transposes.
    """
    if jax.default_backend() != "cpu":
        return lambda: model
    graphdef, state = nnx.split(model)
    projections = {
        (*path, name)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Attention)
        for name in _PROJECTIONS
    }
    flat = list(nnx.to_flat_state(state))
    moved = [i for i, (path, _) in enumerate(flat) if path in projections]
    laid = [_swap_head_axis(flat[i][1][...]) for i in moved]

    def rebuild() -> nnx.Module:
        weights = dict(zip(moved, jax.lax.optimization_barrier(laid), strict=True))
        restored = [
            (path, v.replace(_swap_head_axis(weights[i])) if i in weights else v)
            for i, (path, v) in enumerate(flat)
        ]
        return nnx.merge(graphdef, nnx.from_flat_state(restored))

    return rebuild


class DecoderOnlyState(NamedTuple):
    """Decoding state of a DecoderOnly model: its cache and each row's next position [B]."""

    cache: Any
    next_positions: jax.Array


def decoder_only_start(
    model, prompts: jax.Array, prompt_lengths: jax.Array, max_decode_len: int
) -> tuple[StepFn, jax.Array, DecoderOnlyState]:
    """Prefills a DecoderOnly model with right-padded prompts.

    Args:
      model: a `transformer.DecoderOnly`.
      prompts: [B, P] token ids, row b valid up to prompt_lengths[b] (>= 1).
      prompt_lengths: [B] int.
      max_decode_len: tokens to be generated (the cache holds P + max_decode_len slots).
    Returns:
      (step_fn, init_logits [B, V], state) for `decode`.
    """
    b, p = prompts.shape
    segment_ids = (jnp.arange(p)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
    cache = init_cache(model.config, b, p + max_decode_len)
    logits, cache = model(prompts, segment_ids=segment_ids, cache=cache)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    in_loop = _loop_model(model)

    def step_fn(tokens, state: DecoderOnlyState):
        logits, cache = in_loop()(
            tokens[:, None],
            segment_ids=jnp.ones_like(tokens)[:, None],
            positions=state.next_positions[:, None],
            cache=state.cache,
        )
        return logits[:, 0], DecoderOnlyState(cache, state.next_positions + 1)

    return step_fn, last, DecoderOnlyState(cache, prompt_lengths.astype(jnp.int32))


def decoder_only_prompts(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """The prompts of a decoder-only batch: (tokens [B, L], lengths [B]).

    A row's prompt is its `decoder_target_tokens` before the first position with a loss weight
    (the inputs of a prefix-LM row: seqio's PrefixLMFeatureConverter, JSONL inputs with
    targets), or all its non-padding tokens when no position has one (JSONL prompts without
    targets). Lengths are at least 1 (an all-padding row decodes from token 0; its output is
    not written).
    """
    tokens = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    weighted = jnp.zeros(tokens.shape, bool) if weights is None else weights > 0
    first_weighted = jnp.argmax(weighted, axis=1)
    non_padding = jnp.sum(tokens != 0, axis=1)
    lengths = jnp.where(jnp.any(weighted, axis=1), first_weighted, non_padding)
    return tokens, jnp.maximum(lengths, 1).astype(jnp.int32)


class EncoderDecoderState(NamedTuple):
    """Decoding state of an EncoderDecoder: the decoder cache and the cross-attention inputs."""

    cache: Any
    cross: Any


def encoder_decoder_start(
    model,
    encoder_tokens: jax.Array,
    max_decode_len: int,
    *,
    encoder_segment_ids: jax.Array | None = None,
    decoder_start_id: int = 0,
) -> tuple[StepFn, jax.Array, EncoderDecoderState]:
    """Encodes once, projects the cross-attention K/V once, and runs the decoder start token.

    Args:
      model: an `encdec.EncoderDecoder`.
      encoder_tokens: [B, S] (padding id 0 unless `encoder_segment_ids` say otherwise).
      max_decode_len: tokens to be generated.
      decoder_start_id: the first decoder input (t5x / seqio convention: 0, the pad id).
    Returns:
      (step_fn, init_logits [B, V], state) for `decode`.
    """
    b = encoder_tokens.shape[0]
    encoded = model.encode(encoder_tokens, segment_ids=encoder_segment_ids)
    # Head-major K/V: the steps' attention reads them (and the cache) without transposing.
    cross = model.cross_inputs(encoded, head_major=True)
    cache = model.init_cache(b, max_decode_len + 1)
    start = jnp.full((b, 1), decoder_start_id, jnp.int32)
    logits, cache = model.decode(start, cross, cache=cache)
    in_loop = _loop_model(model)

    def step_fn(tokens, state: EncoderDecoderState):
        logits, cache = in_loop().decode(tokens[:, None], state.cross, cache=state.cache)
        return logits[:, 0], EncoderDecoderState(cache, state.cross)

    return step_fn, logits[:, 0], EncoderDecoderState(cache, cross)
