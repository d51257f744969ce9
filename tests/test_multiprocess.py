"""1, 2 and 4 processes (gloo CPU collectives on 127.0.0.1; 4 devices in all) train the same
global batches of a packed seqio task to the same losses and parameters, and a 2-process
checkpoint resumes on 1 process (re-sharded input: the same batches as an uninterrupted run).

The data is tiny_seqio_task packed into rows of 16 tokens: rows hold different numbers of
examples and of padding tokens, so the loss weights are not uniform and a per-host (instead of
global) loss normaliser would change the losses. `DataConfig.num_shards=4` fixes the input
shards, so every process count reads the same global stream, each process only its shards.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train_resume import REPO, TINY, state_at

STEPS, MORE = 4, 6
TESTS = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ)
    env.update(
        # keep the other XLA flags of the session (tests/conftest.py), change the device count
        XLA_FLAGS=re.sub(r"\S*device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        + f" --xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]),
    )
    return env


def _start(model_dir, devices, *extra):
    """Starts one process of a tiny synthetic-data run on `devices` devices (the failing-host
    tests); returns the Popen, its output merged into stdout."""
    cmd = [
        sys.executable,
        "-m",
        "encdec_adapt.cli.main",
        "train",
        *TINY,
        f"--gin.MODEL_DIR={model_dir}",
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.MeshRules.mesh_shape=(2, 2, 1)",
        *extra,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _cmd(model_dir, steps, task_gin, *extra):
    return [
        sys.executable,
        "-m",
        "encdec_adapt.cli.main",
        "train",
        *TINY,
        f"--gin_file={task_gin}",
        f"--gin.MODEL_DIR={model_dir}",
        f"--gin.TRAIN_STEPS={steps}",
        "--gin.MeshRules.mesh_shape=(2, 2, 1)",
        "--gin.CheckpointConfig.save_interval_steps=2",
        "--gin.train.train_data=@DataConfig()",
        "--gin.DataConfig.task='tiny_synthetic_lm'",
        "--gin.DataConfig.batch_size=8",
        "--gin.DataConfig.task_feature_lengths={'targets': 16}",
        "--gin.DataConfig.pack=True",
        "--gin.DataConfig.num_shards=4",
        *extra,
    ]


def _train(model_dir, steps, task_gin, processes):
    """Runs `processes` processes with 4 // processes devices each; returns their outputs."""
    env = _env(4 // processes)
    port = _free_port()
    job = []
    if processes > 1:
        job = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
    procs = [
        subprocess.Popen(
            _cmd(model_dir, steps, task_gin, *job, *([f"--process_id={i}"] if job else [])),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def task_gin(tmp_path_factory):
    path = tmp_path_factory.mktemp("gin") / "task.gin"
    path.write_text("import tiny_seqio_task\n")
    return str(path)


@pytest.fixture(scope="module")
def single(tmp_path_factory, task_gin):
    """One process, 4 devices, MORE steps: the reference run."""
    model_dir = str(tmp_path_factory.mktemp("single"))
    _train(model_dir, MORE, task_gin, 1)
    return model_dir


def _same_run(reference, run, steps):
    one, other = _losses(reference), _losses(run)
    assert sorted(other) == list(steps)
    np.testing.assert_allclose(
        [other[s] for s in steps], [one[s] for s in steps], rtol=0, atol=1e-6
    )
    a, b = state_at(reference, steps[-1]), state_at(run, steps[-1])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow  # process pairs start, import and compile side by side
def test_two_processes_match_one_and_resume_on_one(single, task_gin, tmp_path):
    multi = str(tmp_path / "multi")
    _train(multi, STEPS, task_gin, 2)
    _same_run(single, multi, range(1, STEPS + 1))
    # the 2-process checkpoint on 1 process: it reads all 4 shards from their saved states
    out = _train(multi, MORE, task_gin, 1)[0]
    assert f"Resuming from step {STEPS}" in out
    assert "replay" not in out  # restored from the saved iterator states, no batch replayed
    _same_run(single, multi, range(1, MORE + 1))


@pytest.mark.slow  # four processes start, import and compile side by side: over a minute here
def test_four_processes_match_one(single, task_gin, tmp_path):
    multi = str(tmp_path / "multi4")
    _train(multi, STEPS, task_gin, 4)
    _same_run(single, multi, range(1, STEPS + 1))
