"""Encoder-only classifier: pooling, padding invariance, warm start from an encoder, learning."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from encdec_adapt.nn import config
from encdec_adapt.nn.classifier import Classifier, pool, warm_start_classifier
from encdec_adapt.nn.config import ClassifierConfig, EncoderDecoderConfig, Pooling
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import params_io

TINY = config.load_preset("gemma_tiny").replace(vocab_size=64, num_layers=2, sliding_window=3)


@pytest.mark.parametrize("pooling", list(Pooling))
def test_pool_against_numpy(pooling):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    seg = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])  # right, left, empty
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(seg), pooling))
    want = {
        Pooling.MEAN: [hidden[0, :3].mean(0), hidden[1, 2:].mean(0)],
        Pooling.FIRST: [hidden[0, 0], hidden[1, 2]],
        Pooling.LAST: [hidden[0, 2], hidden[1, 4]],
    }[pooling]
    np.testing.assert_allclose(got[:2], np.stack(want), rtol=1e-6)
    np.testing.assert_array_equal(got[2], 0)


@nnx.jit
def logits(model, tokens):
    return model(tokens)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_does_not_change_logits(pooling):
    cfg = ClassifierConfig(encoder=TINY, num_classes=3, pooling=pooling)
    model = Classifier(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).integers(2, 64, (2, 6)), jnp.int32)
    out = logits(model, x)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    padded = jnp.concatenate([x, jnp.zeros((2, 3), jnp.int32)], axis=1)
    np.testing.assert_allclose(logits(model, padded), out, atol=1e-5)
    assert np.abs(logits(model, x.at[:, 1].set(5)) - out).max() > 1e-5


def test_warm_start_from_encoder_decoder_encoder():
    encdec = EncoderDecoder(EncoderDecoderConfig(encoder=TINY, decoder=TINY), rngs=nnx.Rngs(3))
    enc_params = params_io.model_params(encdec)["encoder"]
    cfg = ClassifierConfig(encoder=TINY, num_classes=2)
    params = warm_start_classifier(cfg, enc_params, seed=1)
    model = Classifier(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    x = jnp.asarray([[5, 6, 7, 8, 0]], jnp.int32)
    np.testing.assert_array_equal(model.encoder(x).hidden, encdec.encode(x).hidden)
    assert set(params["head"]) == {"kernel", "bias"}
    with pytest.raises(params_io.CheckpointError, match="embedder/embedding"):
        warm_start_classifier(ClassifierConfig(encoder=TINY.replace(embed_dim=32)), enc_params)


def test_classifier_learns_a_token_rule():
    # Class = whether token 7 occurs anywhere: needs the whole (bidirectional) sequence.
    rng = np.random.default_rng(0)
    x = rng.integers(8, 64, (32, 8))
    y = rng.integers(0, 2, 32)
    x[np.arange(32), rng.integers(0, 8, 32)] = np.where(y == 1, 7, x[np.arange(32), 0])
    x, y = jnp.asarray(x, jnp.int32), jnp.asarray(y)
    cfg = ClassifierConfig(encoder=TINY, num_classes=2, pooling="mean")
    model = Classifier(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(40)]
    assert losses[-1] < 0.25 * losses[0], losses
