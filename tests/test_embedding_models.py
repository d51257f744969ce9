"""DualEncoderModel / ClassifierModel through the generic trainer: learning, sharded == single
device, gradient caching, warm starts from decoder-only and encoder-decoder checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.models.contrastive import ContrastiveConfig
from encdec_adapt.models.embedding import ClassifierModel, DualEncoderModel, batch_axes
from encdec_adapt.nn.config import ClassifierConfig, EncoderDecoderConfig, load_preset
from encdec_adapt.nn.dual_encoder import DualEncoderConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim, trainer
from encdec_adapt.storage import params_io

VOCAB, LENGTH, BATCH, NEG = 64, 8, 16, 2

TOWER = load_preset("gemma_tiny").replace(
    vocab_size=VOCAB,
    num_layers=1,
    sliding_window=8,
    embed_dim=32,
    hidden_dim=64,
    num_heads=2,
    num_kv_heads=1,
)


def dual_model(**kw):
    de = dict(tower=TOWER, projection_dims=(16,))
    de.update(kw.pop("de", {}))
    return DualEncoderModel(config=DualEncoderConfig(**de), **kw)


def _trainer(model, mesh_shape=(1, 1, 1), devices=None, lr=1e-2, **opt):
    rules = sharding.MeshRules(mesh_shape=mesh_shape)
    cfg = optim.OptimizerConfig(learning_rate=lr, **opt)
    return trainer.Trainer(model, cfg, rules.make_mesh(devices), rules, seed=0)


def single(model, **kw):
    return _trainer(model, devices=jax.devices()[:1], **kw)


def pair_batch(seed, batch=BATCH, negatives=NEG):
    """Queries are documents with their tokens shuffled (a learnable bag-of-tokens match)."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(2, VOCAB, (batch, LENGTH)).astype(np.int32)
    docs[:, -2:] = 0  # some padding
    queries = np.stack([rng.permutation(d[:-2]) for d in docs])
    queries = np.pad(queries, ((0, 0), (0, 2))).astype(np.int32)
    out = {"query_tokens": queries, "positive_tokens": docs}
    if negatives:
        out["negative_tokens"] = rng.integers(2, VOCAB, (batch, negatives, LENGTH)).astype(np.int32)
    return out


def _run(t, batches):
    state = t.init_state()
    losses, accs = [], []
    for b in batches:
        state, m = t.train_step(state, t.shard_batch(b))
        losses.append(float(m["loss_sum"] / m["weight"]))
        accs.append(float(m["correct"] / m["weight"]))
    return state, losses, accs


@pytest.mark.slow
def test_dual_encoder_learns():
    t = single(dual_model())
    _, losses, accs = _run(t, [pair_batch(i % 4) for i in range(25)])
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.5 * losses[0], losses
    assert np.mean(accs[-4:]) > 0.9, accs  # in-batch top-1 retrieval


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    model = dual_model(de=dict(learn_temperature=True))
    batches = [pair_batch(i, negatives=0) for i in range(2)]
    t8 = _trainer(model, mesh_shape=(2, 4, 1))
    assert t8.model.mesh == (t8.mesh, t8.rules)
    assert batch_axes(BATCH, t8.mesh, t8.rules) is not None  # the shard_map loss is traced
    sharded, l8, a8 = _run(t8, batches)
    one, l1, a1 = _run(single(model), batches)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert a8 == a1
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_grad_cache_gradients_equal_plain():
    plain = dual_model(de=dict(learn_temperature=True))
    cached = dual_model(de=dict(learn_temperature=True), grad_cache_chunk=4)
    module = plain.build(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    batch = jax.tree.map(jnp.asarray, pair_batch(0))

    def grads(model):
        def loss(p):
            return model.loss_fn(nnx.merge(graphdef, p, rest), batch, None)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (lp, mp), gp = grads(plain)
    (lc, mc), gc = grads(cached)
    np.testing.assert_allclose(lc, lp, rtol=1e-6)
    assert float(mc["correct"]) == float(mp["correct"])
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="grad_cache_chunk=5 does not divide the batch of 16"):
        dual_model(grad_cache_chunk=5).loss_fn(module, batch, None)


def _save(tmp_path, name, module, model_type, config):
    path = str(tmp_path / name)
    params_io.save(path, params_io.model_params(module), model_type, config.to_dict())
    return path


def test_warm_start_towers_from_decoder_and_encoder_decoder(tmp_path):
    model = dual_model(de=dict(sharing="separate"))
    t = single(model)
    decoder = DecoderOnly(TOWER, rngs=nnx.Rngs(7))
    path = _save(tmp_path, "dec", decoder, "decoder_only", TOWER)
    fresh = t.init_state()
    kept = jax.tree.map(np.asarray, fresh.params["query_projection"])
    state = t.warm_start(fresh, path)
    source = params_io.model_params(decoder)
    for tower in ("query_tower", "doc_tower"):
        for name, x in params_io.flatten(state.params[tower]).items():
            np.testing.assert_array_equal(x, params_io.flatten(source)[name], err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, state.params["query_projection"], kept)

    encdec = EncoderDecoder(EncoderDecoderConfig(encoder=TOWER, decoder=TOWER), rngs=nnx.Rngs(8))
    cfg = EncoderDecoderConfig(encoder=TOWER, decoder=TOWER)
    path = _save(tmp_path, "encdec", encdec, "encoder_decoder", cfg)
    state = t.warm_start(t.init_state(), path)
    enc = params_io.flatten(params_io.model_params(encdec)["encoder"])
    for name, x in params_io.flatten(state.params["doc_tower"]).items():
        np.testing.assert_array_equal(x, enc[name], err_msg=name)

    wide = TOWER.replace(embed_dim=48)
    path = _save(tmp_path, "wide", DecoderOnly(wide, rngs=nnx.Rngs(0)), "decoder_only", wide)
    with pytest.raises(params_io.CheckpointError, match=r"embedder/embedding.*\(64, 48\)"):
        t.warm_start(t.init_state(), path)


def classifier_model():
    return ClassifierModel(config=ClassifierConfig(encoder=TOWER, num_classes=2))


def class_batch(seed):
    """Label = whether token 7 occurs (needs the whole sequence)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(8, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    y = rng.integers(0, 2, BATCH).astype(np.int32)
    x[np.arange(BATCH), rng.integers(0, LENGTH, BATCH)] = np.where(y == 1, 7, 8)
    return {"encoder_input_tokens": x, "labels": y}


def test_classifier_learns_and_warm_starts(tmp_path):
    t = single(classifier_model(), lr=3e-2)
    _, losses, accs = _run(t, [class_batch(i % 4) for i in range(30)])
    assert np.mean(losses[-4:]) < 0.5 * losses[0], losses
    assert np.mean(accs[-4:]) > 0.9, accs
    decoder = DecoderOnly(TOWER, rngs=nnx.Rngs(7))
    path = _save(tmp_path, "dec", decoder, "decoder_only", TOWER)
    state = t.warm_start(t.init_state(), path)
    source = params_io.flatten(params_io.model_params(decoder))
    for name, x in params_io.flatten(state.params["encoder"]).items():
        np.testing.assert_array_equal(x, source[name], err_msg=name)
    assert set(state.params["head"]) == {"kernel", "bias"}
    cfg = EncoderDecoderConfig(encoder=TOWER, decoder=TOWER)
    encdec = EncoderDecoder(cfg, rngs=nnx.Rngs(8))
    state = t.warm_start(t.init_state(), _save(tmp_path, "encdec", encdec, "encoder_decoder", cfg))
    enc = params_io.flatten(params_io.model_params(encdec)["encoder"])
    for name, x in params_io.flatten(state.params["encoder"]).items():
        np.testing.assert_array_equal(x, enc[name], err_msg=name)


def test_rows_of_padding_count_for_nothing():
    """An eval loop pads its last batch with all-zero rows: metric sums must not change."""
    from encdec_adapt.models.contrastive import contrastive_loss

    cfg = ContrastiveConfig(same_tower_negatives=True, spread_out_weight=0.1)
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(2, 6, 8)).astype(np.float32)
    n = rng.normal(size=(6, 2, 8)).astype(np.float32)
    want, _ = contrastive_loss(q, p, cfg, negatives=n)
    pad = lambda x: np.concatenate([x, np.zeros((2, *x.shape[1:]), np.float32)])
    valid = np.arange(8) < 6
    got, _ = contrastive_loss(pad(q), pad(p), cfg, negatives=pad(n), valid=valid)
    np.testing.assert_allclose(got, want, rtol=1e-6)

    def pad_batch(b):
        return {k: np.concatenate([v, np.zeros((2, *v.shape[1:]), v.dtype)]) for k, v in b.items()}

    for model, batch in ((dual_model(), pair_batch(0, batch=6)), (classifier_model(), None)):
        batch = batch or {k: v[:6] for k, v in class_batch(0).items()}
        fn = nnx.jit(lambda module, b, m=model: m.eval_fn(module, b))
        module = model.build(nnx.Rngs(0))
        a, b = fn(module, batch), fn(module, pad_batch(batch))
        assert float(a["weight"]) == float(b["weight"]) == 6
        assert float(a["correct"]) == float(b["correct"])
        np.testing.assert_allclose(float(b["loss_sum"]), float(a["loss_sum"]), rtol=1e-5, atol=1e-5)


def test_flops_per_token_share_the_encoder_count():
    lengths = {"query": 4, "positive": LENGTH}
    dense = dual_model().flops_per_token(lengths)
    clf = ClassifierModel(config=ClassifierConfig(encoder=TOWER, num_classes=3))
    assert dense == clf.flops_per_token({"inputs": LENGTH}) > 0
    lexical = dual_model(de={"pooling": "lexical", "projection_dims": ()})
    assert lexical.flops_per_token(lengths) == dense + 6 * TOWER.embed_dim * VOCAB
