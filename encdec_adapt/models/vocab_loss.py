"""Vocabulary losses that never hold [B, T, V] logits: chunked over tokens.

The final hidden states [B, T, D] are flattened to N = B * T tokens. The forward pass cuts them
into chunks of `chunk_tokens` and, in a `lax.scan`, computes each chunk's logits through the
output head (the tied embedding or `lm_head`, then the final soft-cap exactly as
`transformer.output_logits`) and its loss sums with the very functions of `losses`
(cross-entropy with weights, z-loss, label smoothing; KL for distillation); it keeps only each
token's log-normalisers. A custom VJP computes the gradients one *vocabulary* block at a time:
each block's logits for all N tokens are recomputed, turned into d logits in closed form
(softmax minus the smoothed one-hot, the z-loss and KL terms, the soft-cap's derivative), and
write that block's rows of d head directly (no [V, D] accumulator, no per-chunk [V, D]
temporary) and one term of d hidden. Peak memory is a few [chunk_tokens, V] or
[N, block] float32 tiles plus one [V, D] gradient, instead of [B, T, V] logits (or, with a
token-chunked `jax.checkpoint`, several [V, D] float32 buffers: the per-chunk head gradient,
the accumulator and its update).

The model API (`generative.py`) chooses with `loss_chunk_tokens` (`resolve_chunk_tokens`):
None (default, "auto") chunks by DEFAULT_CHUNK_TOKENS only when B * T * V exceeds
AUTO_MIN_LOGITS (2**28 float32 = 1 GiB of logits), so short sequences and small vocabularies
keep today's exact numerics; 0 never chunks; a positive value always chunks by that many tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

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


def _zero_token_loss():
    z = jnp.zeros((), jnp.float32)
    return losses.TokenLoss(z, z, z, z)


class _Static(NamedTuple):
    soft_cap: float | None
    teacher_soft_cap: float | None
    chunk_tokens: int
    vocab_block: int
    z_loss: float
    label_smoothing: float
    temperature: float
    distill: bool


def _vocab_block(chunk_tokens: int, tokens: int, vocab: int) -> int:
    """Vocabulary rows per block of the backward pass: [tokens, block] tiles hold about as much
    as the forward pass's [chunk_tokens, vocab] ones (a multiple of 128, at most `vocab`)."""
    block = -(-chunk_tokens * vocab // max(tokens, 1))
    return min(vocab, max(128, -(-block // 128) * 128))


def _forward(st: _Static, h, head, th, t_head, targets, weights):
    """Loss sums (TokenLoss, KL sum) and per-token log-normalisers of every softmax, chunk by
    chunk over tokens. h, th: [N, D] with N a multiple of chunk_tokens; targets, weights: [N]."""
    n = h.shape[0]
    c = st.chunk_tokens
    xs = [x.reshape(n // c, c, *x.shape[1:]) for x in (h, targets, weights)]
    if st.distill:
        xs.append(th.reshape(n // c, c, th.shape[-1]))

    def body(carry, x):
        h_c, t_c, w_c = x[:3]
        logits = project(h_c, head, st.soft_cap).astype(jnp.float32)
        tl = losses.cross_entropy(
            logits, t_c, w_c, z_loss=st.z_loss, label_smoothing=st.label_smoothing
        )
        lse = [jax.nn.logsumexp(logits, axis=-1)]
        kd = jnp.zeros((), jnp.float32)
        if st.distill:
            t_logits = project(x[3], t_head, st.teacher_soft_cap).astype(jnp.float32)
            kd = losses.kl_divergence(logits, t_logits, w_c, temperature=st.temperature)
            lse += [
                jax.nn.logsumexp(logits / st.temperature, axis=-1),
                jax.nn.logsumexp(t_logits / st.temperature, axis=-1),
            ]
        carry = jax.tree.map(jnp.add, carry, (tl, kd))
        return carry, jnp.stack(lse)

    (tl, kd), lse = jax.lax.scan(body, (_zero_token_loss(), jnp.zeros((), jnp.float32)), xs)
    return (tl, kd), jnp.moveaxis(lse, 1, 0).reshape(lse.shape[1], n)


def _capped(r, cap):
    """Raw projections -> (float32 logits, d logits / d raw or None)."""
    r = r.astype(jnp.float32)
    if cap is None:
        return r, None
    t = jnp.tanh(r / cap)
    return t * cap, 1.0 - t * t


def _backward(st: _Static, res, g):
    """Gradients of the loss sums w.r.t. h and head, one vocabulary block at a time: each
    block's logits for all N tokens are recomputed, turned into d logits with the saved
    log-normalisers, and give that block's rows of d head (a scan output, never accumulated)
    and a term of d h (the carry)."""
    h, head, th, t_head, targets, weights, lse = res
    (g_loss, g_z, _, _), g_kd = g
    n, d = h.shape
    vocab, vb = head.shape[0], st.vocab_block
    nv = -(-vocab // vb)
    pad = nv * vb - vocab

    def blocks(x):
        return jnp.pad(x, [(0, pad), (0, 0)]).reshape(nv, vb, x.shape[-1])

    w = weights.astype(jnp.float32)
    log_z = lse[0]
    if st.label_smoothing:
        on, off = 1.0 - st.label_smoothing, st.label_smoothing / (vocab - 1)
    else:
        on, off = 1.0, 0.0
    # d loss / d logits = coef * p - w * g_loss * q (q: smoothed one-hot), + the KL term.
    coef = w * (g_loss * (1.0 + 2.0 * st.z_loss * log_z) + g_z * 2.0 * st.z_loss * log_z)
    head_blocks = blocks(head)
    t_blocks = blocks(t_head) if st.distill else None

    def body(j, carry):
        dh, d_head = carry
        head_b = head_blocks[j]
        cols = j * vb + jnp.arange(vb)
        valid = cols < vocab
        logits, dcap = _capped(jnp.einsum("nd,vd->nv", h, head_b.astype(h.dtype)), st.soft_cap)
        p = jnp.exp(logits - log_z[:, None])
        q = jnp.where(targets[:, None] == cols[None, :], on, off)
        dl = coef[:, None] * p - (w * g_loss)[:, None] * q
        if st.distill:
            t_logits, _ = _capped(
                jnp.einsum("nd,vd->nv", th, t_blocks[j].astype(th.dtype)), st.teacher_soft_cap
            )
            temp = st.temperature
            p_s = jnp.exp(logits / temp - lse[1][:, None])
            p_t = jnp.exp(t_logits / temp - lse[2][:, None])
            dl = dl + (w * g_kd * temp)[:, None] * (p_s - p_t)
        if dcap is not None:
            dl = dl * dcap
        dl = jnp.where(valid[None, :], dl, 0.0)
        d_head_b = jnp.einsum("nv,nd->vd", dl, h.astype(jnp.float32))
        d_head = jax.lax.dynamic_update_index_in_dim(d_head, d_head_b.astype(head.dtype), j, 0)
        return dh + jnp.einsum("nv,vd->nd", dl, head_b.astype(jnp.float32)), d_head

    # The [V, D] output buffer starts as zeros that depend on the forward pass's last result
    # (the cotangent alone does not do: it is 1 / the batch's weight sum, known at the start),
    # so XLA cannot allocate it at the start of the step (it did: 0.6 GiB live through the
    # whole forward pass at 8,192 tokens of t5gemma_270m_270m).
    tie = (jnp.zeros((), jnp.float32) * (g_loss + lse[0, -1])).astype(head.dtype)
    init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((nv, vb, d), head.dtype) + tie)
    dh, d_head = jax.lax.fori_loop(0, nv, body, init)
    d_head = d_head.reshape(nv * vb, d)[:vocab]
    return dh.astype(h.dtype), d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss(st: _Static, h, head, th, t_head, targets, weights):
    return _forward(st, h, head, th, t_head, targets, weights)[0]


def _loss_fwd(st, h, head, th, t_head, targets, weights):
    out, lse = _forward(st, h, head, th, t_head, targets, weights)
    return out, (h, head, th, t_head, targets, weights, lse)


def _loss_bwd(st, res, g):
    dh, d_head = _backward(st, res, g)
    # The teacher, the targets and the weights get no gradient (None: a symbolic zero).
    return dh, d_head, None, None, None, None


_loss.defvjp(_loss_fwd, _loss_bwd)


def _run(
    hidden,
    head,
    teacher_hidden,
    teacher_head,
    targets,
    weights,
    chunk_tokens,
    vocab_block,
    **static,
) -> tuple[losses.TokenLoss, jax.Array]:
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be > 0")
    distill = teacher_hidden is not None
    arrays = [hidden, targets, weights.astype(jnp.float32)]
    if distill:
        arrays.append(teacher_hidden)
    # [N, ...] with N a multiple of chunk_tokens; padding tokens have weight 0.
    flat = [x.reshape(-1, *x.shape[2:]) for x in _chunks(chunk_tokens, *arrays)]
    st = _Static(
        chunk_tokens=chunk_tokens,
        vocab_block=vocab_block or _vocab_block(chunk_tokens, flat[0].shape[0], head.shape[0]),
        distill=distill,
        **static,
    )
    th = flat[3] if distill else None
    return _loss(st, flat[0], head, th, teacher_head, flat[1], flat[2])


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
    vocab_block: int | None = None,
) -> losses.TokenLoss:
    """`losses.cross_entropy(project(hidden, head, soft_cap), targets, weights, ...)` chunk by
    chunk. hidden: [B, T, D]; head: [V, D]; targets, weights: [B, T]; vocab_block: vocabulary
    rows per block of the backward pass (default: `_vocab_block`, tiles as large as the forward
    pass's chunks)."""
    tl, _ = _run(
        hidden,
        head,
        None,
        None,
        targets,
        weights,
        chunk_tokens,
        vocab_block,
        soft_cap=soft_cap,
        teacher_soft_cap=None,
        z_loss=float(z_loss),
        label_smoothing=float(label_smoothing),
        temperature=1.0,
    )
    return tl


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
    vocab_block: int | None = None,
) -> tuple[losses.TokenLoss, jax.Array]:
    """Cross-entropy of the student and KL(teacher || student) (`losses.kl_divergence`), chunk
    by chunk: (TokenLoss, KL sum). The teacher (hidden states and head) gets no gradient."""
    return _run(
        student_hidden,
        student_head,
        jax.lax.stop_gradient(teacher_hidden),
        jax.lax.stop_gradient(teacher_head),
        targets,
        weights,
        chunk_tokens,
        vocab_block,
        soft_cap=student_soft_cap,
        teacher_soft_cap=teacher_soft_cap,
        z_loss=float(z_loss),
        label_smoothing=float(label_smoothing),
        temperature=float(temperature),
    )
