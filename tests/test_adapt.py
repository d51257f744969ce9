"""Warm starts (balanced exactness, unbalanced shapes, mismatch errors) and parameter freezing."""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from encdec_adapt.cli import main
from encdec_adapt.models import warm_start as adapt
from encdec_adapt.nn import config
from encdec_adapt.nn.config import EncoderDecoderConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.runtime import optim
from encdec_adapt.storage import params_io
from encdec_adapt.storage.params_io import CheckpointError

TINY = config.load_preset("gemma_tiny").replace(vocab_size=128, num_layers=2, sliding_window=3)
WIDE = TINY.replace(embed_dim=96, num_layers=3)  # the "9B" of a tiny unbalanced pair


def random_decoder_only(cfg, seed):
    """A DecoderOnly whose every parameter (norm scales included) is random; and its params."""
    model = DecoderOnly(cfg, rngs=nnx.Rngs(seed))
    params = params_io.model_params(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    load(model, params)
    return model, params


def load(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(2, 128, shape), jnp.int32)


@nnx.jit
def encdec_logits(model, enc, dec):
    return model(enc, dec)


@nnx.jit
def decoder_only_logits(model, dec):
    return model(dec)[0]


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_balanced_warm_start_copies_and_is_exact_with_zeroed_cross_output():
    src_model, src = random_decoder_only(TINY, 0)
    cfg = EncoderDecoderConfig(encoder=TINY, decoder=TINY)
    params = adapt.warm_start(cfg, src, zero_cross_output=True)
    flat, flat_src = params_io.flatten(params), params_io.flatten(src)
    for name, x in flat_src.items():
        assert same_bits(flat[f"encoder/{name}"], x), name
        assert same_bits(flat[f"decoder/{name}"], x), name
    for i in range(TINY.num_layers):
        blk = f"decoder/stack/blocks/{i}"
        for p in ("q", "k", "v"):
            assert same_bits(flat[f"{blk}/cross_attn/{p}"], flat_src[f"stack/blocks/{i}/attn/{p}"])
        assert not np.any(flat[f"{blk}/cross_attn/o"])
        assert same_bits(flat[f"{blk}/pre_cross_norm/scale"], flat[f"{blk}/pre_attn_norm/scale"])

    model = load(EncoderDecoder(cfg, rngs=nnx.Rngs(1)), params)
    enc = tokens((2, 7), 1).at[1, 5:].set(0)
    dec = tokens((2, 6), 2)
    want = decoder_only_logits(src_model, dec)
    np.testing.assert_allclose(encdec_logits(model, enc, dec), want, atol=1e-5, rtol=0)
    # The test can fail: with the copied (non-zero) output projection the decoder does read
    # the encoder, and its logits move away from the decoder-only model's.
    copied = load(EncoderDecoder(cfg, rngs=nnx.Rngs(1)), adapt.warm_start(cfg, src))
    assert np.abs(encdec_logits(copied, enc, dec) - want).max() > 1e-2


def test_unbalanced_tiny_pair_shapes_sources_and_random_cross_attention():
    _, big = random_decoder_only(WIDE, 0)
    _, small = random_decoder_only(TINY, 1)
    cfg = EncoderDecoderConfig(encoder=WIDE, decoder=TINY)
    params = adapt.warm_start(cfg, big, small, seed=3)
    flat = params_io.flatten(params)
    want = {k: v.shape for k, v in params_io.flatten(adapt.encdec_shapes(cfg)).items()}
    assert {k: v.shape for k, v in flat.items()} == want
    assert flat["decoder/stack/blocks/0/cross_attn/k"].shape == (2, 96, 16)
    for name, x in params_io.flatten(big).items():
        assert same_bits(flat[f"encoder/{name}"], x), name
    for name, x in params_io.flatten(small).items():
        assert same_bits(flat[f"decoder/{name}"], x), name
    assert not np.any(flat["decoder/stack/blocks/1/post_cross_norm/scale"])
    q = flat["decoder/stack/blocks/1/cross_attn/q"]
    assert np.std(q) > 0
    again = params_io.flatten(adapt.warm_start(cfg, big, small, seed=3))
    other = params_io.flatten(adapt.warm_start(cfg, big, small, seed=4))
    assert same_bits(again["decoder/stack/blocks/1/cross_attn/q"], q)
    assert not np.allclose(other["decoder/stack/blocks/1/cross_attn/q"], q)
    with pytest.raises(ValueError, match="needs equal widths"):
        adapt.warm_start(cfg, big, small, cross_attention="copy")
    model = load(EncoderDecoder(cfg, rngs=nnx.Rngs(0)), params)
    assert np.all(np.isfinite(encdec_logits(model, tokens((1, 5), 3), tokens((1, 4), 4))))


@pytest.mark.slow
def test_unbalanced_9b_2b_warm_start_shapes_via_eval_shape():
    cfg = config.load_encdec_preset("t5gemma_9b_2b")
    enc = adapt.decoder_only_shapes(cfg.encoder)
    dec = adapt.decoder_only_shapes(cfg.decoder)
    out = jax.eval_shape(lambda e, d: adapt.warm_start(cfg, e, d), enc, dec)
    got = {k: v.shape for k, v in params_io.flatten(out).items()}
    want = {k: v.shape for k, v in params_io.flatten(adapt.encdec_shapes(cfg)).items()}
    assert got == want
    assert got["decoder/stack/blocks/25/cross_attn/v"] == (4, 3584, 256)


def test_mismatched_source_error_names_parameter_and_shapes():
    _, src = random_decoder_only(TINY, 0)
    cfg = EncoderDecoderConfig(encoder=WIDE, decoder=TINY)
    with pytest.raises(CheckpointError) as e:
        adapt.warm_start(cfg, src, src, sources=("ckpt/tiny", "ckpt/tiny"))
    msg = str(e.value)
    assert "ckpt/tiny" in msg and "'embedder/embedding'" in msg
    assert "(128, 64)" in msg and "(128, 96)" in msg
    # Same widths, fewer layers: the first missing parameter is named.
    with pytest.raises(CheckpointError, match=r"stack/blocks/2/.*missing"):
        adapt.warm_start(
            EncoderDecoderConfig(encoder=TINY.replace(num_layers=3), decoder=TINY), src
        )


def test_warm_start_from_checkpoints_via_gin(tmp_path):
    _, src = random_decoder_only(TINY, 0)
    path = str(tmp_path / "tiny")
    params_io.save(path, src, "decoder_only", TINY.to_dict())
    cfg = EncoderDecoderConfig(encoder=TINY, decoder=TINY)
    # A scoped binding: nothing leaks into other tests' gin configuration.
    with gin.unlock_config():
        gin.parse_config(f"test_adapt/encdec_adapt.WarmStart.encoder_checkpoint = '{path}'")
    with gin.config_scope("test_adapt"):
        params = adapt.WarmStart()(cfg)
    want = params_io.flatten(adapt.warm_start(cfg, src))
    assert all(same_bits(x, want[k]) for k, x in params_io.flatten(params).items())
    # Shapes fit but the architecture does not: the config field is named.
    other = cfg.replace(encoder=TINY.replace(attn_logits_soft_cap=30.0))
    with pytest.raises(CheckpointError, match=r"attn_logits_soft_cap.*50\.0.*30\.0"):
        adapt.WarmStart(encoder_checkpoint=path, decoder_checkpoint=path)(other)
    with pytest.raises(CheckpointError, match=r"embedder/embedding.*\(128, 64\).*\(128, 96\)"):
        adapt.WarmStart(encoder_checkpoint=path, decoder_checkpoint=path)(cfg.replace(encoder=WIDE))
    with pytest.raises(ValueError, match="needs a decoder_checkpoint"):
        adapt.WarmStart(encoder_checkpoint=path)(cfg.replace(encoder=WIDE))


CROSS_NORMS = ("pre_cross_norm/scale", "post_cross_norm/scale")


def test_trainable_mask_selects_cross_attention():
    params = adapt.encdec_shapes(EncoderDecoderConfig(encoder=TINY, decoder=TINY))
    flat = params_io.flatten(optim.trainable_mask(params, train_only=[adapt.CROSS_ATTENTION]))
    assert {k for k, t in flat.items() if t} == {
        f"decoder/stack/blocks/{i}/{p}"
        for i in range(TINY.num_layers)
        for p in ("cross_attn/q", "cross_attn/k", "cross_attn/v", "cross_attn/o", *CROSS_NORMS)
    }
    flat = params_io.flatten(optim.trainable_mask(params, freeze=[r"encoder/.*", r".*embedder.*"]))
    assert not any(t for k, t in flat.items() if k.startswith("encoder/") or "embedder" in k)
    assert flat["decoder/stack/blocks/0/mlp/up"]
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.trainable_mask(params, freeze=["decoder/cross_attn"])
    with pytest.raises(ValueError, match="invalid"):
        optim.trainable_mask(params, freeze=["decoder/(("])


def _run_adamw(params, mask, until_step, steps):
    opt = optim.freeze(optax.adamw(1e-2, weight_decay=0.1), mask, until_step=until_step)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        grads = jax.tree.unflatten(
            tree, [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        )
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = [params]
    for i in range(steps):
        params, state = step(params, state, jax.random.key(i))
        history.append(params)
    return history


def test_frozen_parameters_are_bit_identical_after_adamw_steps():
    cfg = EncoderDecoderConfig(encoder=TINY, decoder=TINY)
    _, src = random_decoder_only(TINY, 0)
    params = adapt.warm_start(cfg, src)
    mask = optim.trainable_mask(params, train_only=[adapt.CROSS_ATTENTION])
    history = _run_adamw(params, mask, None, 3)
    flat0, flat3, flat_mask = (params_io.flatten(t) for t in (params, history[-1], mask))
    for name, trainable in flat_mask.items():
        if trainable:
            assert not np.array_equal(flat3[name], flat0[name]), name
        else:
            assert same_bits(flat3[name], flat0[name]), name


@pytest.mark.slow
def test_freeze_until_step_unfreezes_after_k_updates():
    cfg = EncoderDecoderConfig(encoder=TINY, decoder=TINY)
    _, src = random_decoder_only(TINY, 0)
    params = adapt.warm_start(cfg, src)
    mask = optim.trainable_mask(params, train_only=[adapt.CROSS_ATTENTION])
    history = [params_io.flatten(p) for p in _run_adamw(params, mask, 2, 3)]
    frozen_name = "encoder/stack/blocks/0/mlp/gate"
    cross_name = "decoder/stack/blocks/0/cross_attn/q"
    assert same_bits(history[2][frozen_name], history[0][frozen_name])
    assert not np.array_equal(history[3][frozen_name], history[2][frozen_name])
    assert not np.array_equal(history[1][cross_name], history[0][cross_name])
    assert 0.9 < optim.frozen_fraction(mask, params) < 1.0


def test_adapt_cli_writes_checkpoint_and_names_mismatches(tmp_path, capsys):
    tiny = config.load_preset("gemma_tiny")
    src = params_io.model_params(DecoderOnly(tiny, rngs=nnx.Rngs(0)))
    ckpt = str(tmp_path / "gemma_tiny")
    params_io.save(ckpt, src, "decoder_only", tiny.to_dict())
    out = str(tmp_path / "adapted")
    assert main.main(["adapt", "--preset", "t5gemma_tiny", "--encoder", ckpt, "--output", out]) == 0
    model_type, cfg = params_io.read_model_json(out)
    assert model_type == "encoder_decoder"
    assert EncoderDecoderConfig.from_dict(cfg) == config.load_encdec_preset("t5gemma_tiny")
    got = params_io.flatten(params_io.load(out))
    assert np.array_equal(got["encoder/embedder/embedding"], src["embedder"]["embedding"])
    # The unbalanced preset wants a 96-wide encoder: the error names the checkpoint, the first
    # mismatching parameter and both shapes, and nothing is written.
    bad = str(tmp_path / "bad")
    argv = ["--encoder", ckpt, "--decoder", ckpt, "--output", bad]
    assert main.main(["adapt", "--preset", "t5gemma_tiny_unbalanced", *argv]) == 2
    err = capsys.readouterr().err
    assert ckpt in err and "'embedder/embedding'" in err
    assert "(4096, 64)" in err and "(4096, 96)" in err
    assert not os.path.exists(bad)
