"""Cross-entropy (z-loss, label smoothing, weights) and distillation KL against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from encdec_adapt.models import losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
    weights = rng.integers(0, 2, (2, 5)).astype(np.float32)
    return logits, targets, weights


def test_cross_entropy_matches_numpy(data):
    logits, targets, weights = data
    out = losses.cross_entropy(logits, targets, weights)
    logp = _log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.loss, (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(out.weight, weights.sum())
    np.testing.assert_allclose(out.correct, ((logits.argmax(-1) == targets) * weights).sum())
    assert float(out.z_loss) == 0.0


def test_default_weights_skip_padding(data):
    logits, targets, _ = data
    targets = targets.copy()
    targets[0, :3] = 0
    out = losses.cross_entropy(logits, targets)
    np.testing.assert_allclose(out.weight, (targets > 0).sum())


def test_z_loss(data):
    logits, targets, weights = data
    base = losses.cross_entropy(logits, targets, weights)
    out = losses.cross_entropy(logits, targets, weights, z_loss=1e-2)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    expected = 1e-2 * (log_z**2 * weights).sum()
    np.testing.assert_allclose(out.z_loss, expected, rtol=1e-5)
    np.testing.assert_allclose(out.loss, base.loss + expected, rtol=1e-5)


def test_label_smoothing_matches_explicit_distribution(data):
    logits, targets, weights = data
    eps, v = 0.1, logits.shape[-1]
    out = losses.cross_entropy(logits, targets, weights, label_smoothing=eps)
    q = np.full(logits.shape, eps / (v - 1))
    np.put_along_axis(q, targets[..., None], 1 - eps, -1)
    ce = -(q * _log_softmax(logits.astype(np.float64))).sum(-1)
    entropy = -(q * np.log(q)).sum(-1)  # constant: a perfect prediction has loss 0
    np.testing.assert_allclose(out.loss, ((ce - entropy) * weights).sum(), rtol=1e-5)


def test_shape_mismatch_names_shapes(data):
    logits, targets, _ = data
    with pytest.raises(ValueError, match=r"\(2, 5, 7\).*\(2, 4\)"):
        losses.cross_entropy(logits, targets[:, :4])


def test_kl_divergence(data):
    logits, _, weights = data
    teacher = np.roll(logits, 1, axis=-1)
    kl = losses.kl_divergence(logits, teacher, weights, temperature=2.0)
    pt, ps = _log_softmax(teacher / 2.0), _log_softmax(logits / 2.0)
    expected = ((np.exp(pt) * (pt - ps)).sum(-1) * weights).sum() * 4.0
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    assert abs(float(losses.kl_divergence(logits, logits, weights))) < 1e-5


def test_kl_gives_no_gradient_to_teacher(data):
    logits, _, weights = data
    teacher = jnp.asarray(np.roll(logits, 1, axis=-1))
    g_student, g_teacher = jax.grad(
        lambda s, t: losses.kl_divergence(s, t, weights), argnums=(0, 1)
    )(jnp.asarray(logits), teacher)
    assert float(jnp.abs(g_student).sum()) > 0
    assert float(jnp.abs(g_teacher).sum()) == 0
