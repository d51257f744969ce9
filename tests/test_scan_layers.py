"""Scan over layers computes the same function as the unrolled stack, with and without
remainder layers, for decoders, encoder-decoders and their gradients, and compiles to a scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt import load_encdec_preset, load_preset
from encdec_adapt.models import generative as models
from encdec_adapt.nn.transformer import DecoderOnly, apply_scan, pattern_period


def test_pattern_period():
    assert pattern_period(["local", "global"] * 3) == 2
    assert pattern_period(["local"] * 5 + ["global"] + ["local"] * 2) == 6
    assert pattern_period(["global"] * 4) == 1
    assert pattern_period(["local", "global", "global"]) == 3


def _gemma3_like():
    # period 6 over 8 layers: one scanned group and two unrolled remainder layers
    return load_preset("gemma_tiny").replace(
        num_layers=8,
        attention_pattern=("local",) * 5 + ("global",),
        use_qk_norm=True,
        final_logit_soft_cap=None,
        attn_logits_soft_cap=None,
        rope_base_global=1e6,
        dropout_rate=0.1,
    )


@pytest.mark.slow
def test_decoder_scan_equals_unrolled_with_grads_and_dropout():
    cfg = _gemma3_like()
    plain = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    scanned = apply_scan(DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 1, cfg.vocab_size)
    segments = jnp.asarray([[1] * 24, [1] * 10 + [2] * 10 + [0] * 4])
    rng = jax.random.key(3)

    @nnx.jit
    def loss_and_grads(model):
        def loss(model):
            logits, _ = model(tokens, segment_ids=segments, rng=rng)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

        return nnx.value_and_grad(loss, has_aux=True)(model)

    (_, y0), g0 = loss_and_grads(plain)
    (_, y1), g1 = loss_and_grads(scanned)
    np.testing.assert_allclose(y1, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g0))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_scan_is_a_scan_in_the_compiled_program():
    cfg = load_preset("gemma_tiny")
    model = apply_scan(DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.ones((1, 8), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda: model(tokens)[0])())
    assert "scan[" in jaxpr


def test_encoder_decoder_model_api_scan_equals_unrolled():
    cfg = load_encdec_preset("t5gemma_tiny")
    batch = {
        "encoder_input_tokens": jnp.asarray([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]]),
        "decoder_input_tokens": jnp.asarray([[0, 11, 12, 13], [0, 14, 15, 0]]),
        "decoder_target_tokens": jnp.asarray([[11, 12, 13, 1], [14, 15, 1, 0]]),
    }
    batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(jnp.int32)

    def run(model):
        @nnx.jit
        def loss_grads_scores(net):
            (loss, _), grads = nnx.value_and_grad(
                lambda m: model.loss_fn(m, batch, jax.random.key(0)), has_aux=True
            )(net)
            return loss, jax.tree.leaves(nnx.state(grads)), model.score_batch(net, batch)

        return loss_grads_scores(model.build(nnx.Rngs(0)))

    out = [
        run(models.EncoderDecoderModel(config=cfg, scan_layers=scan, remat="full"))
        for scan in (False, True)
    ]
    np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-6)
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-5)
    for a, b in zip(out[1][1], out[0][1]):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
