"""A non-editable install works from any directory: the wheel carries the shipped gin configs
and the vocabulary, `load_preset` and `--gin_file=models/...` resolve inside the package."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, a folder outside the checkout holding the non-editable install)."""
    src = tmp_path_factory.mktemp("src")
    # Build from a copy, so the build leaves nothing in the checkout.
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src)
    shutil.copytree(
        os.path.join(REPO, "encdec_adapt"),
        src / "encdec_adapt",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # --no-build-isolation: setuptools and wheel come from this environment, nothing is fetched.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], check=True
    )
    (wheel,) = dist.glob("encdec_adapt-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    return wheel, target


def _run(target, cwd, *args):
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_wheel_contains_the_configs(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, "/")
        for root, _, files in os.walk(os.path.join(REPO, "encdec_adapt", "configs"))
        for f in files
        if f.endswith(".gin")
    }
    assert len(shipped) > 20
    assert shipped <= names, sorted(shipped - names)
    assert "encdec_adapt/data/assets/stdlib_spm_4000.model" in names


@pytest.mark.slow
def test_installed_package_runs_outside_the_checkout(installed, tmp_path):
    _, target = installed
    where = _run(target, tmp_path, "-c", "import encdec_adapt; print(encdec_adapt.__file__)")
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr

    preset = _run(
        target,
        tmp_path,
        "-c",
        "from encdec_adapt import load_preset; print(load_preset('gemma2_2b').num_layers)",
    )
    assert preset.stdout.strip() == "26", preset.stderr

    tasks = _run(target, tmp_path, "-m", "encdec_adapt", "tasks")
    assert tasks.returncode == 0, tasks.stderr
    assert "stdlib_lm" in tasks.stdout

    run = tmp_path / "run"
    train = _run(
        target,
        tmp_path,
        "-m",
        "encdec_adapt",
        "train",
        "--gin_file=models/gemma_tiny.gin",
        "--gin_file=runs/synthetic.gin",
        f"--gin.MODEL_DIR={run}",
        "--gin.TRAIN_STEPS=2",
        "--gin.CheckpointConfig.save_interval_steps=2",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run / "config.gin").exists()
    assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
