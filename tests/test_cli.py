"""Every `encdec-adapt` command: bad input or configuration exits 2 with one line naming the
culprit, an internal error exits 1 with its traceback, and start-up prints no TensorFlow noise.

The dispatcher (cli/main.py) maps exceptions to exit codes by type; these tests run it in
process (main.main) except for the start-up test, which needs a fresh interpreter.
"""

import importlib
import os
import subprocess
import sys

import gin
import pytest

from encdec_adapt import errors
from encdec_adapt.cli import main
from encdec_adapt.nn.config import CONFIGS_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"--gin_file={CONFIGS_DIR}/models/gemma_tiny.gin"
TINY_ENCDEC = f"--gin_file={CONFIGS_DIR}/models/t5gemma_tiny.gin"
RUN = lambda name: f"--gin_file={CONFIGS_DIR}/runs/{name}.gin"


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _bad_inputs(tmp: str) -> list[tuple[str, list[str], str]]:
    """(command, argv after it, a text the one-line message must contain)."""
    missing = f"{tmp}/missing"
    return [
        # missing files and directories
        ("import-hf", ["--input", missing, "--output", f"{tmp}/o"], missing),
        ("export-hf", ["--input", missing, "--output", f"{tmp}/o"], missing),
        (
            "import-gemma",
            ["--preset", "gemma_tiny", "--input", missing, "--output", f"{tmp}/o"],
            missing,
        ),
        (
            "adapt",
            ["--preset", "t5gemma_tiny", "--encoder", missing, "--output", f"{tmp}/o"],
            missing,
        ),
        ("export-params", ["--model_dir", missing, "--output", f"{tmp}/o"], missing),
        (
            "infer",
            [
                TINY_ENCDEC,
                RUN("infer_jsonl"),
                "--gin.MODEL_DIR=None",
                f"--gin.INPUT_FILE={missing}",
                f"--gin.OUTPUT={tmp}/out.jsonl",
                f"--gin.infer.params_from={tmp}",
            ],
            f"path='{missing}': no such file",
        ),
        (
            "embed",
            [
                TINY,
                RUN("embed"),
                f"--gin.PARAMS_FROM={tmp}",
                f"--gin.INPUT_FILE={missing}",
                f"--gin.OUTPUT_DIR={tmp}/emb",
            ],
            missing,
        ),
        # bad flag values
        ("adapt", ["--preset", "nope", "--encoder", tmp, "--output", f"{tmp}/o"], "'nope'"),
        (
            "import-gemma",
            [
                "--preset",
                "gemma_tiny",
                "--input",
                tmp,
                "--output",
                f"{tmp}/o",
                "--vocab_rows",
                "all",
            ],
            "--vocab_rows",
        ),
        ("export-params", ["--model_dir", tmp, "--output", f"{tmp}/o", "--step", "x"], "--step"),
        ("import-hf", ["--input", tmp], "--output"),
        ("tasks", ["--lengths", "inputs=x"], "--lengths"),
        ("train", [TINY, "--num_processes=two"], "--num_processes"),
        ("eval", ["--gin.MODEL_DIR=/tmp/x"], "--gin_file"),
        # unknown task
        ("tasks", ["--show", "stdlib_ul3"], "'stdlib_ul3'"),
        ("tasks", ["--module", "no_such_module_xyz"], "no_such_module_xyz"),
        # bad gin: unknown binding, invalid value, missing required binding
        ("train", [TINY, RUN("synthetic"), "--gin.OptimizerConfig.lr=0.1"], "'lr'"),
        (
            "infer",
            [
                TINY_ENCDEC,
                RUN("infer_jsonl"),
                "--gin.MODEL_DIR=None",
                "--gin.INPUT_FILE=x",
                "--gin.OUTPUT=y",
                "--gin.DecodeConfig.beam_size=0",
            ],
            "beam_size=0",
        ),
        ("eval", [TINY, RUN("eval"), "--gin.MODEL_DIR=/tmp/x"], "EVAL_TASK"),
        ("embed", [TINY, f"--gin_file={tmp}/empty.gin"], "Required bindings for `embed`"),
        ("train", [TINY, f"--gin_file={tmp}/empty.gin"], "Required bindings for `train`"),
    ]


CASES = _bad_inputs("TMP")


@pytest.mark.parametrize(
    "index", range(len(CASES)), ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)]
)
def test_bad_input_exits_2_with_one_line_naming_the_culprit(index, tmp_path, capsys):
    (tmp_path / "empty.gin").write_text("# nothing bound\nimport encdec_adapt.runtime.embed\n")
    command, argv, culprit = _bad_inputs(str(tmp_path))[index]
    code = main.main([command, *argv])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    first = lines[0]
    assert first.startswith(f"encdec-adapt {command}: "), captured.err
    assert culprit in captured.err, captured.err
    # one line, plus gin's own location lines and the 'set at FILE:LINE' lines of bindings
    extra = [line for line in lines[1:] if not line.startswith(("  set at ", "  In ", "    "))]
    assert not extra, captured.err


@pytest.mark.parametrize("command", list(main.COMMANDS))
def test_internal_error_exits_1_with_a_traceback(command, tmp_path, monkeypatch, capsys):
    spec = main.COMMANDS[command]
    module = importlib.import_module(spec.module)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(module, spec.function, broken)
    argv = []
    if spec.gin:
        empty = tmp_path / "empty.gin"
        empty.write_text("# nothing bound\n")
        argv = [f"--gin_file={empty}"]
    code = main.main([command, *argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: a bug, not bad input" in err


def test_an_error_inside_a_command_is_internal(tmp_path, monkeypatch, capsys):
    from encdec_adapt.cli import convert

    def broken(*args, **kwargs):
        raise KeyError("unexpected")

    monkeypatch.setattr(convert, "import_hf", broken)
    code = main.main(["import-hf", "--input", str(tmp_path), "--output", f"{tmp_path}/o"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "KeyError: 'unexpected'" in err


def test_diverged_training_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    from encdec_adapt.runtime import train

    def diverges():
        raise errors.TrainingDiverged(
            "Loss is nan at step 3: stopping. Last good checkpoint: none."
        )

    monkeypatch.setattr(train, "train", diverges)
    (tmp_path / "empty.gin").write_text("")
    code = main.main(["train", f"--gin_file={tmp_path}/empty.gin"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == "encdec-adapt train: Loss is nan at step 3: stopping. Last good " + (
        "checkpoint: none."
    )


def test_error_types():
    for cls in (errors.ConfigError, errors.InputError, errors.CheckpointError):
        assert issubclass(cls, errors.EncdecError) and issubclass(cls, ValueError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.UnknownTaskError, errors.InputError)
    from encdec_adapt.data import input_pipeline, registry
    from encdec_adapt.storage import params_io

    assert registry.UnknownTaskError is input_pipeline.UnknownTaskError is errors.UnknownTaskError
    assert params_io.CheckpointError is errors.CheckpointError
    e = errors.UnknownTaskError("stdlib_ul3", ["stdlib_ul2", "c4"], ["mix"])
    assert "closest registered names: stdlib_ul2" in str(e) and "2 tasks and 1 mixtures" in str(e)


NOISE = ("oneDNN", "cuda drivers", "absl::InitializeLog", "cpu_feature_guard")


def test_start_up_prints_no_tensorflow_noise():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    p = subprocess.run(
        [sys.executable, "-m", "encdec_adapt", "tasks"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "tasks (" in p.stdout
    noise = [line for line in p.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, p.stderr
