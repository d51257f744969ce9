"""Vocabulary losses that never hold [B, T, V] logits: chunked over tokens.

The final hidden states [B, T, D] are flattened to N = B * T tokens and cut into chunks of
`chunk_tokens`; a `lax.scan` computes each chunk's logits through the output head (the tied
embedding or `lm_head`, then the final soft-cap exactly as `transformer.output_logits`), its
loss sums with the very functions of `losses` (cross-entropy with weights, z-loss, label
smoothing; KL for distillation), and adds them up. The chunk body is `jax.checkpoint`ed, so the
backward pass recomputes one chunk's logits at a time as well: peak memory is a few
[chunk_tokens, V] float32 arrays instead of [B, T, V].

The model API (`generative.py`) chooses with `loss_chunk_tokens` (`resolve_chunk_tokens`):
None (default, "auto") chunks by DEFAULT_CHUNK_TOKENS only when B * T * V exceeds
AUTO_MIN_LOGITS (2**28 float32 = 1 GiB of logits), so short sequences and small vocabularies
keep today's exact numerics; 0 never chunks; a positive value always chunks by that many tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from encdec_adapt.models import losses

DEFAULT_CHUNK_TOKENS = 256
AUTO_MIN_LOGITS = 2**28


def resolve_chunk_tokens(setting: int | None, tokens: int, vocab_size: int) -> int:
    """Chunk size in tokens for a loss over `tokens` (B * T) targets, 0 for the full logits."""
    if setting is None:
        return DEFAULT_CHUNK_TOKENS if tokens * vocab_size > AUTO_MIN_LOGITS else 0
    if setting < 0:
        raise ValueError(f"loss_chunk_tokens={setting} must be None (auto), 0 (off) or > 0")
    return int(setting)


def project(hidden: jax.Array, head: jax.Array, soft_cap: float | None) -> jax.Array:
    """[..., D] hidden states and the [V, D] output head -> [..., V] logits, as
    `transformer.output_logits` computes them (float32 when soft-capped)."""
    logits = jnp.einsum("...d,vd->...v", hidden, head.astype(hidden.dtype))
    if soft_cap is None:
        return logits
    return jnp.tanh(logits.astype(jnp.float32) / soft_cap) * soft_cap


def _chunks(chunk_tokens: int, *arrays):
    """Flattens [B, T, ...] arrays to [num_chunks, chunk_tokens, ...], zero-padded."""
    n = arrays[0].shape[0] * arrays[0].shape[1]
    num = -(-n // chunk_tokens)
    out = []
    for a in arrays:
        flat = a.reshape(n, *a.shape[2:])
        pad = [(0, num * chunk_tokens - n)] + [(0, 0)] * (flat.ndim - 1)
        out.append(jnp.pad(flat, pad).reshape(num, chunk_tokens, *a.shape[2:]))
    return out


def _sum_scan(body, xs, init):
    def step(carry, x):
        out = jax.checkpoint(body)(x)
        return jax.tree.map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(step, init, xs)
    return total


def _zero_token_loss():
    z = jnp.zeros((), jnp.float32)
    return losses.TokenLoss(z, z, z, z)


def cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    soft_cap: float | None,
    chunk_tokens: int,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> losses.TokenLoss:
    """`losses.cross_entropy(project(hidden, head, soft_cap), targets, weights, ...)` chunk by
    chunk. hidden: [B, T, D]; head: [V, D]; targets, weights: [B, T]."""
    h, tg, w = _chunks(chunk_tokens, hidden, targets, weights.astype(jnp.float32))

    def body(x):
        h_c, t_c, w_c = x
        logits = project(h_c, head, soft_cap)
        return losses.cross_entropy(
            logits, t_c, w_c, z_loss=z_loss, label_smoothing=label_smoothing
        )

    return _sum_scan(body, (h, tg, w), _zero_token_loss())


def distillation(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher_hidden: jax.Array,
    teacher_head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    student_soft_cap: float | None,
    teacher_soft_cap: float | None,
    chunk_tokens: int,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[losses.TokenLoss, jax.Array]:
    """Cross-entropy of the student and KL(teacher || student) (`losses.kl_divergence`), chunk
    by chunk: (TokenLoss, KL sum). The teacher (hidden states and head) gets no gradient."""
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_head = jax.lax.stop_gradient(teacher_head)
    h, th, tg, w = _chunks(
        chunk_tokens, student_hidden, teacher_hidden, targets, weights.astype(jnp.float32)
    )

    def body(x):
        h_c, th_c, t_c, w_c = x
        logits = project(h_c, student_head, student_soft_cap)
        tl = losses.cross_entropy(logits, t_c, w_c, z_loss=z_loss, label_smoothing=label_smoothing)
        t_logits = project(th_c, teacher_head, teacher_soft_cap)
        kd = losses.kl_divergence(logits, t_logits, w_c, temperature=temperature)
        return tl, kd

    return _sum_scan(body, (h, th, tg, w), (_zero_token_loss(), jnp.zeros((), jnp.float32)))
