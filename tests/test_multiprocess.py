"""Two processes (gloo CPU collectives on 127.0.0.1, 2 devices each) train like one process
with 4 devices on the same global batch: same losses, same final parameters."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train_resume import REPO, TINY, state_at

STEPS = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(model_dir, devices, *extra):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=re.sub(
            r"device_count=\d+", f"device_count={devices}", os.environ.get("XLA_FLAGS", "")
        ),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
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
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    port = _free_port()
    procs = [
        _start(
            multi_dir,
            2,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    single = _start(single_dir, 4)
    out = single.communicate(timeout=300)[0]
    assert single.returncode == 0, out

    one, two = _losses(single_dir), _losses(multi_dir)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    a, b = state_at(single_dir, STEPS), state_at(multi_dir, STEPS)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
