"""Blockwise attention and the chunked vocabulary loss against the materialising paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.nn import blockwise
from encdec_adapt.nn.attention import KV, Attention, MaskSpec, concat_keys
from encdec_adapt.nn.transformer import default_positions

B, K, G, H = 2, 2, 2, 8


def _attn(soft_cap, impl):
    return Attention(
        embed_dim=16,
        num_heads=K * G,
        num_kv_heads=K,
        head_dim=H,
        query_pre_attn_scalar=H,
        attn_logits_soft_cap=soft_cap,
        use_qk_norm=False,
        rms_norm_eps=1e-6,
        rope_base=None,
        attention_impl=impl,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )


def _packed_segments(rng, length, pad):
    """[B, length] segment ids: a few packed documents then `pad` padding tokens per row."""
    rows = []
    for _ in range(B):
        cuts = np.sort(rng.choice(np.arange(1, length - pad), size=2, replace=False))
        seg = np.zeros(length, np.int32)
        seg[: cuts[0]] = 1
        seg[cuts[0] : cuts[1]] = 2
        seg[cuts[1] : length - pad] = 3
        rows.append(seg)
    return jnp.asarray(np.stack(rows))


def _masks(kind, t, s, rng):
    ones_t = jnp.ones((B, t), jnp.int32)
    pos_t = default_positions(ones_t)
    if kind == "causal":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, causal=True)
    if kind == "bidirectional":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t)
    if kind == "causal_window":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, causal=True, window=7)
    if kind == "symmetric_window":
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, window=6)
    if kind == "split_window":  # T5Gemma 2's encoder: fewer keys behind than ahead
        return MaskSpec(pos_t, ones_t, pos_t, ones_t, window=3, window_ahead=11)
    if kind == "packed":
        seg = _packed_segments(rng, t, pad=5)
        pos = default_positions(seg)
        return MaskSpec(pos, seg, pos, seg, causal=True, window=9)
    if kind == "packed_bidirectional":
        seg = _packed_segments(rng, t, pad=3)
        pos = default_positions(seg)
        return MaskSpec(pos, seg, pos, seg)
    if kind == "cross":
        enc = jnp.asarray(np.stack([np.r_[np.ones(s - 4), np.zeros(4)], np.ones(s)]), jnp.int32)
        return MaskSpec(pos_t, ones_t, jnp.zeros_like(enc), enc)
    if kind == "cross_packed":
        dec = _packed_segments(rng, t, pad=2)
        enc = _packed_segments(rng, s, pad=6)
        return MaskSpec(default_positions(dec), dec, jnp.zeros_like(enc), enc)
    if kind == "merged":
        self_mask = MaskSpec(pos_t, ones_t, pos_t, ones_t, causal=True, window=5)
        enc = jnp.asarray(np.stack([np.r_[np.ones(s - t - 3), np.zeros(3)]] * B), jnp.int32)
        return concat_keys(self_mask, MaskSpec(pos_t, ones_t, jnp.zeros_like(enc), enc))
    raise ValueError(kind)


KINDS = [
    "causal",
    "bidirectional",
    "causal_window",
    "symmetric_window",
    "split_window",
    "packed",
    "packed_bidirectional",
    "cross",
    "cross_packed",
    "merged",
]


def _kinds_by_cap():
    """Every mask kind with and without a soft-cap; the default suite runs each kind once,
    alternating the soft-cap between kinds, and `slow` runs the other half."""
    for i, kind in enumerate(KINDS):
        for j, cap in enumerate((None, 5.0)):
            marks = [pytest.mark.slow] if (i + j) % 2 else []
            yield pytest.param(kind, cap, marks=marks, id=f"{kind}-{cap}")


@pytest.mark.parametrize("kind,soft_cap", list(_kinds_by_cap()))
def test_blockwise_matches_materialised(kind, soft_cap):
    rng = np.random.default_rng(hash(kind) % 1000)
    t = 37
    s = {"cross": 29, "cross_packed": 45, "merged": t + 23}.get(kind, t)
    mask = _masks(kind, t, s, rng)
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (B, t, K * G, H)) * 2.0 + 0.3
    k = jax.random.normal(keys[1], (B, s, K, H)) * 1.5 - 0.2
    v = jax.random.normal(keys[2], (B, s, K, H)) + 0.5
    ref_attn, blk_attn = _attn(soft_cap, "xla"), _attn(soft_cap, "blockwise")
    blocks = {"block_q": 8, "block_k": 16}

    def ref(q, k, v):
        return ref_attn.attend(q, KV(k, v), mask)

    def blk(q, k, v):
        b, t_, n, h = q.shape
        out = blockwise.attention(
            q.reshape(b, t_, K, G, h), k, v, mask, soft_cap=soft_cap, **blocks
        )
        out = out.reshape(b, t_, n, h)
        return jnp.einsum("btnh,nhd->btd", out, blk_attn.o[...])

    np.testing.assert_allclose(jax.jit(blk)(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    w = jax.random.normal(jax.random.key(7), (B, t, 16))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)

    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    g_blk = jax.jit(jax.grad(loss(blk), argnums=(0, 1, 2)))(q, k, v)
    for a, b_ in zip(g_blk, g_ref, strict=True):
        np.testing.assert_allclose(a, b_, atol=1e-5, rtol=1e-5)
    # Through `attend` with the default block size as well (one tile: T, S < 512).
    np.testing.assert_allclose(
        jax.jit(lambda q, k, v: blk_attn.attend(q, KV(k, v), mask))(q, k, v),
        ref(q, k, v),
        atol=1e-5,
        rtol=1e-5,
    )


def test_blockwise_skips_key_blocks_outside_the_window():
    t = 64
    ones = jnp.ones((1, t), jnp.int32)
    pos = default_positions(ones)
    st = blockwise._Static(True, 8, None, 8, 8, t, False)
    possible, lo, hi = blockwise._plan(st, pos, ones, pos, ones, None)
    # Query block i sees key blocks i - 1 and i only.
    assert np.asarray(possible).sum() == 2 * (t // 8) - 1
    np.testing.assert_array_equal(lo, np.maximum(np.arange(8) - 1, 0))
    np.testing.assert_array_equal(hi, np.arange(8) + 1)


def test_select_impl(monkeypatch):
    monkeypatch.delenv(blockwise.ENV_VAR, raising=False)
    sel = blockwise.select_impl
    short = dict(q_len=512, kv_len=512, soft_cap=None)
    long = dict(q_len=4096, kv_len=4096, soft_cap=None)
    assert sel("auto", **short) == "xla"
    assert sel("auto", q_len=1024, kv_len=1024, soft_cap=50.0) == "xla"
    assert sel("auto", **long, backend="cpu") == "blockwise"
    assert sel("auto", **long, dtype=jnp.bfloat16, backend="gpu") == "cudnn"
    assert sel("auto", **long, dtype=jnp.float32, backend="gpu") == "blockwise"
    assert sel("auto", q_len=4096, kv_len=4096, soft_cap=50.0, backend="gpu") == "blockwise"
    assert sel("auto", **long, dtype=jnp.bfloat16, head_dim=512, backend="gpu") == "blockwise"
    assert sel("blockwise", **short) == "blockwise"
    assert sel("xla", **long) == "xla"
    with pytest.raises(ValueError, match="cudnn"):
        sel("cudnn", **short, backend="cpu")
    with pytest.raises(ValueError, match="attention_impl"):
        sel("flash", **short)
    monkeypatch.setenv(blockwise.ENV_VAR, "blockwise")
    assert sel("auto", **short) == "blockwise"


# --- chunked vocabulary loss ---------------------------------------------------------------


def _loss_inputs(t=13, d=12, v=50):
    keys = jax.random.split(jax.random.key(3), 4)
    hidden = jax.random.normal(keys[0], (B, t, d)) * 1.5 + 0.1
    head = jax.random.normal(keys[1], (v, d)) * 0.7
    targets = jax.random.randint(keys[2], (B, t), 0, v)
    weights = jax.random.uniform(keys[3], (B, t)) * (targets > 0)
    return hidden, head, targets, weights


@pytest.mark.parametrize("vocab_block", [None, 16])  # 16: four backward blocks, the last padded
@pytest.mark.parametrize(
    "z_loss,smoothing,cap", [(0.0, 0.0, None), (1e-3, 0.1, None), (1e-2, 0.2, 3.0)]
)
def test_chunked_cross_entropy_matches_full(z_loss, smoothing, cap, vocab_block):
    from encdec_adapt.models import losses, vocab_loss

    hidden, head, targets, weights = _loss_inputs()
    kw = {"z_loss": z_loss, "label_smoothing": smoothing}

    def full(h, w):
        return losses.cross_entropy(vocab_loss.project(h, w, cap), targets, weights, **kw)

    def chunked(h, w):
        return vocab_loss.cross_entropy(
            h, w, targets, weights, soft_cap=cap, chunk_tokens=5, vocab_block=vocab_block, **kw
        )

    for a, b in zip(jax.jit(chunked)(hidden, head), full(hidden, head), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    g_full = jax.grad(lambda h, w: full(h, w).loss, argnums=(0, 1))(hidden, head)
    g_chunk = jax.jit(jax.grad(lambda h, w: chunked(h, w).loss, argnums=(0, 1)))(hidden, head)
    for a, b in zip(g_chunk, g_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap,vocab_block", [(None, None), (4.0, None), (4.0, 16)])
def test_chunked_distillation_matches_full(cap, vocab_block):
    from encdec_adapt.models import losses, vocab_loss

    hidden, head, targets, weights = _loss_inputs()
    t_hidden = jax.random.normal(jax.random.key(9), hidden.shape)
    t_head = jax.random.normal(jax.random.key(10), head.shape)
    kw = {"z_loss": 1e-3, "label_smoothing": 0.1}

    def full(h, w, th, tw):
        logits = vocab_loss.project(h, w, cap)
        tl = losses.cross_entropy(logits, targets, weights, **kw)
        t_logits = jax.lax.stop_gradient(vocab_loss.project(th, tw, 5.0))
        return tl, losses.kl_divergence(logits, t_logits, weights, temperature=2.0)

    def chunked(h, w, th, tw):
        return vocab_loss.distillation(
            h,
            w,
            th,
            tw,
            targets,
            weights,
            student_soft_cap=cap,
            teacher_soft_cap=5.0,
            chunk_tokens=4,
            temperature=2.0,
            vocab_block=vocab_block,
            **kw,
        )

    args = (hidden, head, t_hidden, t_head)
    (tl_c, kd_c), (tl_f, kd_f) = jax.jit(chunked)(*args), full(*args)
    np.testing.assert_allclose(kd_c, kd_f, rtol=1e-5, atol=1e-5)
    for a, b in zip(tl_c, tl_f, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def total(f):
        return lambda *a: (lambda tl, kd: 0.3 * tl.loss + 0.7 * kd)(*f(*a))

    g_full = jax.grad(total(full), argnums=(0, 1, 2, 3))(*args)
    g_chunk = jax.jit(jax.grad(total(chunked), argnums=(0, 1, 2, 3)))(*args)
    for a, b in zip(g_chunk, g_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.any(g_chunk[2]) and not np.any(g_chunk[3])  # the teacher gets no gradient


def test_resolve_chunk_tokens():
    from encdec_adapt.models import vocab_loss

    assert vocab_loss.resolve_chunk_tokens(None, 512, 262_144) == 0
    assert vocab_loss.resolve_chunk_tokens(None, 4096, 262_144) == vocab_loss.DEFAULT_CHUNK_TOKENS
    assert vocab_loss.resolve_chunk_tokens(0, 10**6, 262_144) == 0
    assert vocab_loss.resolve_chunk_tokens(7, 8, 10) == 7
    with pytest.raises(ValueError):
        vocab_loss.resolve_chunk_tokens(-1, 8, 10)


@pytest.mark.slow
def test_model_api_chunked_loss_matches_full():
    """Encoder-decoder and distillation `loss_fn` with loss_chunk_tokens=5 vs 0 (full logits)."""
    from encdec_adapt import load_encdec_preset, load_preset
    from encdec_adapt.models import generative as models

    cfg = load_encdec_preset("t5gemma_tiny")
    batch = {
        "encoder_input_tokens": jnp.asarray([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]]),
        "decoder_input_tokens": jnp.asarray([[0, 11, 12, 13], [0, 14, 15, 0]]),
        "decoder_target_tokens": jnp.asarray([[11, 12, 13, 1], [14, 15, 1, 0]]),
    }
    batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(jnp.int32)

    def run(chunk, distill):
        model = models.EncoderDecoderModel(
            config=cfg, z_loss=1e-3, label_smoothing=0.1, loss_chunk_tokens=chunk
        )
        if distill:
            teacher = models.DecoderOnlyModel(config=load_preset("gemma_tiny"))
            model = models.DistillationModel(student=model, teacher=teacher)

        @nnx.jit
        def loss_grads(net):
            (loss, metrics), grads = nnx.value_and_grad(
                lambda m: model.loss_fn(m, batch, None), has_aux=True
            )(net)
            return loss, metrics, jax.tree.leaves(nnx.state(grads))

        return loss_grads(model.build(nnx.Rngs(0)))

    for distill in (False, True):
        full, chunked = run(0, distill), run(5, distill)
        np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5)
        for key in full[1]:
            np.testing.assert_allclose(chunked[1][key], full[1][key], rtol=1e-5, atol=1e-6)
        for a, b in zip(chunked[2], full[2], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- memory of the training step -----------------------------------------------------------


def test_embedding_lookup_gradient_equals_take():
    from encdec_adapt.nn.layers import lookup

    table = jax.random.normal(jax.random.key(0), (11, 5))
    ids = jnp.asarray([[1, 3, 3], [10, 0, 3]])  # repeated ids add up
    w = jax.random.normal(jax.random.key(1), (2, 3, 5))

    def loss(f):
        return lambda t: jnp.sum(f(t, ids) * w)

    np.testing.assert_array_equal(lookup(table, ids), jnp.take(table, ids, axis=0))
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss(lookup)))(table),
        jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table),
        rtol=1e-6,
        atol=1e-6,
    )


def _step_temp_bytes(pattern: tuple[str, ...]) -> int:
    """Compiled temporaries of loss + grad of a 6-layer scanned decoder-only LM, remat "full"."""
    from encdec_adapt import load_preset
    from encdec_adapt.models import generative as models

    cfg = load_preset("gemma_tiny").replace(
        num_layers=6, vocab_size=256, hidden_dim=512, attention_pattern=pattern
    )
    model = models.DecoderOnlyModel(config=cfg, remat="full", scan_layers=True)
    module = model.build(nnx.Rngs(0))
    graphdef, params = nnx.split(module, nnx.Param)
    tokens = jnp.ones((1, 1024), jnp.int32)
    batch = {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": tokens,
    }

    def loss(p):
        return model.loss_fn(nnx.merge(graphdef, p), batch, None)[0]

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_full_recomputes_one_layer_at_a_time():
    """A scanned group of six layers (Gemma 3's period) needs about the temporaries of a group
    of one: the backward pass recomputes and differentiates its layers one after the other.
    (With `jax.checkpoint`, XLA ran the six recomputations side by side: about 4x here.)"""
    six = _step_temp_bytes(("local",) * 5 + ("global",))
    one = _step_temp_bytes(("global",))
    assert six < 1.5 * one, (six, one)
