"""The benchmark scripts run end to end at tiny sizes, so they cannot rot."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=600, env=None):
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow  # 86 s on 2 cores: the default suite's budget
def test_bench_accelerator_tiny_on_cpu():
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    out = _run(["bash", "scripts/bench_accelerator.sh", "--tiny"], env=env)
    train = [line for line in out.splitlines() if line.startswith("train: t5gemma tiny")]
    assert len(train) == 1 and "MFU" in train[0], out
    decode = [line for line in out.splitlines() if line.startswith("decode: batch 1")]
    assert len(decode) == 1 and "100.0% of token ids equal" in decode[0], out


@pytest.mark.slow
def test_bench_train_small():
    out = _run([sys.executable, "scripts/bench_train.py", "--small", "--pairs", "2"])
    assert "| encdec_adapt (JAX) |" in out and "| HF T5Gemma" in out, out
    assert "speed-up (torch / jax step time per round)" in out, out


@pytest.mark.slow
def test_bench_decode_small():
    out = _run(
        [sys.executable, "scripts/bench_decode.py", "--small", "--pairs", "2",
         "--batch_sizes", "2", "--input_len", "16", "--new_tokens", "6"]
    )  # fmt: skip
    assert "| 2 |" in out, out  # the script asserts equal token ids itself


@pytest.mark.slow
def test_profile_train_small():
    """The trace is read back: the step's matmuls show up as timed XLA thunks."""
    out = _run([sys.executable, "scripts/profile_train.py", "--small", "--steps", "1",
                "--instances", "3"])  # fmt: skip
    rows = [line for line in out.splitlines() if line.startswith("| matmul")]
    assert len(rows) == 1 and float(rows[0].split("|")[2]) > 0, out
    assert "jit(_gradients)" in out, out  # instructions named from the HLO
