"""Exact resume of `encdec-adapt train` after SIGKILL / SIGTERM, corrupt checkpoints, NaN stop;
resume wins over a warm start.

The trainer runs in a subprocess (`python -m encdec_adapt.cli.main train ...`) on 2 fake CPU
devices, and is killed while it runs. Runs compare every leaf of the final train state (params,
optimizer moments, step, RNG) bit for bit with an uninterrupted run.
"""

import os
import signal
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
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
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


def run_and_signal(model_dir, at_step, sig):
    """Starts a run, sends `sig` once it reports step `at_step`; returns (code, output)."""
    p = subprocess.Popen(
        _cmd(model_dir),
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


def final_state(model_dir, step=STEPS):
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


def steps_on_disk(model_dir):
    d = os.path.join(model_dir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("reference"))
    code, out = run(model_dir)
    assert code == 0, out
    return model_dir


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} arrays differ, e.g. {differ[:3]}"


def _assert_resumed_from_latest(model_dir_before: list[int], out: str):
    if model_dir_before:
        assert f"Resuming from step {model_dir_before[-1]}" in out, out
    else:  # killed before the first save finished: nothing to resume
        assert "Resuming" not in out, out


def test_sigkill_anywhere_then_resume_is_bit_identical(reference, tmp_path):
    model_dir = str(tmp_path)
    kill_at = int(np.random.default_rng(20261122).integers(4, 9))  # between two saves
    code, out = run_and_signal(model_dir, kill_at, signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    # killed right after a save step was reported: usually while the async save writes
    on_disk = steps_on_disk(model_dir)
    code, out = run_and_signal(model_dir, 9, signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    _assert_resumed_from_latest(on_disk, out)
    on_disk = steps_on_disk(model_dir)
    code, out = run(model_dir)
    assert code == 0, out
    _assert_resumed_from_latest(on_disk, out)
    _assert_identical(final_state(reference), final_state(model_dir))


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes(reference, tmp_path):
    model_dir = str(tmp_path)
    code, out = run_and_signal(model_dir, 5, signal.SIGTERM)
    assert code == 0, out
    assert "Stopping at step" in out
    stopped = int(out.split("Stopping at step ")[1].split(":")[0])
    assert stopped >= 5 and stopped in steps_on_disk(model_dir)
    code, out = run(model_dir)
    assert code == 0, out
    assert f"Resuming from step {stopped}" in out
    _assert_identical(final_state(reference), final_state(model_dir))


def test_corrupt_latest_then_nan_stop(reference, tmp_path):
    import json
    import shutil

    model_dir = str(tmp_path / "run")
    shutil.copytree(reference, model_dir)
    # damage the newest checkpoint: drop its array data
    state_dir = os.path.join(model_dir, "checkpoints", str(STEPS), "state")
    for root, _, files in os.walk(state_dir):
        for f in files:
            if not f.startswith("_"):
                os.remove(os.path.join(root, f))
    periodic_eval = [
        "--gin.train.eval_data=@eval/SyntheticConfig()",
        "--gin.eval/SyntheticConfig.vocab_size=64",
        "--gin.eval/SyntheticConfig.length=16",
        "--gin.eval/SyntheticConfig.seed=1",
        "--gin.train.eval_every=3",
        "--gin.train.eval_batches=2",
    ]
    code, out = run(model_dir, *periodic_eval, steps=STEPS + 3)
    assert code == 0, out
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [STEPS, STEPS + 3]  # resumed from step 9
    assert all(r["tokens"] == 2 * 8 * 16 and np.isfinite(r["loss"]) for r in evals)
    assert f"{STEPS} is unreadable" in out and f"resuming from step {STEPS - 3}" in out
    assert f"Resuming from step {STEPS - 3}" in out
    assert steps_on_disk(model_dir)[-1] == STEPS + 3
    # The resumed steps retrace the reference: step 12 is recomputed exactly.
    # Then a learning rate of 1e30 makes the loss non-finite within a few steps.
    code, out = run(model_dir, "--gin.OptimizerConfig.learning_rate=1e30", steps=STEPS + 9)
    assert code == 1, out
    assert "Loss is nan" in out or "Loss is inf" in out, out
    assert f"Last good checkpoint: step {STEPS + 3}" in out
    assert steps_on_disk(model_dir)[-1] == STEPS + 3
    last = final_state(model_dir, STEPS + 3)
    assert all(np.isfinite(v).all() for v in last.values() if v.dtype.kind == "f")


def test_eval_and_infer_read_a_training_checkpoint(reference, tmp_path, capsys):
    """`eval` / `infer` restore only the params, here onto 8 devices (trained on 2)."""
    import json

    import gin

    from encdec_adapt.cli import main

    task_gin = tmp_path / "task.gin"
    task_gin.write_text("import tiny_seqio_task\n")
    common = [
        *TINY,
        f"--gin_file={task_gin}",
        f"--gin.MODEL_DIR={reference}",
        "--gin.TARGET_LENGTH=16",
    ]
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
        assert len(evals) == 1 and np.isfinite(evals[0]["loss"]) and evals[0]["tokens"] > 0
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
        assert all(r["log_likelihood"] < 0 and r["tokens"] > 0 for r in rows)
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
    assert position == {"index": 3} and resumed.get_state() == {"index": 5}


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
    state, _ = ckpt.restore_latest(t.abstract_state())
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
