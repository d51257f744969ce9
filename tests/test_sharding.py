"""Mesh sharding on 8 fake CPU devices: equal results, and no silent replication of big params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from encdec_adapt.nn.config import GemmaConfig, load_preset
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.parallel import sharding

TINY = load_preset("gemma_tiny")
# Gemma 3 layout: a single kv head (cannot be split over "tensor"), QK-norm, no soft-caps.
TINY3 = TINY.replace(
    family="gemma3",
    num_kv_heads=1,
    use_qk_norm=True,
    attn_logits_soft_cap=None,
    final_logit_soft_cap=None,
    attention_pattern=("local",) * 5 + ("global",),
    num_layers=6,
)


def forward(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)[0]


def _meshes_by_model():
    """Each mesh shape with both models; the default suite runs each mesh shape once,
    alternating the model between shapes, and `slow` runs the other half."""
    for i, mesh_shape in enumerate([(2, 2, 2), (1, 4, 2), (1, 1, 8)]):
        for j, (cfg, name) in enumerate([(TINY, "gemma2"), (TINY3, "gemma3")]):
            marks = [pytest.mark.slow] if (i + j) % 2 else []
            yield pytest.param(cfg, mesh_shape, marks=marks, id=f"{mesh_shape}-{name}")


@pytest.mark.parametrize("cfg,mesh_shape", list(_meshes_by_model()))
def test_sharded_forward_equals_unsharded(cfg: GemmaConfig, mesh_shape):
    assert jax.device_count() == 8
    rules = sharding.MeshRules(mesh_shape=mesh_shape)
    mesh = rules.make_mesh()
    model = sharding.create_sharded(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)), mesh, rules)

    reference = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    host_params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ref_params = nnx.to_pure_dict(nnx.state(reference, nnx.Param))
    # Initialising inside one sharded jit gives the same values as eager initialisation.
    jax.tree.map(np.testing.assert_array_equal, host_params, jax.device_get(ref_params))

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, size=(8, 24)), jnp.int32)
    segment_ids = jnp.asarray(np.arange(24)[None, :] < rng.integers(5, 25, size=(8, 1)), jnp.int32)
    expected = forward(reference, tokens, segment_ids)
    with sharding.use_mesh(mesh, rules):
        got = nnx.jit(forward)(model, tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_every_large_parameter_is_sharded():
    rules = sharding.MeshRules(mesh_shape=(2, 2, 2))
    mesh = rules.make_mesh()
    for cfg in (TINY, TINY3):
        model = sharding.create_sharded(lambda c=cfg: DecoderOnly(c, rngs=nnx.Rngs(0)), mesh, rules)
        state = nnx.state(model, nnx.Param)
        assert sharding.unsharded_params(state, min_size=1024) == []
        # The single kv head stays whole along "tensor" but is still split along "fsdp".
        k = state["stack"]["blocks"][0]["attn"]["k"][...]
        want = P(None, "fsdp", None) if cfg.num_kv_heads == 1 else P("tensor", "fsdp", None)
        assert k.sharding.spec == want
        emb = state["embedder"]["embedding"][...]
        assert emb.sharding.spec == P("tensor", "fsdp")
        assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.embed_dim // 2)


def test_unsharded_params_reports_replication():
    rules = sharding.MeshRules(mesh_shape=(8, 1, 1))  # data-parallel only: weights replicated
    mesh = rules.make_mesh()
    model = sharding.create_sharded(lambda: DecoderOnly(TINY, rngs=nnx.Rngs(0)), mesh, rules)
    found = dict(
        (name, shape)
        for name, shape, _ in sharding.unsharded_params(nnx.state(model, nnx.Param), min_size=1024)
    )
    assert found["embedder/embedding"] == (TINY.vocab_size, TINY.embed_dim)


def test_logical_to_spec_rules():
    mesh = sharding.MeshRules(mesh_shape=(2, 2, 2)).make_mesh()
    rules = sharding.MeshRules()
    spec = sharding.logical_to_spec(("activation_batch", "activation_length"), (8, 5), mesh, rules)
    assert spec == P(("data", "fsdp"), None)
    # Batch 2 cannot take both axes: only the first that divides is used.
    spec = sharding.logical_to_spec(("activation_batch", None), (2, 5), mesh, rules)
    assert spec == P("data", None)


def test_active_mesh_only_inside_use_mesh():
    rules = sharding.MeshRules(mesh_shape=(2, 2, 2))
    mesh = rules.make_mesh()
    assert sharding.active() is None
    with sharding.use_mesh(mesh, rules):
        assert sharding.active() == (mesh, rules)
    assert sharding.active() is None


def test_bad_mesh_shape_errors():
    with pytest.raises(ValueError, match=r"needs 12 devices, 8 are available"):
        sharding.MeshRules(mesh_shape=(3, 2, 2)).make_mesh()
    with pytest.raises(ValueError, match="more than one -1"):
        sharding.MeshRules(mesh_shape=(-1, -1, 1)).make_mesh()
