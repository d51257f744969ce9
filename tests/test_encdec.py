"""EncoderDecoder: presets, masks (bidirectional window, padding, packing), decoding, variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.models.warm_start import encdec_shapes
from encdec_adapt.nn import config
from encdec_adapt.nn.config import EncoderDecoderConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.parallel import sharding
from encdec_adapt.storage import params_io

# Smaller than gemma_tiny (tests run on 2 shared cores); local + global layers, small window.
TINY = config.load_preset("gemma_tiny").replace(vocab_size=128, num_layers=2, sliding_window=3)


def tiny_cfg(**kw) -> EncoderDecoderConfig:
    return EncoderDecoderConfig(encoder=TINY, decoder=TINY, **kw)


def build(cfg: EncoderDecoderConfig, seed: int = 0) -> EncoderDecoder:
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(seed))
    # Norm scales start at 0; randomise every parameter so that no sub-block is an identity.
    params = params_io.model_params(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(tree, noisy))
    nnx.update(model, state)
    return model


@nnx.jit
def forward(model, enc, dec, enc_seg=None, dec_seg=None, enc_pos=None, dec_pos=None):
    return model(
        enc,
        dec,
        encoder_segment_ids=enc_seg,
        decoder_segment_ids=dec_seg,
        encoder_positions=enc_pos,
        decoder_positions=dec_pos,
    )


@nnx.jit
def encode(model, enc):
    return model.encode(enc)


@nnx.jit
def cross_inputs(model, enc):
    return model.cross_inputs(model.encode(enc))


@nnx.jit
def decode(model, tok, cross, cache):
    return model.decode(tok, cross, cache=cache)


def tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(2, TINY.vocab_size, shape), jnp.int32)


# Tracing the initialisers of a 9B model takes tens of seconds on 2 cores: the big balanced
# presets run with -m slow; 9B-2B (the unbalanced shapes) always runs.
# Large presets build slowly even abstractly; the default suite keeps one of each layout.
BIG = ("t5gemma_2b_2b", "t5gemma_9b_9b", "t5gemma_9b_2b", "t5gemma_270m_270m", "t5gemma_1b_1b")


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in config.ENCDEC_PRESETS],
)
def test_presets_parse_and_build_abstractly(name):
    cfg = config.load_encdec_preset(name)
    shapes = params_io.flatten(encdec_shapes(cfg))
    dec, enc = cfg.decoder, cfg.encoder
    assert shapes["encoder/embedder/embedding"].shape == (enc.vocab_size, enc.embed_dim)
    assert len([k for k in shapes if k.endswith("/mlp/gate") and "encoder/" in k]) == enc.num_layers
    if cfg.merged_attention:
        assert not any("cross" in k for k in shapes)
    else:
        k = shapes[f"decoder/stack/blocks/{dec.num_layers - 1}/cross_attn/k"]
        assert k.shape == (dec.num_kv_heads, enc.embed_dim, dec.head_dim)
    assert ("decoder/embedder/embedding" in shapes) != cfg.tie_encoder_decoder_embeddings


def test_preset_9b_2b_is_unbalanced():
    cfg = config.load_encdec_preset("t5gemma_9b_2b")
    assert (cfg.encoder.embed_dim, cfg.decoder.embed_dim) == (3584, 2304)
    assert (cfg.encoder.num_layers, cfg.decoder.num_layers) == (42, 26)
    assert not cfg.balanced and config.load_encdec_preset("t5gemma_9b_9b").balanced


def test_load_encdec_preset_rejects_decoder_only_preset():
    with pytest.raises(ValueError, match="not an EncoderDecoderConfig"):
        config.load_encdec_preset("gemma_tiny")


def test_config_validation_and_round_trip():
    wide = TINY.replace(embed_dim=96)
    with pytest.raises(ValueError, match="merged_attention needs equal embed_dim"):
        EncoderDecoderConfig(encoder=wide, decoder=TINY, merged_attention=True)
    with pytest.raises(ValueError, match="tie_encoder_decoder_embeddings"):
        EncoderDecoderConfig(encoder=wide, decoder=TINY, tie_encoder_decoder_embeddings=True)
    cfg = EncoderDecoderConfig(encoder=wide, decoder=TINY)
    assert EncoderDecoderConfig.from_dict(cfg.to_dict()) == cfg


def test_logits_shape_and_determinism():
    model = build(tiny_cfg())
    enc, dec = tokens((2, 7), 0), tokens((2, 5), 1)
    a = forward(model, enc, dec)
    assert a.shape == (2, 5, TINY.vocab_size) and a.dtype == jnp.float32
    assert np.all(np.abs(a) <= TINY.final_logit_soft_cap)
    np.testing.assert_array_equal(a, forward(build(tiny_cfg()), enc, dec))


def test_encoder_is_bidirectional_with_inclusive_window():
    # One local layer, window 3: HF T5Gemma's encoder keeps |q - k| <= window.
    enc_cfg = TINY.replace(num_layers=1, attention_pattern=("local",))
    model = build(EncoderDecoderConfig(encoder=enc_cfg, decoder=TINY))
    x = tokens((1, 8), 2)
    base = encode(model, x).hidden
    for changed, affected in [(5, [2, 3, 4, 5, 6, 7]), (0, [0, 1, 2, 3])]:
        y = x.at[0, changed].set((x[0, changed] + 1) % TINY.vocab_size)
        diff = np.abs(np.asarray(encode(model, y).hidden - base)).max(axis=-1)[0]
        np.testing.assert_array_equal(np.nonzero(diff > 0)[0], affected)


def test_encoder_split_window():
    # T5Gemma 2 (transformers): window 4 is 4 keys around the query, 2 behind (the query
    # included) and 2 ahead, so token 5 reaches queries 3, 4 (ahead of them), 5 and 6.
    enc_cfg = TINY.replace(num_layers=1, attention_pattern=("local",), sliding_window=4)
    model = build(EncoderDecoderConfig(encoder=enc_cfg, decoder=TINY, encoder_window="split"))
    x = tokens((1, 8), 2)
    base = encode(model, x).hidden
    for changed, affected in [(5, [3, 4, 5, 6]), (0, [0, 1])]:
        y = x.at[0, changed].set((x[0, changed] + 1) % TINY.vocab_size)
        diff = np.abs(np.asarray(encode(model, y).hidden - base)).max(axis=-1)[0]
        np.testing.assert_array_equal(np.nonzero(diff > 0)[0], affected)
    with pytest.raises(ValueError, match="encoder_window='both'"):
        EncoderDecoderConfig(encoder=enc_cfg, decoder=TINY, encoder_window="both")


def test_encoder_padding_is_invisible_to_both_stacks():
    model = build(tiny_cfg())
    enc, dec = tokens((2, 6), 3), tokens((2, 4), 4)
    padded = jnp.concatenate([enc, jnp.zeros((2, 3), jnp.int32)], axis=1)
    np.testing.assert_allclose(forward(model, padded, dec), forward(model, enc, dec), atol=2e-5)
    # Left padding too: positions restart after the padding segment, RoPE is relative.
    left = jnp.concatenate([jnp.zeros((2, 3), jnp.int32), enc], axis=1)
    np.testing.assert_allclose(forward(model, left, dec), forward(model, enc, dec), atol=2e-5)
    # The content under padding does not matter, but real encoder tokens do: random non-pad
    # token ids behind the valid prefix, marked as padding by the segment ids, change nothing.
    garbage = jnp.concatenate([enc, tokens((2, 3), 11)], axis=1)
    assert np.all(np.asarray(garbage[:, 6:]) != 0)
    seg = jnp.asarray([[1] * 6 + [0] * 3] * 2, jnp.int32)
    np.testing.assert_allclose(
        forward(model, garbage, dec, enc_seg=seg), forward(model, enc, dec), atol=2e-5
    )
    np.testing.assert_allclose(
        forward(model, garbage, dec, enc_seg=seg), forward(model, padded, dec), atol=2e-5
    )
    # ... while the same ids inside the segment are real tokens and do change the output.
    assert np.abs(forward(model, garbage, dec) - forward(model, enc, dec)).max() > 1e-3
    assert np.abs(forward(model, enc.at[:, 0].set(9), dec) - forward(model, enc, dec)).max() > 1e-3


def test_packed_rows_equal_separate_rows():
    model = build(tiny_cfg())
    e1, e2, d1, d2 = tokens((1, 4), 5), tokens((1, 3), 6), tokens((1, 3), 7), tokens((1, 4), 8)
    enc = jnp.concatenate([e1, e2], axis=1)
    dec = jnp.concatenate([d1, d2], axis=1)
    enc_seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2]])
    dec_seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]])
    packed = forward(model, enc, dec, enc_seg, dec_seg)
    np.testing.assert_allclose(packed[:, :3], forward(model, e1, d1), atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:], forward(model, e2, d2), atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"tie_encoder_decoder_embeddings": True, "merged_attention": True},
        {"encoder": TINY.replace(embed_dim=96, num_layers=3)},  # unbalanced
    ],
    ids=["t5gemma", "t5gemma2", "unbalanced"],
)
def test_step_decoding_matches_teacher_forcing(variant):
    cfg = tiny_cfg().replace(**variant)
    model = build(cfg)
    enc = tokens((2, 6), 9).at[0, 4:].set(0)  # row 0 padded
    dec = tokens((2, 5), 10)
    full = forward(model, enc, dec)
    cross = cross_inputs(model, enc)
    cache = model.init_cache(2, 8)
    steps = []
    for t in range(dec.shape[1]):
        logits, cache = decode(model, dec[:, t : t + 1], cross, cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    assert int(cache.index) == dec.shape[1]
    # Several tokens per call (a prompt) land in the same place.
    cache = model.init_cache(2, 8)
    chunks = []
    for lo, hi in [(0, 2), (2, 4), (4, 5)]:
        logits, cache = decode(model, dec[:, lo:hi], cross, cache)
        chunks.append(logits)
    np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-5)


def test_variant_parameter_paths():
    plain = params_io.flatten(encdec_shapes(tiny_cfg()))
    assert "decoder/stack/blocks/1/cross_attn/q" in plain
    assert "decoder/stack/blocks/0/pre_cross_norm/scale" in plain
    assert "decoder/embedder/embedding" in plain and "decoder/lm_head" not in plain
    t2 = params_io.flatten(
        encdec_shapes(tiny_cfg(tie_encoder_decoder_embeddings=True, merged_attention=True))
    )
    assert set(t2) == {k for k in plain if "cross" not in k and k != "decoder/embedder/embedding"}
    untied = params_io.flatten(
        encdec_shapes(tiny_cfg().replace(decoder=TINY.replace(tie_embeddings=False)))
    )
    assert untied["decoder/lm_head"].shape == (TINY.vocab_size, TINY.embed_dim)


def test_dropout_is_active_only_with_rng():
    cfg = tiny_cfg().replace(encoder=TINY.replace(dropout_rate=0.5))
    model = build(cfg)
    enc, dec = tokens((1, 5), 11), tokens((1, 4), 12)

    @nnx.jit
    def run(model, rng):
        return model(enc, dec, rng=rng)

    np.testing.assert_allclose(run(model, None), forward(model, enc, dec), atol=1e-5)
    a, b = run(model, jax.random.key(0)), run(model, jax.random.key(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(model, jax.random.key(0)))


@pytest.mark.slow
def test_sharded_forward_and_decode_equal_unsharded():
    """Logical axes of the new parameters (cross-attention K/V over the encoder width) and the
    activation constraints work on a (data, fsdp, tensor) = (2, 2, 2) mesh of CPU devices."""
    cfg = tiny_cfg().replace(encoder=TINY.replace(embed_dim=96))
    rules = sharding.MeshRules(mesh_shape=(2, 2, 2))
    mesh = rules.make_mesh()
    model = sharding.create_sharded(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    reference = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert sharding.unsharded_params(state, min_size=1024) == []
    k = state["decoder"]["stack"]["blocks"][0]["cross_attn"]["k"][...]
    assert k.addressable_shards[0].data.shape == (1, 48, 16)  # kv heads / tensor, D_enc / fsdp
    enc, dec = tokens((4, 6), 13).at[0, 4:].set(0), tokens((4, 5), 14)
    with sharding.use_mesh(mesh, rules):
        got = forward(model, enc, dec)
        cross = cross_inputs(model, enc)
        step, _ = decode(model, dec[:, :2], cross, model.init_cache(4, 8))
    np.testing.assert_allclose(got, forward(reference, enc, dec), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(step, got[:, :2], atol=2e-5, rtol=1e-5)
