"""The quickstart end to end at a tiny scale (killed with SIGKILL mid-training, then resumed),
and the `export-params` command it uses between stages."""

import json
import os
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
from flax import nnx

from encdec_adapt import load_preset
from encdec_adapt.cli import main
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.runtime import export_params
from encdec_adapt.runtime.metrics_log import read_metrics
from encdec_adapt.storage import params_io
from experiments import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILE = os.path.join(REPO, "encdec_adapt", "configs", "models", "gemma_tiny.gin")
# 20 pretraining steps (checkpoints every 5: room to kill it mid-stage), 6 per adaptation.
SCALE = 0.05


def _train_synthetic(model_dir, steps=4):
    gin.clear_config()
    code = main.main(
        [
            "train",
            f"--gin_file={MODEL_FILE}",
            "--gin_file=runs/synthetic.gin",
            f"--gin.MODEL_DIR={model_dir}",
            f"--gin.TRAIN_STEPS={steps}",
            "--gin.CheckpointConfig.save_interval_steps=2",
            "--gin.train.tensorboard=False",
        ]
    )
    gin.clear_config()
    assert code == 0


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A 4-step synthetic training run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("synthetic") / "run"
    _train_synthetic(run)
    return run


def test_export_params_writes_the_newest_or_a_given_step(synthetic_run, tmp_path, capsys):
    run = synthetic_run
    assert export_params.newest_step(str(run)) == 4

    out = tmp_path / "params"
    assert main.main(["export-params", f"--model_dir={run}", f"--output={out}"]) == 0
    assert f"step 4 of {run} -> {out}" in capsys.readouterr().out
    model_type, config = params_io.read_model_json(str(out))
    assert model_type == "decoder_only" and config["embed_dim"] == 64
    newest = params_io.load(str(out))

    older = tmp_path / "params_2"
    assert export_params.export_params(str(run), str(older), step=2) == 2
    a, b = params_io.flatten(newest), params_io.flatten(params_io.load(str(older)))
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # two steps apart: trained
    # the exported parameters load into the same architecture (names and shapes checked)
    model = DecoderOnly(load_preset("gemma_tiny"), rngs=nnx.Rngs(0))
    params_io.load_into(model, str(out))
    got = params_io.flatten(params_io.model_params(model))
    for k, v in a.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))


def test_export_params_errors_name_the_culprit(synthetic_run, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    os.makedirs(empty)
    code = main.main(["export-params", f"--model_dir={empty}", f"--output={tmp_path}/o"])
    assert code == 2
    assert f"{empty}/config.gin does not exist" in capsys.readouterr().err

    run = synthetic_run
    code = main.main(["export-params", f"--model_dir={run}", f"--output={tmp_path}/o", "--step=7"])
    assert code == 2
    assert "step 7 is not in" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    os.makedirs(tmp_path / "exists")
    # an empty directory counts as absent: this one holds a user's file
    (tmp_path / "exists" / "keep.txt").write_text("a user's file")
    code = main.main(["export-params", f"--model_dir={run}", f"--output={tmp_path}/exists"])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "exists" / "keep.txt").read_text() == "a user's file"


def test_budget_scaling_and_metrics_dedupe(tmp_path):
    b = quickstart.Budget().scaled(SCALE)
    assert (b.pretrain_steps, b.adapt_steps, b.contrastive_steps) == (20, 6, 3)
    assert b.batch_size == b.contrastive_batch_size == 4
    assert quickstart.Budget().scaled(0.001).adapt_steps == 2  # min_steps
    full = quickstart.Budget().scaled(1)
    assert full == quickstart.Budget()
    with pytest.raises(ValueError, match="QUICKSTART_SCALE"):
        quickstart.Budget().scaled(0)
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 1, "split": "train", "loss": 3.0},
        {"step": 2, "split": "train", "loss": 2.0},
        {"step": 2, "split": "eval", "loss": 9.0},
        {"step": 2, "split": "train", "loss": 2.5},  # logged again after a resume
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 3, "spl')
    records = read_metrics(str(path), "train")
    assert read_metrics(str(tmp_path), "eval") == [lines[2]]  # a MODEL_DIR: its metrics.jsonl
    assert read_metrics(str(tmp_path / "none"), "train") == []
    assert [(r["step"], r["loss"]) for r in records] == [(1, 3.0), (2, 2.5)]


def _env(out):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine
    env.update(QUICKSTART_DIR=str(out), QUICKSTART_SCALE=str(SCALE), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow  # about 2 minutes on 2 quiet cores (7 compiled models), 4 when shared
def test_quickstart_killed_mid_training_resumes_and_prints_the_table(embedded_corpus, tmp_path):
    out = tmp_path / "qs"
    budget = quickstart.Budget().scaled(SCALE)
    cmd = [sys.executable, "-m", "experiments.quickstart"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(out), stdout=log, stderr=subprocess.STDOUT)
    # SIGKILL as soon as the pretraining stage has a checkpoint (and has not finished).
    first = quickstart.save_interval(budget.pretrain_steps)
    deadline = time.time() + 300
    while quickstart.newest_step(str(out / "pretrain")) is None:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    killed_at = quickstart.newest_step(str(out / "pretrain"))
    assert first <= killed_at < budget.pretrain_steps

    second = subprocess.run(
        cmd, cwd=REPO, env=_env(out), capture_output=True, text=True, timeout=600
    )
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-4000:]
    assert f"Resuming from step {killed_at} of {out}/pretrain/checkpoints" in text
    for row in ("pretrain (decoder-only LM)", "adapt + UL2", "adapt + PrefixLM + KD"):
        assert f"| {row} | " in second.stdout
    assert (out / "summary.md").read_text() in second.stdout
    for stage in quickstart.TRAINING_STAGES:
        assert quickstart.newest_step(str(out / stage)) is not None
        assert (out / "plots" / f"{stage}.png").stat().st_size > 1000
    for ckpt in quickstart.PARAMS_CHECKPOINTS:
        assert quickstart.is_params_checkpoint(str(out / ckpt))
    result = json.loads((out / "eval" / "adapt_ul2_params_prefix_lm" / "result.json").read_text())
    assert np.isfinite(result["loss"])
    report = json.loads((out / "retrieval" / "retrieval_report.json").read_text())
    assert set(report["results"]) == {"towers", "untrained towers", "BM25"}

    # a third run finds every stage complete and only prints the table again
    third = subprocess.run(
        cmd, cwd=REPO, env=_env(out), capture_output=True, text=True, timeout=600
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Resuming" not in third.stdout and "took" not in third.stdout
    assert "pretrain: finished" in third.stdout


def test_a_directory_keeps_its_scale(tmp_path):
    quickstart.Quickstart(str(tmp_path), 0.02).check_settings()
    quickstart.Quickstart(str(tmp_path), 0.02).check_settings()  # same settings: fine
    with pytest.raises(quickstart.QuickstartError, match=r"holds a quickstart run at scale 0\.02"):
        quickstart.Quickstart(str(tmp_path), 0.5).check_settings()


def test_stage_runner_skips_restarts_checks_and_times(tmp_path):
    from experiments import stages

    messages, calls = [], []
    times = stages.StageTimes(str(tmp_path / "times.json"))
    runner = stages.Stages(messages.append, times)
    result = str(tmp_path / "a" / "result.json")
    partial = tmp_path / "partial.jsonl"
    partial.write_text("half")

    def work():
        assert not partial.exists()  # removed before the stage runs again
        calls.append(1)
        return {"loss": 1.5}

    assert runner.run("a", work, result=result, restart=[str(partial)]) == {"loss": 1.5}
    assert not os.path.exists(result + ".tmp")
    assert runner.run("a", work, result=result) == {"loss": 1.5}  # finished: read back
    assert calls == [1] and messages == ["a: finished, skipping"]
    assert set(times.get()) == {"a"}

    # a stage whose finished check fails after it ran (preempted) raises, and adds its time
    with pytest.raises(stages.StageError, match="stage b stopped before it finished"):
        runner.run("b", lambda: None, finished=lambda: False)
    done = tmp_path / "b.done"
    runner.run("b", done.touch, finished=done.exists)  # resumed: runs, then finished
    runner.run("b", done.touch, finished=done.exists)
    assert messages[-1] == "b: finished, skipping" and times.get()["b"] > 0
    with pytest.raises(ValueError, match="result file or a finished check"):
        runner.run("c", lambda: None)
