"""Exact resume of `encdec-adapt train` after SIGKILL during a save, SIGTERM / SIGINT (also during
start-up), a damaged checkpoint; a changed model refused; non-finite updates never saved; one
trainer per MODEL_DIR while readers poll; resume wins over a warm start.

The trainer runs in a subprocess (`python -m encdec_adapt.cli.main train ...`) on 2 fake CPU
devices, and is killed while it runs. Runs compare every leaf of the final train state (params,
optimizer moments, step, RNG) bit for bit with an uninterrupted run.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
TINY = [
    "--gin_file=models/gemma_tiny.gin",
    "--gin_file=runs/synthetic.gin",
    "--gin.gemma_tiny/GemmaConfig.vocab_size=64",
    "--gin.gemma_tiny/GemmaConfig.num_layers=1",
    "--gin.gemma_tiny/GemmaConfig.embed_dim=32",
    "--gin.gemma_tiny/GemmaConfig.hidden_dim=64",
    "--gin.gemma_tiny/GemmaConfig.dropout_rate=0.1",  # the dropout RNG must resume too
    "--gin.SyntheticConfig.vocab_size=64",
    "--gin.SyntheticConfig.length=16",
    "--gin.train.log_every=1",
    "--gin.CheckpointConfig.save_interval_steps=3",
]


def _env():
    env = dict(os.environ)
    # the suite's compile flags (conftest.py), on 2 devices
    env["XLA_FLAGS"] = re.sub(r"device_count=\d+", "device_count=2", env.get("XLA_FLAGS", ""))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _cmd(model_dir, *extra, steps=STEPS):
    return [
        sys.executable,
        "-m",
        "encdec_adapt.cli.main",
        "train",
        *TINY,
        f"--gin.MODEL_DIR={model_dir}",
        f"--gin.TRAIN_STEPS={steps}",
        *extra,
    ]


def run(model_dir, *extra, steps=STEPS):
    """Runs to completion; returns (exit code, output)."""
    p = subprocess.run(
        _cmd(model_dir, *extra, steps=steps),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    return p.returncode, p.stdout


def run_and_signal(model_dir, at_step, sig, *extra):
    """Starts a run, sends `sig` once it reports step `at_step`; returns (code, output)."""
    p = subprocess.Popen(
        _cmd(model_dir, *extra),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith(f"step {at_step}/"):
            p.send_signal(sig)
            break
    out.append(p.stdout.read())
    return p.wait(timeout=300), "".join(out)


def kill_during_save(model_dir, log_path, *extra, steps=STEPS):
    """Starts a run that saves every step and SIGKILLs it the moment a temporary checkpoint
    directory (a save in flight) appears. Returns whether one was seen before the kill (False:
    the run ended first)."""
    with open(log_path, "a") as log:
        p = subprocess.Popen(
            _cmd(model_dir, *SAVE_EVERY_STEP, *extra, steps=steps),
            cwd=REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ckpt_dir = os.path.join(model_dir, "checkpoints")
        while p.poll() is None:
            names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
            if any(".orbax-checkpoint-tmp" in n for n in names):
                p.kill()
                p.wait()
                return True
        return False


SAVE_EVERY_STEP = [
    "--gin.CheckpointConfig.save_interval_steps=1",
    "--gin.CheckpointConfig.keep=None",
]


def state_at(model_dir, step):
    """Every array of the train state of checkpoint `step`, as numpy, keyed by path."""
    path = os.path.join(model_dir, "checkpoints", str(step), "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    restored = ckptr.restore(path, target)
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]
    }


def final_state(model_dir):
    return state_at(model_dir, STEPS)


def steps_on_disk(model_dir):
    """The finished steps, as the checkpoint API (a read-only manager) lists them."""
    from encdec_adapt.runtime import checkpoints

    if not os.path.isdir(os.path.join(model_dir, "checkpoints")):
        return []
    ckpt = checkpoints.Checkpointer(model_dir, checkpoints.CheckpointConfig(), read_only=True)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run that keeps the checkpoint of every step."""
    model_dir = str(tmp_path_factory.mktemp("reference"))
    code, out = run(model_dir, *SAVE_EVERY_STEP)
    assert code == 0, out
    assert steps_on_disk(model_dir) == list(range(1, STEPS + 1))
    return model_dir


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} arrays differ, e.g. {differ[:3]}"


def _newest_equals_reference(model_dir, reference) -> int | None:
    """The newest finished step of `model_dir` (None: none), after checking that its whole
    state equals the uninterrupted run's state at that step."""
    steps = steps_on_disk(model_dir)
    if not steps:
        return None
    _assert_identical(state_at(reference, steps[-1]), state_at(model_dir, steps[-1]))
    return steps[-1]


# A resumed run gets another init seed: restoring the checkpoint makes it irrelevant, while a
# run that silently started from scratch would end in another state.
OTHER_SEED = "--gin.train.seed=7"


def _resume_to_end(model_dir, reference, *extra):
    newest = _newest_equals_reference(model_dir, reference)
    code, out = run(model_dir, *((OTHER_SEED,) if newest else ()), *extra)
    assert code == 0, out
    _assert_identical(final_state(reference), final_state(model_dir))
    return newest, out


def _kill_during_saves_then_resume(reference, model_dir, trials):
    log = model_dir + ".log"
    for trial in range(trials):
        newest = _newest_equals_reference(model_dir, reference)
        extra = (OTHER_SEED,) if newest else ()
        saw = kill_during_save(model_dir, log, *extra)
        assert saw, f"trial {trial}: the run ended before a save was seen in flight"
    _resume_to_end(model_dir, reference)


def test_sigkill_during_async_save_then_resume_is_bit_identical(reference, tmp_path):
    _kill_during_saves_then_resume(reference, str(tmp_path / "run"), trials=3)


@pytest.mark.slow
def test_sigkill_during_async_save_20_times(reference, tmp_path):
    # Each trial resumes and is killed at its first save: STEPS > 20 is not needed, since a
    # trial that finds the run finished restarts it from the top.
    model_dir = str(tmp_path / "run")
    log = str(tmp_path / "run.log")
    seen = 0
    while seen < 20:
        if steps_on_disk(model_dir)[-1:] == [STEPS]:
            _resume_to_end(model_dir, reference)
            model_dir = str(tmp_path / f"run{seen}")
        newest = _newest_equals_reference(model_dir, reference)
        seen += kill_during_save(model_dir, log, *((OTHER_SEED,) if newest else ()))
    _resume_to_end(model_dir, reference)


def test_sigterm_and_sigint_stop_with_a_checkpoint_and_resume(reference, tmp_path):
    """SIGTERM (preemption): checkpoint, exit 0; SIGINT: checkpoint, exit 130; each saved state
    equals the uninterrupted run's at that step; then the run ends where the reference does."""
    model_dir = str(tmp_path / "run")
    code, out = run_and_signal(model_dir, 3, signal.SIGTERM)
    assert code == 0, out
    first = _newest_equals_reference(model_dir, reference)
    assert first is not None and first >= 3, out
    code, out = run_and_signal(model_dir, first + 2, signal.SIGINT, OTHER_SEED)
    assert code == 130, out
    assert "stopped by SIGINT" in out
    second = _newest_equals_reference(model_dir, reference)
    assert second >= first + 2
    _resume_to_end(model_dir, reference)


def test_sigterm_during_startup_exits_cleanly(reference, tmp_path):
    """A SIGTERM that arrives while the trainer starts (before its first step) is handled: exit
    0, no step taken, nothing but finished checkpoints in the run directory."""
    import shutil
    import time

    model_dir = str(tmp_path / "run")
    shutil.copytree(reference, model_dir)
    for step in range(7, STEPS + 1):
        shutil.rmtree(os.path.join(model_dir, "checkpoints", str(step)))
    p = subprocess.Popen(
        _cmd(model_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    time.sleep(3)  # inside imports / start-up, long before the first step
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out
    assert steps_on_disk(model_dir) == [1, 2, 3, 4, 5, 6]
    assert not [n for n in os.listdir(os.path.join(model_dir, "checkpoints")) if "tmp" in n]
    assert not os.path.exists(os.path.join(model_dir, "lock.json"))


def _truncated_run(reference, model_dir, keep_to):
    import shutil

    shutil.copytree(reference, model_dir)
    for step in range(keep_to + 1, STEPS + 1):
        shutil.rmtree(os.path.join(model_dir, "checkpoints", str(step)))


@pytest.mark.slow  # two child runs (55 s); the storage-level refusal tests stay fast
def test_changed_model_is_refused_then_the_original_resumes(reference, tmp_path):
    model_dir = str(tmp_path / "run")
    _truncated_run(reference, model_dir, keep_to=6)
    code, out = run(model_dir, "--gin.gemma_tiny/GemmaConfig.embed_dim=48")
    assert code == 2, out
    line = [ln for ln in out.splitlines() if ln.startswith("encdec-adapt train:")]
    assert len(line) == 1, out
    assert "embedder/embedding is float32[64, 32] in the checkpoint, float32[64, 48]" in line[0]
    assert steps_on_disk(model_dir) == list(range(1, 7))
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints_corrupt"))
    assert not os.path.exists(os.path.join(model_dir, "lock.json"))
    # A changed data setting is refused too, naming it, unless overridden.
    code, out = run(model_dir, "--gin.SyntheticConfig.batch_size=16")
    assert code == 2 and "train_data/batch_size is 8 in the checkpoint and 16" in out, out
    newest, _ = _resume_to_end(model_dir, reference)
    assert newest == 6


def test_damaged_newest_step_is_quarantined_and_the_run_ends_exactly(reference, tmp_path):
    model_dir = str(tmp_path / "run")
    _truncated_run(reference, model_dir, keep_to=9)
    state_dir = os.path.join(model_dir, "checkpoints", "9", "state")
    flipped = 0
    for root, _, files in os.walk(state_dir):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    byte = f.read(1)[0]
                    f.seek(-1, os.SEEK_CUR)
                    f.write(bytes([byte ^ 0x04]))
                flipped += 1
    assert flipped
    code, out = run(model_dir, OTHER_SEED)
    assert code == 0, out
    assert "9 is damaged" in out and "resuming from step 8" in out, out
    assert os.path.isdir(os.path.join(model_dir, "checkpoints_corrupt", "9"))
    _assert_identical(final_state(reference), final_state(model_dir))


def test_nonfinite_updates_are_never_saved(reference, tmp_path):
    """A learning rate of 1e30 makes the first update overflow: it is not applied and the run
    stops (exit 1) without saving, naming the newest checkpoint; every checkpoint on disk is
    finite. With skipped updates allowed, the state is kept through them (the parameters stay
    those of the last good step); a restart from there with a sane learning rate trains on."""
    model_dir = str(tmp_path / "run")
    _truncated_run(reference, model_dir, keep_to=6)
    code, out = run(model_dir, "--gin.OptimizerConfig.learning_rate=1e30", *SAVE_EVERY_STEP)
    assert code == 1, out
    assert "Non-finite update at step 7" in out, out
    assert "Last good checkpoint: step 6 in" in out, out
    assert steps_on_disk(model_dir) == list(range(1, 7))
    for step in range(1, 7):
        state = state_at(model_dir, step)
        assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f"), step
    code, out = run(
        model_dir,
        "--gin.OptimizerConfig.learning_rate=1e30",
        "--gin.train.max_skipped_updates=100",
        steps=8,
    )
    assert code == 0, out  # two updates skipped, within the bound
    good, skipped = state_at(model_dir, 6), state_at(model_dir, 8)
    assert int(skipped["['skipped']"]) == 2 and int(skipped["['step']"]) == 8
    for k in good:
        if k.startswith(("['params']", "['opt_state']")):
            np.testing.assert_array_equal(good[k], skipped[k], err_msg=k)
    code, out = run(model_dir, steps=10)
    assert code == 0, out
    last = state_at(model_dir, 10)
    assert all(np.isfinite(v).all() for v in last.values() if v.dtype.kind == "f")
    assert int(last["['skipped']"]) == 0
    params = [k for k in good if k.startswith("['params']")]
    assert params and all(not np.array_equal(last[k], good[k]) for k in params)


@pytest.mark.slow
def test_readers_polling_a_live_run_do_not_disturb_it(reference, tmp_path):
    """While a run trains (saving every step), its lock refuses a second writer (naming the
    live pid) and the params reader of eval / infer / export-params / embed polls it; the run's
    end state equals the uninterrupted run's."""
    from encdec_adapt.errors import ConfigError
    from encdec_adapt.models.generative import DecoderOnlyModel
    from encdec_adapt.nn.config import load_preset
    from encdec_adapt.parallel import sharding
    from encdec_adapt.runtime import checkpoints, optim, run_guard, trainer

    cfg = load_preset("gemma_tiny").replace(
        vocab_size=64, num_layers=1, embed_dim=32, hidden_dim=64, dropout_rate=0.1
    )
    rules = sharding.MeshRules()
    t = trainer.Trainer(
        DecoderOnlyModel(config=cfg), optim.OptimizerConfig(), rules.make_mesh(), rules
    )
    target = t.abstract_state().params
    model_dir = str(tmp_path / "run")
    with open(tmp_path / "live.log", "w") as log:
        live = subprocess.Popen(
            _cmd(model_dir, *SAVE_EVERY_STEP),
            cwd=REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        refused, polls = None, 0
        try:
            while live.poll() is None:
                if refused is None and os.path.exists(os.path.join(model_dir, "lock.json")):
                    with pytest.raises(ConfigError) as e:
                        run_guard.RunLock(model_dir).acquire()
                    refused = str(e.value)
                if os.path.isdir(os.path.join(model_dir, "checkpoints")) and steps_on_disk(
                    model_dir
                ):
                    checkpoints.restore_run_params(model_dir, target)
                    polls += 1
            assert live.wait() == 0
        finally:
            if live.poll() is None:
                live.kill()
    assert refused is not None and f"held by pid {live.pid}" in refused
    assert polls >= 1
    _assert_identical(final_state(reference), final_state(model_dir))
    assert not os.path.exists(os.path.join(model_dir, "lock.json"))


@pytest.mark.slow  # child runs (45 s); the lock itself: test_gcs / storage tests
def test_a_second_trainer_is_refused_and_a_stale_lock_taken_over(reference, tmp_path):
    import json

    model_dir = str(tmp_path / "run")
    _truncated_run(reference, model_dir, keep_to=6)
    lock = os.path.join(model_dir, "lock.json")
    holder = subprocess.Popen(["sleep", "600"])
    try:
        with open(lock, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid, "started": "then"}, f)
        code, out = run(model_dir)
        assert code == 2, out
        assert f"held by pid {holder.pid}" in out and "another process" in out
        assert steps_on_disk(model_dir) == list(range(1, 7))
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, taken over with a warning; the run resumes exactly.
    newest, out = _resume_to_end(model_dir, reference)
    assert newest == 6 and "taking over the stale lock" in out
    assert not os.path.exists(lock)


def _reference_scores(model_dir, batches):
    """Per-row (target log-likelihood, target tokens) of the step-STEPS parameters, computed
    apart from the code under test: parameters read with Orbax onto one device, one forward of
    the network, log-softmax and sums in numpy (float64)."""
    from flax import nnx

    from encdec_adapt.nn.config import load_preset
    from encdec_adapt.nn.transformer import DecoderOnly

    cfg = load_preset("gemma_tiny").replace(
        vocab_size=64, num_layers=1, embed_dim=32, hidden_dim=64, dropout_rate=0.1
    )
    net = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    path = os.path.join(model_dir, "checkpoints", str(STEPS), "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    params = ckptr.restore(path, target)["params"]
    from encdec_adapt.storage import params_io

    state = nnx.state(net, nnx.Param)
    flat = params_io.flatten(params)
    nnx.replace_by_pure_dict(
        state, params_io.unflatten({k: np.asarray(v) for k, v in flat.items()})
    )
    nnx.update(net, state)
    out = []
    for b in batches:
        logits, _ = net(
            b["decoder_input_tokens"],
            segment_ids=b.get("decoder_segment_ids"),
            positions=b.get("decoder_positions"),
        )
        logits = np.asarray(logits, np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        tgt = b["decoder_target_tokens"]
        picked = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
        weights = b.get("decoder_loss_weights", tgt > 0)
        out += list(zip((picked * weights).sum(-1), weights.sum(-1)))
    return out


def eval_inputs(model_dir: str, tmp_path) -> tuple[list[str], list]:
    """The flags of `eval` / `infer` on the tiny seqio task for the run in `model_dir`, and the
    numpy (log-likelihood, tokens) of every row of its first 2 validation batches."""
    import tiny_seqio_task

    from encdec_adapt.data import input_pipeline

    task_gin = tmp_path / "task.gin"
    task_gin.write_text("import tiny_seqio_task\n")
    common = [
        *TINY,
        f"--gin_file={task_gin}",
        f"--gin.MODEL_DIR={model_dir}",
        "--gin.TARGET_LENGTH=16",
    ]
    data = input_pipeline.DataConfig(
        task=tiny_seqio_task.TASK,
        split="validation",
        batch_size=8,
        task_feature_lengths={"targets": 16},
        shuffle=False,
        repeat=False,
    )
    it = input_pipeline.make_iterator(data)
    return common, _reference_scores(model_dir, [next(it) for _ in range(2)])


def test_eval_and_infer_reproduce_the_trained_parameters(reference, tmp_path, capsys):
    """`eval` / `infer` restore only the params, here onto 8 devices (trained on 2), and give
    the trained parameters' numbers: the loss and every row's log-likelihood equal a numpy
    computation from the checkpoint (float32 sums in another order: rtol 1e-5)."""
    import gin

    from encdec_adapt.cli import main

    common, expected = eval_inputs(reference, tmp_path)
    gin.clear_config()
    try:
        code = main.main(
            [
                "eval",
                *common,
                "--gin_file=runs/eval.gin",
                "--gin.EVAL_TASK=tiny_synthetic_lm",
                "--gin.evaluate.eval_batches=2",
            ],
        )
        assert code == 0, capsys.readouterr()
        with open(os.path.join(reference, "metrics.jsonl")) as f:
            evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
        total_ll = sum(ll for ll, _ in expected)
        total_tokens = sum(n for _, n in expected)
        assert len(evals) == 1 and evals[0]["tokens"] == total_tokens
        np.testing.assert_allclose(evals[0]["loss"], -total_ll / total_tokens, rtol=1e-5)
        gin.clear_config()
        scores = tmp_path / "scores.jsonl"
        code = main.main(
            [
                "infer",
                *common,
                "--gin_file=runs/infer.gin",
                "--gin.INFER_TASK=tiny_synthetic_lm",
                f"--gin.OUTPUT={scores}",
                "--gin.infer.num_batches=2",
            ],
        )
        assert code == 0, capsys.readouterr()
        rows = [json.loads(line) for line in scores.read_text().splitlines()]
        assert len(rows) == 16
        np.testing.assert_allclose(
            [r["log_likelihood"] for r in rows], [ll for ll, _ in expected], rtol=1e-5
        )
        assert [r["tokens"] for r in rows] == [int(n) for _, n in expected]
    finally:
        gin.clear_config()


def test_seqio_iterator_position_restores_exactly():
    import tiny_seqio_task

    from encdec_adapt.data import input_pipeline

    cfg = input_pipeline.DataConfig(
        task=tiny_seqio_task.TASK, batch_size=4, task_feature_lengths={"targets": 32}, pack=True
    )
    it = input_pipeline.make_iterator(cfg)
    for _ in range(3):
        next(it)
    position = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = input_pipeline.make_iterator(cfg)
    resumed.set_state(position)
    for want in expected:
        got = next(resumed)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    assert position["index"] == 3 and resumed.get_state()["index"] == 5


@pytest.mark.slow
def test_resume_wins_over_warm_start_from(tmp_path, monkeypatch, capsys):
    """A run with both a checkpoint in MODEL_DIR and `warm_start_from` continues from the
    checkpoint: the state entering its first train step is the checkpoint's (step, and every
    parameter leaf as the checkpoint API restores it), not the warm-start source's. A control
    run without a checkpoint shows that the same source does warm start a fresh run."""
    from encdec_adapt.data.input_pipeline import SyntheticConfig
    from encdec_adapt.models.generative import DecoderOnlyModel
    from encdec_adapt.nn.config import load_preset
    from encdec_adapt.parallel import sharding
    from encdec_adapt.runtime import checkpoints, optim, train, trainer
    from encdec_adapt.storage import params_io

    cfg = load_preset("gemma_tiny").replace(
        vocab_size=64, num_layers=1, embed_dim=32, hidden_dim=64
    )
    model = DecoderOnlyModel(config=cfg)
    ckpt_cfg = checkpoints.CheckpointConfig(save_interval_steps=2, async_save=False)
    entering = []  # (step, flat params) of the state entering each run's first train step
    original = trainer.Trainer.train_step

    def spy(self, state, batch):
        if not entering:  # before the call: the state is donated to it
            params = params_io.flatten(jax.device_get(state.params))
            entering.append((int(state.step), {k: np.asarray(v) for k, v in params.items()}))
        return original(self, state, batch)

    monkeypatch.setattr(trainer.Trainer, "train_step", spy)

    def run_in_process(model_dir, num_steps, warm_start_from=None):
        entering.clear()
        train.train(
            model_dir=str(model_dir),
            model=model,
            train_data=SyntheticConfig(batch_size=8, length=16, vocab_size=64),
            num_steps=num_steps,
            optimizer=optim.OptimizerConfig(learning_rate=1e-2),
            checkpoint=ckpt_cfg,
            log_every=1,
            tensorboard=False,
            warm_start_from=warm_start_from,
        )
        return entering[0], capsys.readouterr().out

    run_dir = tmp_path / "run"
    run_in_process(run_dir, 2)

    # The checkpoint, read through the checkpoint API.
    rules = sharding.MeshRules()
    t = trainer.Trainer(model, optim.OptimizerConfig(learning_rate=1e-2), rules.make_mesh(), rules)
    ckpt = checkpoints.Checkpointer(str(run_dir), ckpt_cfg)
    state, _, _ = ckpt.restore_latest(t.abstract_state())
    ckpt.close()
    assert int(state.step) == 2
    saved = {k: np.asarray(v) for k, v in params_io.flatten(jax.device_get(state.params)).items()}

    # A warm-start source with the same layout and different values in every leaf.
    rng = np.random.default_rng(0)
    source = {k: (v + 1.0 + rng.random(v.shape)).astype(v.dtype) for k, v in saved.items()}
    source_dir = str(tmp_path / "source")
    params_io.save(source_dir, params_io.unflatten(source), model.model_type, cfg.to_dict())

    # Control: a fresh run does start from the source.
    (step, params), out = run_in_process(tmp_path / "fresh", 1, source_dir)
    assert step == 0 and "Warm start" in out and "Resuming" not in out
    assert params.keys() == source.keys()
    for k in source:
        np.testing.assert_array_equal(params[k], source[k], err_msg=k)

    # The run with a checkpoint resumes it and ignores the source.
    (step, params), out = run_in_process(run_dir, 3, source_dir)
    assert step == 2 and "Resuming from step 2" in out and "Warm start" not in out
    assert params.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(params[k], saved[k], err_msg=k)
        assert not np.any(params[k] == source[k]), k
