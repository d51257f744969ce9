"""Schedules, clipping, freezing and config validation of optim.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from encdec_adapt.runtime import optim


def _lr(cfg, step):
    return float(optim.make_schedule(cfg)(step))


def test_rsqrt_schedule():
    cfg = optim.OptimizerConfig(learning_rate=1.0, schedule="rsqrt", warmup_steps=100)
    assert _lr(cfg, 0) == pytest.approx(0.01)
    assert _lr(cfg, 49) == pytest.approx(0.5)
    assert _lr(cfg, 99) == pytest.approx(1.0)
    assert _lr(cfg, 399) == pytest.approx(0.5)  # sqrt(100 / 400)


def test_cosine_and_linear_schedules():
    kw = dict(learning_rate=2.0, warmup_steps=10, decay_steps=110, end_lr_fraction=0.1)
    cos = optim.OptimizerConfig(schedule="cosine", **kw)
    lin = optim.OptimizerConfig(schedule="linear", **kw)
    for cfg in (cos, lin):
        assert _lr(cfg, 4) == pytest.approx(1.0)
        assert _lr(cfg, 10) == pytest.approx(2.0)
        assert _lr(cfg, 110) == pytest.approx(0.2)
        assert _lr(cfg, 500) == pytest.approx(0.2)
    assert _lr(cos, 60) == pytest.approx(0.2 + 1.8 * 0.5)
    assert _lr(lin, 60) == pytest.approx(0.2 + 1.8 * 0.5)
    assert _lr(cos, 35) > _lr(lin, 35)  # cosine stays high longer


def _params():
    rng = np.random.default_rng(0)
    return {
        "embedder": {"embedding": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
        "stack": {
            "blocks": {0: {"attn": {"q": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}}},
            "final_norm": {"scale": jnp.zeros((4,), jnp.float32)},
        },
    }


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_freeze_gives_zero_updates_and_no_state(name):
    cfg = optim.OptimizerConfig(name=name, learning_rate=0.1, freeze=("^embedder/",))
    params = _params()
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["embedder"]["embedding"]).max()) == 0.0
    assert float(jnp.abs(updates["stack"]["blocks"][0]["attn"]["q"]).max()) > 0.0
    # no optimizer statistics are allocated for the frozen table
    sizes = [x.size for x in jax.tree.leaves(state)]
    assert 8 * 4 not in sizes


def test_train_only_is_the_complement_of_freeze():
    cfg = optim.OptimizerConfig(learning_rate=0.1, train_only=("attn",))
    mask = optim.trainable_mask(_params(), train_only=cfg.train_only, freeze=cfg.freeze)
    assert mask["stack"]["blocks"][0]["attn"]["q"]
    assert not mask["embedder"]["embedding"]
    assert not mask["stack"]["final_norm"]["scale"]


def test_freezing_everything_is_an_error():
    cfg = optim.OptimizerConfig(freeze=(".",))
    with pytest.raises(ValueError, match="freezes every parameter"):
        optim.make_optimizer(cfg, _params())


def test_global_norm_clipping():
    cfg = optim.OptimizerConfig(name="sgd", b1=None, learning_rate=1.0, clip_norm=0.5)
    params = _params()
    tx = optim.make_optimizer(cfg, params)
    grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(0.5, rel=1e-5)


def test_weight_decay_spares_vectors():
    cfg = optim.OptimizerConfig(learning_rate=1.0, weight_decay=0.5)
    params = jax.tree.map(lambda p: p + 1.0, _params())
    tx = optim.make_optimizer(cfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["stack"]["final_norm"]["scale"]).max()) == 0.0
    q = params["stack"]["blocks"][0]["attn"]["q"]
    np.testing.assert_allclose(updates["stack"]["blocks"][0]["attn"]["q"], -0.5 * q, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(name="adam"), "name='adam'"),
        (dict(schedule="step"), "schedule='step'"),
        (dict(learning_rate="fast"), "learning_rate='fast'"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(schedule="cosine", warmup_steps=10, decay_steps=5), "decay_steps"),
        (dict(freeze=("(",)), "regular expression"),
    ],
)
def test_invalid_config_names_the_field(kwargs, culprit):
    with pytest.raises(ValueError, match="Invalid OptimizerConfig") as e:
        optim.OptimizerConfig(**kwargs)
    assert culprit in str(e.value)


def test_unfreeze_at_step():
    cfg = optim.OptimizerConfig(learning_rate=0.1, train_only=("attn",), unfreeze_at_step=2)
    params = _params()
    tx = optim.make_optimizer(cfg, params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = []
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        moved.append(float(jnp.abs(updates["embedder"]["embedding"]).max()) > 0)
        assert float(jnp.abs(updates["stack"]["blocks"][0]["attn"]["q"]).max()) > 0
    assert moved == [False, False, True]
