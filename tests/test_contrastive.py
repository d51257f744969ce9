"""Contrastive losses against a direct numpy reference, and sharded == single-device."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from encdec_adapt.models.contrastive import (
    ContrastiveConfig,
    contrastive_loss,
    sharded_contrastive_loss,
)
from encdec_adapt.parallel import sharding

B, K, D = 8, 2, 16


def norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(q, p, n, q_ids, p_ids, cfg: ContrastiveConfig, tau):
    """The formula of design.md section 5, written with loops over rows."""
    dims = (q.shape[-1], *cfg.matryoshka_dims)
    weights = cfg.matryoshka_weights or (1.0,) * len(dims)
    total_loss = total_spread = 0.0
    for dim, w_dim in zip(dims, weights):
        qq, pp = norm(q[:, :dim]), norm(p[:, :dim])
        nn = None if n is None else norm(n[:, :, :dim])

        def direction(a, t, a_ids, t_ids, negs):
            losses = []
            for i in range(len(a)):
                weight = lambda s: np.exp(cfg.hard_negative_alpha * s)
                denom = np.exp(a[i] @ t[i] / tau)
                for j in range(len(a)):
                    if j == i:
                        continue
                    dup = a_ids[j] == a_ids[i] or t_ids[j] == t_ids[i]
                    if not (cfg.mask_duplicates and dup):
                        s = a[i] @ t[j]
                        denom += weight(s) * np.exp(s / tau)
                    if cfg.same_tower_negatives and not (cfg.mask_duplicates and dup):
                        s = a[i] @ a[j]
                        denom += weight(s) * np.exp(s / tau)
                if negs is not None:
                    for s in negs[i] @ a[i]:
                        denom += weight(s) * np.exp(s / tau)
                losses.append(-np.log(np.exp(a[i] @ t[i] / tau) / denom))
            return np.asarray(losses)

        per_row = direction(qq, pp, q_ids, p_ids, nn)
        if cfg.bidirectional:
            per_row = 0.5 * (per_row + direction(pp, qq, p_ids, q_ids, None))
        total_loss += w_dim * per_row.mean()
        spread = 0.0
        for x in (qq, pp):
            sim = x @ x.T
            spread += (sim**2).sum() - (np.diag(sim) ** 2).sum()
        total_spread += w_dim * spread / (2 * len(q) * (len(q) - 1))
    return total_loss + cfg.spread_out_weight * total_spread


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, D)).astype(np.float32)
    p = (q + 0.8 * rng.normal(size=(B, D))).astype(np.float32)
    n = (q[:, None] + 1.2 * rng.normal(size=(B, K, D))).astype(np.float32)
    # Rows 1 and 5 share a query; rows 2 and 6 share a positive (same text, same embedding).
    q[5], p[6] = q[1], p[2]
    q_ids = np.arange(B, dtype=np.int32)
    q_ids[5] = 1
    p_ids = np.arange(B, dtype=np.int32) + 100
    p_ids[6] = 102
    return q, p, n, q_ids, p_ids


CONFIGS = {
    "plain": ContrastiveConfig(temperature=0.1, bidirectional=False, mask_duplicates=False),
    "bidirectional": ContrastiveConfig(temperature=0.1),
    "hard_negatives": ContrastiveConfig(temperature=0.1, hard_negative_alpha=2.0),
    "same_tower": ContrastiveConfig(temperature=0.1, same_tower_negatives=True),
    "no_masking": ContrastiveConfig(temperature=0.1, mask_duplicates=False),
    "spread_out": ContrastiveConfig(temperature=0.1, spread_out_weight=0.5),
    "matryoshka": ContrastiveConfig(
        temperature=0.1, matryoshka_dims=(8, 4), matryoshka_weights=(1.0, 0.5, 0.25)
    ),
    "everything": ContrastiveConfig(
        temperature=0.07,
        same_tower_negatives=True,
        hard_negative_alpha=1.0,
        spread_out_weight=0.1,
        matryoshka_dims=(8,),
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("with_negatives", [False, True])
def test_matches_numpy_reference(batch, name, with_negatives):
    q, p, n, q_ids, p_ids = batch
    cfg = CONFIGS[name]
    n = n if with_negatives else None
    want = reference(q, p, n, q_ids, p_ids, cfg, cfg.temperature)
    got, _ = contrastive_loss(
        jnp.asarray(q),
        jnp.asarray(p),
        cfg,
        negatives=None if n is None else jnp.asarray(n),
        query_ids=jnp.asarray(q_ids),
        positive_ids=jnp.asarray(p_ids),
    )
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_switches_change_the_loss(batch):
    q, p, n, q_ids, p_ids = (jnp.asarray(x) for x in batch)
    values = {
        name: float(
            contrastive_loss(q, p, cfg, negatives=n, query_ids=q_ids, positive_ids=p_ids)[0]
        )
        for name, cfg in CONFIGS.items()
    }
    for a, b in itertools.combinations(sorted(values), 2):
        assert values[a] != pytest.approx(values[b], rel=1e-4), (a, b)


def test_learned_temperature_gets_a_gradient(batch):
    q, p = jnp.asarray(batch[0]), jnp.asarray(batch[1])
    grad = jax.grad(lambda t: contrastive_loss(q, p, CONFIGS["bidirectional"], temperature=t)[0])
    assert float(grad(0.1)) != 0.0


@pytest.mark.parametrize("name", ["bidirectional", "everything"])
def test_sharded_equals_single_device_on_global_batch(batch, name):
    """Each device holds 1 of the 8 rows; its negatives must still come from all 8."""
    cfg = CONFIGS[name]
    mesh = sharding.MeshRules(mesh_shape=(4, 2, 1)).make_mesh()
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q, p, n, q_ids, p_ids = (jax.device_put(jnp.asarray(x), rows) for x in batch)
    want, want_metrics = contrastive_loss(
        q, p, cfg, negatives=n, query_ids=q_ids, positive_ids=p_ids
    )
    loss_fn = sharded_contrastive_loss(mesh)
    got, metrics = jax.jit(
        lambda *a: loss_fn(*a[:2], cfg, negatives=a[2], query_ids=a[3], positive_ids=a[4])
    )(q, p, n, q_ids, p_ids)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["spread_out"]), float(want_metrics["spread_out"]), rtol=1e-5
    )
    # Gradients agree too (all_gather's transpose scatters them back to the owning device).
    g_single = jax.grad(
        lambda q: contrastive_loss(q, p, cfg, negatives=n, query_ids=q_ids, positive_ids=p_ids)[0]
    )(q)
    g_sharded = jax.jit(
        jax.grad(lambda q: loss_fn(q, p, cfg, negatives=n, query_ids=q_ids, positive_ids=p_ids)[0])
    )(q)
    np.testing.assert_allclose(np.asarray(g_sharded), np.asarray(g_single), rtol=1e-4, atol=1e-6)


def test_bad_config():
    with pytest.raises(ValueError, match=r"matryoshka_weights has 2 entries, expected 3"):
        ContrastiveConfig(matryoshka_dims=(8, 4), matryoshka_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="temperature=0"):
        ContrastiveConfig(temperature=0)
