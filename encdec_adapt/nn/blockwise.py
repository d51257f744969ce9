"""Memory-efficient attention: blockwise (flash-style) softmax that never builds [T, S] logits.

`attention(q, k, v, mask)` computes exactly what `Attention.attend`'s materialising path computes
(grouped-query attention, optional tanh logit soft-cap, the masks of `MaskSpec`) but walks over
query blocks and, per query block, over key blocks with an online softmax (running max, running
sum, running output). A custom VJP recomputes each block's logits in the backward pass, so
neither pass stores per-block logits or probabilities: memory is O(T + S) per head plus one
[block_q, block_k] tile.

Masks are never materialised either: each tile's mask is rebuilt from the tile's positions and
segment ids (same rules as `attention.attention_mask`). Key blocks that no query of a block can
see (by per-block min/max of positions and segment ids: future blocks under a causal mask,
blocks outside a sliding window, other packed segments, padding) are skipped at run time, so a
sliding-window layer costs O(T x window), a causal one about half of a bidirectional one.

A query that sees no key at all (padding, or a decoder segment without encoder tokens) gets the
mean of all values, as the materialising path's uniform softmax over equal masked logits does.

Which implementation runs (`select_impl`), per call, from `GemmaConfig.attention_impl`:
  "xla"        the materialising path ([B, K, G, T, S] float32 logits), today's numerics.
  "blockwise"  this module (any backend, every feature).
  "cudnn"      `jax.nn.dot_product_attention(implementation="cudnn")` with the boolean mask
               (GPU only; no logit soft-cap; bfloat16 / float16; head_dim <= 256, a multiple
               of 8). Requesting it where that does not hold is an error.
  "auto"       (default) "xla" while T * S <= AUTO_BLOCKWISE_MIN_LOGITS (1024 * 1024, so every
               sequence of up to 1,024 tokens per side keeps today's exact path); above it
               "cudnn" where "cudnn" is allowed, else "blockwise".
The environment variable ENCDEC_ADAPT_ATTENTION_IMPL, when set, overrides the config (tests and
benchmarks use it to force one path).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "blockwise", "cudnn")
#: "auto" keeps the materialising path while q_len * kv_len is at most this.
AUTO_BLOCKWISE_MIN_LOGITS = 1024 * 1024
ENV_VAR = "ENCDEC_ADAPT_ATTENTION_IMPL"
DEFAULT_BLOCK = 512

# Same value as attention._MASK_VALUE.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def cudnn_allowed(
    *, soft_cap: float | None, dtype, head_dim: int, backend: str | None = None
) -> bool:
    """Whether the cuDNN fused attention can run a layer with these features."""
    backend = jax.default_backend() if backend is None else backend
    return (
        backend == "gpu"
        and soft_cap is None
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim <= 256
        and head_dim % 8 == 0
    )


def select_impl(
    requested: str,
    *,
    q_len: int,
    kv_len: int,
    soft_cap: float | None,
    dtype=jnp.float32,
    head_dim: int = 256,
    backend: str | None = None,
) -> str:
    """The implementation ("xla", "blockwise" or "cudnn") a call runs; see the module docstring."""
    requested = os.environ.get(ENV_VAR) or requested
    if requested not in IMPLS:
        raise ValueError(f"attention_impl={requested!r} (expected one of {IMPLS})")
    ok = cudnn_allowed(soft_cap=soft_cap, dtype=dtype, head_dim=head_dim, backend=backend)
    if requested == "cudnn" and not ok:
        raise ValueError(
            "attention_impl='cudnn' needs a GPU, no attention logit soft-cap, bfloat16/float16 "
            f"and head_dim <= 256 (multiple of 8); got soft_cap={soft_cap}, dtype={dtype}, "
            f"head_dim={head_dim}, backend={backend or jax.default_backend()}"
        )
    if requested != "auto":
        return requested
    if q_len * kv_len <= AUTO_BLOCKWISE_MIN_LOGITS:
        return "xla"
    return "cudnn" if ok else "blockwise"


class _Static(NamedTuple):
    causal: bool
    window: int | None
    soft_cap: float | None
    block_q: int
    block_k: int
    kv_len: int  # keys before padding (the fully-masked rows average over these)
    has_exempt: bool
    window_ahead: int | None = None  # bidirectional keys after the query: k - q < this


def _ahead(st: _Static) -> int:
    """The bidirectional window for keys after the query (symmetric unless window_ahead)."""
    return st.window if st.window_ahead is None else st.window_ahead


def _block_mask(st: _Static, qp, qs, kp, ks, kx):
    """[B, bq] query and [B, bk] key positions / segments -> [B, bq, bk] visibility."""
    mask = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] != 0)
    rule = None
    q_pos, k_pos = qp[:, :, None], kp[:, None, :]
    if st.causal:
        rule = k_pos <= q_pos
    if st.window is not None:
        dist = q_pos - k_pos
        if st.causal:
            near = dist < st.window
        else:
            near = jnp.where(dist >= 0, dist < st.window, -dist < _ahead(st))
        rule = near if rule is None else rule & near
    if rule is not None:
        if kx is not None:
            rule = rule | kx[:, None, :]
        mask &= rule
    return mask


def _plan(st: _Static, qp, qs, kp, ks, kx):
    """Which key blocks each query block may see: (possible [nq, nk], lo [nq], hi [nq]).

    Conservative: a block pair is kept when the ranges of its positions / segment ids allow a
    visible pair for some batch row; key blocks outside [lo, hi) are never visited.
    """
    b, tp = qp.shape
    sp = kp.shape[1]
    nq, nk = tp // st.block_q, sp // st.block_k
    big = jnp.iinfo(jnp.int32).max // 4

    def summary(x, valid, blocks):  # [B, L] -> min, max over valid entries of each block
        x = x.reshape(b, blocks, -1)
        valid = valid.reshape(b, blocks, -1)
        return jnp.min(jnp.where(valid, x, big), -1), jnp.max(jnp.where(valid, x, -big), -1)

    qv = qs != 0
    qs_min, qs_max = summary(qs, qv, nq)
    qp_min, qp_max = summary(qp, qv, nq)

    def seg_ok(valid):
        ks_min, ks_max = summary(ks, valid, nk)
        lo = jnp.maximum(qs_min[:, :, None], ks_min[:, None, :])
        hi = jnp.minimum(qs_max[:, :, None], ks_max[:, None, :])
        return lo <= hi  # [B, nq, nk]; False when either side has no valid entry

    kv = ks != 0
    local = kv if kx is None else kv & ~kx
    ok = seg_ok(local)
    kp_min, kp_max = summary(kp, local, nk)
    q_min, q_max = qp_min[:, :, None], qp_max[:, :, None]
    k_min, k_max = kp_min[:, None, :], kp_max[:, None, :]
    if st.causal:
        ok &= k_min <= q_max
    if st.window is not None:
        ok &= q_min - k_max < st.window
        if not st.causal:
            ok &= k_min - q_max < _ahead(st)
    if kx is not None:
        ok |= seg_ok(kv & kx)
    possible = jnp.any(ok, axis=0)  # [nq, nk]
    any_k = jnp.any(possible, axis=1)
    lo = jnp.where(any_k, jnp.argmax(possible, axis=1), 0).astype(jnp.int32)
    hi = jnp.where(any_k, nk - jnp.argmax(possible[:, ::-1], axis=1), 0).astype(jnp.int32)
    return possible, lo, hi


def _slice(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _logits(st: _Static, qi, kj):
    """[B, bq, K, G, H] x [B, bk, K, H] -> (soft-capped logits, tanh or None) [B, K, G, bq, bk]."""
    x = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32)
    if st.soft_cap is None:
        return x, None
    t = jnp.tanh(x / st.soft_cap)
    return t * st.soft_cap, t


def _tile_mask(st, aux, i, j):
    qp, qs, kp, ks, kx = aux[:5]
    bq, bk = st.block_q, st.block_k
    return _block_mask(
        st,
        _slice(qp, i * bq, bq),
        _slice(qs, i * bq, bq),
        _slice(kp, j * bk, bk),
        _slice(ks, j * bk, bk),
        None if kx is None else _slice(kx, j * bk, bk),
    )[:, None, None]


def _forward(st: _Static, q, k, v, aux):
    """q [B, Tp, K, G, H], k / v [B, Sp, K, H] -> (out [B, Tp, K, G, H] in v.dtype,
    lse [B, K, G, Tp] float32 with +inf on rows that see no key)."""
    possible, lo, hi = aux[5:]
    b, tp, nkv, g, h = q.shape
    bq, bk = st.block_q, st.block_k
    mean_v = jnp.mean(v[:, : st.kv_len].astype(jnp.float32), axis=1)  # [B, K, H]

    def q_block(i):
        qi = _slice(q, i * bq, bq)

        def body(j, carry):
            def compute(carry):
                m, l_sum, acc = carry
                kj, vj = _slice(k, j * bk, bk), _slice(v, j * bk, bk)
                mask = _tile_mask(st, aux, i, j)
                s, _ = _logits(st, qi, kj)
                s = jnp.where(mask, s, MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                l_sum = l_sum * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bskh->bkgqh", p.astype(v.dtype), vj, preferred_element_type=jnp.float32
                )
                return m_new, l_sum, acc * corr[..., None] + pv

            return jax.lax.cond(possible[i, j], compute, lambda c: c, carry)

        init = (
            jnp.full((b, nkv, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, nkv, g, bq), jnp.float32),
            jnp.zeros((b, nkv, g, bq, h), jnp.float32),
        )
        m, l_sum, acc = jax.lax.fori_loop(lo[i], hi[i], body, init)
        empty = l_sum == 0
        out = jnp.where(
            empty[..., None],
            mean_v[:, :, None, None, :],
            acc / jnp.where(empty, 1.0, l_sum)[..., None],
        )
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l_sum)))
        return out.astype(v.dtype), lse

    out, lse = jax.lax.map(q_block, jnp.arange(tp // bq))  # [nq, B, K, G, bq, (H)]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, tp, nkv, g, h)
    lse = jnp.transpose(lse, (1, 2, 3, 0, 4)).reshape(b, nkv, g, tp)
    return out, lse


def _backward(st: _Static, q, k, v, aux, out, lse, d_out):
    possible, lo, hi = aux[5:]
    b, tp, nkv, g, h = q.shape
    sp = k.shape[1]
    bq, bk = st.block_q, st.block_k
    d_out32 = d_out.astype(jnp.float32)
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out32, out.astype(jnp.float32))

    def q_step(carry, i):
        dk, dv = carry
        qi, doi = _slice(q, i * bq, bq), _slice(d_out, i * bq, bq)
        lse_i, delta_i = _slice(lse, i * bq, bq, 3), _slice(delta, i * bq, bq, 3)

        def body(j, c):
            def compute(c):
                dq_i, dk, dv = c
                kj, vj = _slice(k, j * bk, bk), _slice(v, j * bk, bk)
                mask = _tile_mask(st, aux, i, j)
                s, t = _logits(st, qi, kj)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])
                if t is not None:
                    ds = ds * (1.0 - t * t)
                dq_i = dq_i + jnp.einsum("bkgqs,bskh->bqkgh", ds, kj.astype(jnp.float32))
                dk_j = jnp.einsum("bkgqs,bqkgh->bskh", ds, qi.astype(jnp.float32))
                dv_j = jnp.einsum("bkgqs,bqkgh->bskh", p, doi.astype(jnp.float32))
                dk = jax.lax.dynamic_update_slice_in_dim(
                    dk, _slice(dk, j * bk, bk) + dk_j, j * bk, 1
                )
                dv = jax.lax.dynamic_update_slice_in_dim(
                    dv, _slice(dv, j * bk, bk) + dv_j, j * bk, 1
                )
                return dq_i, dk, dv

            return jax.lax.cond(possible[i, j], compute, lambda c: c, c)

        dq_i = jnp.zeros((b, bq, nkv, g, h), jnp.float32)
        dq_i, dk, dv = jax.lax.fori_loop(lo[i], hi[i], body, (dq_i, dk, dv))
        return (dk, dv), dq_i

    zeros = jnp.zeros((b, sp, nkv, h), jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), jnp.arange(tp // bq))
    dq = jnp.swapaxes(dq, 0, 1).reshape(b, tp, nkv, g, h)
    # Rows that see no key output the mean of the first kv_len values.
    empty = jnp.transpose(jnp.isinf(lse), (0, 3, 1, 2))  # [B, Tp, K, G]
    d_mean = jnp.einsum("btkg,btkgh->bkh", empty.astype(jnp.float32), d_out32) / st.kv_len
    valid = (jnp.arange(sp) < st.kv_len).astype(jnp.float32)
    dv = dv + valid[None, :, None, None] * d_mean[:, None]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, aux):
    return _forward(st, q, k, v, aux)[0]


def _attention_fwd(st, q, k, v, aux):
    out, lse = _forward(st, q, k, v, aux)
    return out, (q, k, v, aux, out, lse)


def _attention_bwd(st, res, d_out):
    q, k, v, aux, out, lse = res
    dq, dk, dv = _backward(st, q, k, v, aux, out, lse, d_out)
    d_aux = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), aux)
    return dq, dk, dv, d_aux


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad(x, length, axis=1, value=0):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask,
    *,
    soft_cap: float | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Blockwise attention.

    Args:
      q: [B, T, K, G, H] queries (already scaled), K key/value heads of G query heads each.
      k, v: [B, S, K, H].
      mask: an `attention.MaskSpec` (positions, segment ids, causal, window, exempt keys).
      soft_cap: tanh soft-cap of the logits (None: off).
      block_q, block_k: tile sizes (clipped to the lengths); lengths need not be multiples.
    Returns:
      [B, T, K, G, H] in v.dtype.
    """
    t, s = q.shape[1], k.shape[1]
    block_q, block_k = min(block_q, t), min(block_k, s)
    tp = -(-t // block_q) * block_q
    sp = -(-s // block_k) * block_k
    st = _Static(
        causal=bool(mask.causal),
        window=mask.window,
        window_ahead=mask.window_ahead,
        soft_cap=soft_cap,
        block_q=block_q,
        block_k=block_k,
        kv_len=s,
        has_exempt=mask.k_exempt is not None,
    )
    i32 = jnp.int32
    qp = _pad(mask.q_positions.astype(i32), tp)
    qs = _pad(mask.q_segments.astype(i32), tp)
    kp = _pad(mask.k_positions.astype(i32), sp)
    ks = _pad(mask.k_segments.astype(i32), sp)
    kx = None if mask.k_exempt is None else _pad(mask.k_exempt.astype(bool), sp)
    plan = _plan(st, qp, qs, kp, ks, kx)
    aux = (qp, qs, kp, ks, kx, *plan)
    out = _attention(st, _pad(q, tp), _pad(k, sp), _pad(v, sp), aux)
    return out[:, :t]
