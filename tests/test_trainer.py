"""The sharded train step: learning, sharded == unsharded, gradient accumulation, determinism."""

import jax
import numpy as np
import optax
import pytest

from encdec_adapt.data import input_pipeline
from encdec_adapt.models import generative as models
from encdec_adapt.nn.config import load_preset
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim, trainer

VOCAB, LENGTH, BATCH = 128, 16, 8


# Smaller than gemma_tiny so that each compile takes seconds on 2 shared cores.
CONFIG = load_preset("gemma_tiny").replace(
    vocab_size=VOCAB,
    num_layers=2,
    sliding_window=8,
    embed_dim=32,
    hidden_dim=64,
    num_heads=2,
    num_kv_heads=1,
)


@pytest.fixture(scope="module")
def model():
    return models.DecoderOnlyModel(config=CONFIG)


def _trainer(model, mesh_shape=(2, 2, 2), devices=None, **opt):
    rules = sharding.MeshRules(mesh_shape=mesh_shape)
    opt = optim.OptimizerConfig(**{"learning_rate": 3e-2, **opt})
    return trainer.Trainer(model, opt, rules.make_mesh(devices), rules, seed=0)


@pytest.fixture(scope="module")
def adam8(model):
    """AdamW on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices."""
    return _trainer(model)


def _batches(n, seed=0, vocab=VOCAB):
    data = input_pipeline.SyntheticLM(BATCH, LENGTH, vocab, seed=seed)
    return [next(data) for _ in range(n)]


# The equivalence tests below: SGD with momentum (an update linear in the gradient: Adam divides
# every gradient element by its own size, so it blows float noise in near-zero elements up to
# updates of ~1e-3 and does not see a wrong gradient scale at all), and the gradient norm of every
# step compared too, so that a wrong normaliser shows in the metrics as well as the parameters.
@pytest.fixture(scope="module")
def sgd8(model):
    return _trainer(model, name="sgd", learning_rate=0.5)


def _run_norms(t, batches):
    """Like _run; also returns each step's [loss, gradient norm]."""
    state = t.init_state()
    out = []
    for b in batches:
        state, m = t.train_step(state, t.shard_batch(b))
        out.append([float(m["loss_sum"] / m["weight"]), float(m["grad_norm"])])
    return state, np.array(out)


# Non-uniform loss weights for the equivalence tests: row r of batch i keeps its first
# np.roll(ROW_TOKENS, i)[r] target tokens, the rest is padding (token 0, weight 0). The groups a
# wrong normaliser would divide by separately (the 4 data shards: rows {0, 1}, {2, 3}, ...; the
# 4 interleaved micro-batches: rows {0, 4}, {1, 5}, ...) hold different numbers of tokens, so a
# per-shard or per-micro-batch normaliser reweights them and changes the update (with all-ones
# weights it only scales the gradient, which Adam does not see).
ROW_TOKENS = np.array([16, 2, 11, 5, 16, 9, 1, 14])


def _padded(batches):
    out = []
    for i, b in enumerate(batches):
        keep = (np.arange(LENGTH)[None, :] < np.roll(ROW_TOKENS, i)[:, None]).astype(np.int32)
        out.append(
            {
                "decoder_input_tokens": b["decoder_input_tokens"] * keep,
                "decoder_target_tokens": b["decoder_target_tokens"] * keep,
                "decoder_loss_weights": keep,
            }
        )
    return out


def _groups_differ(batches, groups):
    """Whether the weight sums of the row groups differ in every batch (the test can fail)."""
    return all(
        len({int(b["decoder_loss_weights"][list(g)].sum()) for g in groups}) == len(groups)
        for b in batches
    )


def _run(t, batches):
    state = t.init_state()
    losses = []
    for b in batches:
        state, m = t.train_step(state, t.shard_batch(b))
        losses.append(float(m["loss_sum"] / m["weight"]))
    return state, losses


def test_loss_decreases_on_a_learnable_task(adam8):
    # tokens 2..9 of 128 (and every row repeats itself): the unigram part alone is learnable
    # within a few steps, from ~ln(128) to ~ln(8)
    _, losses = _run(adam8, _batches(30, vocab=10))
    assert np.isfinite(losses).all()
    assert losses[0] > 4.0, losses
    assert np.mean(losses[-5:]) < 0.55 * losses[0], losses


def test_state_is_sharded_by_logical_axes(adam8):
    t = adam8
    state = t.init_state()
    q = state.params["stack"]["blocks"][0]["attn"]["q"]
    assert q.sharding.spec == t.state_shardings.params["stack"]["blocks"][0]["attn"]["q"].spec
    assert not q.sharding.is_fully_replicated
    # Adam moments live where their parameter lives
    mu = state.opt_state[0].mu["stack"]["blocks"][0]["attn"]["q"]
    assert mu.sharding == q.sharding


def test_sharded_step_equals_single_device_step(model, sgd8):
    batches = _padded(_batches(3))
    assert _groups_differ(batches, [(0, 1), (2, 3), (4, 5), (6, 7)])  # the 4 batch shards
    sharded, l8 = _run_norms(sgd8, batches)
    one = _trainer(model, (1, 1, 1), devices=jax.devices()[:1], name="sgd", learning_rate=0.5)
    single, l1 = _run_norms(one, batches)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_gradient_accumulation_equals_full_batch(model, sgd8):
    batches = _padded(_batches(2))
    assert _groups_differ(batches, [(0, 4), (1, 5), (2, 6), (3, 7)])  # the 4 micro-batches
    full, lf = _run_norms(sgd8, batches)
    accum, la = _run_norms(
        _trainer(model, name="sgd", learning_rate=0.5, grad_accum_steps=4), batches
    )
    np.testing.assert_allclose(lf, la, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _optax_step(t, state, batch):
    """The reference update: jax.grad of the model's loss, then optax as its docs use it."""
    batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}
    normalizer = jax.numpy.maximum(t.model.loss_weight(batch), 1.0)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads = jax.grad(lambda p: t.model.loss_fn(t.module(p), batch, rng, normalizer)[0])(
        state.params
    )
    updates, opt_state = t.tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


@pytest.mark.parametrize(
    "opt",
    [
        {"name": "adamw", "weight_decay": 0.1},
        {"name": "adafactor", "clip_norm": 0.5},
        pytest.param({"name": "sgd", "freeze": ("^embedder/",)}, marks=pytest.mark.slow),
    ],
    ids=["adamw", "adafactor_clip", "sgd_momentum_freeze"],
)
def test_step_applies_the_optax_update_and_skips_a_non_finite_one(model, opt):
    """The step's three executables (gradients + verdict, parameters, optimizer state) give
    optax's update of an unguarded single function; a non-finite update leaves parameters and
    optimizer state bit-identical and counts the skip."""
    one = (1, 1, 1), jax.devices()[:1]
    t = _trainer(model, *one, **opt)
    batch = _padded(_batches(2))
    state = t.init_state()
    reference = jax.jit(lambda s, b: _optax_step(t, s, b))
    for b in batch:  # the second step sees non-zero moments
        before = _host(state)
        want_params, want_opt = _host(reference(state, b))
        state, m = t.train_step(state, t.shard_batch(b))
        for got, want in ((state.params, want_params), (state.opt_state, want_opt)):
            for a, w in zip(jax.tree.leaves(_host(got)), jax.tree.leaves(want)):
                np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)
        assert int(state.step) == int(before.step) + 1 and int(m["skipped_updates"]) == 0
    if opt["name"] != "adamw":  # one optimizer suffices: the skip does not look at the update rule
        return
    huge = _trainer(model, *one, **{**opt, "learning_rate": 1e30})
    before = _host(state)
    state, m = huge.train_step(state, huge.shard_batch(batch[0]))
    assert int(m["skipped_updates"]) == 1 and int(state.skipped) == 1
    for got, old in ((state.params, before.params), (state.opt_state, before.opt_state)):
        for a, w in zip(jax.tree.leaves(_host(got)), jax.tree.leaves(old)):
            np.testing.assert_array_equal(a, w)


def test_the_update_overwrites_the_state_in_place(model):
    """Deciding to apply or skip before the update is computed lets XLA write the new
    parameters and AdamW moments over the donated ones: the apply executables need no scratch
    (a guard deciding from the new values held them beside the old ones, issue 20)."""
    t = _trainer(model, (1, 1, 1), jax.devices()[:1], name="adamw")
    spec = {
        k: jax.ShapeDtypeStruct((BATCH, LENGTH), jax.numpy.int32)
        for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
    }
    step = t.compile_step(t.abstract_state(), spec)
    largest = max(x.size * x.dtype.itemsize for x in jax.tree.leaves(t.abstract_state().params))
    for part in step.apply:
        m = part.memory_analysis()
        assert m.temp_size_in_bytes < largest, m
        assert m.output_size_in_bytes - m.alias_size_in_bytes < m.output_size_in_bytes / 100, m
    mem = step.memory()
    grads = step.gradients.memory_analysis().output_size_in_bytes
    assert grads >= sum(x.size * 4 for x in jax.tree.leaves(t.abstract_state().params))
    assert (
        mem["temporaries"] >= grads and mem["peak"] == mem["state_and_batch"] + mem["temporaries"]
    )


def test_same_seed_same_bits_and_dropout_changes_with_step():
    model = models.DecoderOnlyModel(config=CONFIG.replace(dropout_rate=0.3))
    t = _trainer(model)
    batch = _batches(1)[0]
    runs = [_run(t, [batch, batch])[0] for _ in range(2)]
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Same parameters and batch at steps 0 and 1: the dropout key is folded with the step,
    # so the masks, and hence the losses, differ.
    b = t.shard_batch(batch)
    _, m0 = t.train_step(t.init_state(), b)
    at_step_1 = t.init_state()._replace(step=jax.numpy.asarray(1, jax.numpy.int32))
    _, m1 = t.train_step(jax.device_put(at_step_1, t.state_shardings), b)
    assert float(m0["loss_sum"]) != float(m1["loss_sum"])


def test_eval_and_score(adam8):
    t = adam8
    state = t.init_state()
    batch = t.shard_batch(_batches(1)[0])
    sums = t.eval_step(state.params, batch)
    scores = np.asarray(t.score_fn()(state.params, batch))
    assert scores.shape == (BATCH,)
    # the per-example log-likelihoods add up to minus the summed token loss
    np.testing.assert_allclose(scores.sum(), -float(sums["loss_sum"]), rtol=1e-4)
    assert float(sums["weight"]) == BATCH * LENGTH


# ---- encoder-decoder and distillation ---------------------------------------------------------


def _encdec_config():
    from encdec_adapt.nn.config import EncoderDecoderConfig

    return EncoderDecoderConfig(encoder=CONFIG, decoder=CONFIG)


def _encdec_batch(seed=0, s=12, t=8):
    """Targets copy the inputs, over 8 of the 128 tokens (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, 10, (BATCH, s)).astype(np.int32)
    inputs[:, s - 3 :] = 0  # padding at the end of every row
    inputs[0, 4:] = 0
    targets = inputs[:, :t].copy()  # copy task
    targets[targets == 0] = 1
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones_like(targets),
    }


@pytest.mark.slow
def test_encoder_decoder_model_learns():
    model = models.EncoderDecoderModel(config=_encdec_config())
    t = _trainer(model)
    state = t.init_state()
    losses = []
    for i in range(12):
        state, m = t.train_step(state, t.shard_batch(_encdec_batch(i)))
        losses.append(float(m["loss_sum"] / m["weight"]))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses


def test_teacher_target_logits_alignment():
    inputs = np.array([[5, 6, 7, 0], [9, 0, 0, 0], [0, 0, 0, 0]], np.int32)
    targets = np.array([[11, 12, 1], [13, 1, 0], [14, 15, 1]], np.int32)
    seen = []

    def one_hot_of_token(tokens):  # logits at p = one-hot of the token at p
        seen.append(np.asarray(tokens))
        return jax.nn.one_hot(tokens, 16)

    out = np.asarray(models.teacher_target_logits(one_hot_of_token, inputs, targets)).argmax(-1)
    np.testing.assert_array_equal(seen[0][:2], [[5, 6, 7, 11, 12, 1, 0], [9, 13, 1, 0, 0, 0, 0]])
    # target t is predicted at the position of the token before it: last input, then targets
    np.testing.assert_array_equal(out[0], [7, 11, 12])
    np.testing.assert_array_equal(out[1], [9, 13, 1])
    # no inputs: targets 1.. are predicted from the targets before them (target 0 has no context)
    np.testing.assert_array_equal(out[2][1:], [14, 15])


def test_distillation_trains_student_and_freezes_teacher():
    model = models.DistillationModel(
        student=models.EncoderDecoderModel(config=_encdec_config()),
        teacher=models.DecoderOnlyModel(config=CONFIG),
        kd_weight=0.5,
    )
    t = _trainer(model)
    state = t.init_state()
    teacher0 = jax.tree.map(np.asarray, state.params["teacher"])
    student0 = jax.tree.map(np.asarray, state.params["student"])
    kd = []
    for i in range(4):
        state, m = t.train_step(state, t.shard_batch(_encdec_batch(i)))
        kd.append(float(m["kd_sum"]) / float(m["weight"]))
    assert np.isfinite(kd).all() and kd[0] > 0
    for a, b in zip(jax.tree.leaves(teacher0), jax.tree.leaves(state.params["teacher"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    moved = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(student0), jax.tree.leaves(state.params["student"]))
    ]
    assert all(moved)


@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_changes_memory_not_numbers(policy):
    from flax import nnx

    batch = {k: jax.numpy.asarray(v) for k, v in _batches(1)[0].items()}

    def loss_and_grads(model):
        module = model.build(nnx.Rngs(0))
        graphdef, params = nnx.split(module, nnx.Param)

        def loss(p):
            return model.loss_fn(nnx.merge(graphdef, p), batch, None)[0]

        fn = jax.jit(jax.value_and_grad(loss))
        return fn(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    (l0, g0), jaxpr0 = loss_and_grads(models.DecoderOnlyModel(config=CONFIG))
    (l1, g1), jaxpr1 = loss_and_grads(models.DecoderOnlyModel(config=CONFIG, remat=policy))
    if policy == "full":
        # A custom VJP (models/generative.py: _sequenced_remat): the gradient's jaxpr holds the
        # forward matmuls twice, once more for the recomputation in the backward pass.
        assert jaxpr1.count("dot_general") > jaxpr0.count("dot_general")
    else:
        assert "remat" not in jaxpr0 and "remat" in jaxpr1
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_moments():
    model = models.DecoderOnlyModel(config=CONFIG.replace(dtype="bfloat16"))
    state, losses = _run(_trainer(model), _batches(2))
    assert np.isfinite(losses).all()
    dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
    dtypes |= {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim}
    assert dtypes == {np.dtype("float32")}
