"""Every shipped and experiment gin file parses, run files build their configs, and bad gin fails
early with the file and line (or the binding) named."""

import glob
import os
import re
import sys

import gin
import pytest

from encdec_adapt.cli import main
from encdec_adapt.cli.gin_runner import gin_value
from encdec_adapt.nn import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(
    glob.glob(os.path.join(REPO, "encdec_adapt", "configs", "**", "*.gin"), recursive=True)
    + glob.glob(os.path.join(REPO, "experiments", "configs", "*.gin"))
)
MODEL_FILE = os.path.join(REPO, "encdec_adapt", "configs", "models", "gemma_tiny.gin")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_seqio_task


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    gin.add_config_file_search_path(REPO)
    yield
    gin.clear_config()


def test_there_are_run_files():
    runs = [f for f in GIN_FILES if "/configs/runs/" in f]
    expected = {"pretrain.gin", "finetune.gin", "eval.gin", "infer.gin", "synthetic.gin"}
    expected |= {"adapt_prefixlm.gin", "adapt_ul2.gin"}
    expected |= {"contrastive.gin", "classify.gin", "dual_encoder_model.gin"}
    assert expected <= {os.path.basename(f) for f in runs}


# Run files that need an encoder-decoder model file (and the bindings they leave required
# that the configs built below need).
ENCDEC_FILE = os.path.join(REPO, "encdec_adapt", "configs", "models", "t5gemma_tiny.gin")
REAL_ENCDEC_FILE = os.path.join(REPO, "encdec_adapt", "configs", "models", "t5gemma2_270m_270m.gin")
RUN_MODEL = {
    "adapt_prefixlm.gin": (ENCDEC_FILE, ["TEACHER_CONFIG = @gemma_tiny/GemmaConfig()"]),
    "adapt_ul2.gin": (ENCDEC_FILE, []),
    "predict.gin": (ENCDEC_FILE, []),
    "reproduce_ul2.gin": (ENCDEC_FILE, []),
    "reproduce_prefixlm_kd.gin": (ENCDEC_FILE, ["TEACHER_CONFIG = @gemma_tiny/GemmaConfig()"]),
    "infer_jsonl.gin": (ENCDEC_FILE, []),
    # the real quickstart's files take the layout's model file on the command line
    "real_adapt_ul2.gin": (REAL_ENCDEC_FILE, []),
    "real_adapt_prefixlm.gin": (REAL_ENCDEC_FILE, []),
    "real_eval.gin": (REAL_ENCDEC_FILE, []),
}


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_gin_file_parses(path):
    """Model files parse alone; every other file parses on top of a model file."""
    model_file, bindings = RUN_MODEL.get(os.path.basename(path), (MODEL_FILE, []))
    files = [path] if "/configs/models/" in path else [model_file, path]
    config_lib.add_gin_search_path(*files)
    # not finalized: run files leave MODEL_DIR, TRAIN_TASK, ... to the command line
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    # configurables that need no data are built, so their values are type-checked too
    for entry in ("train", "evaluate", "infer"):
        for name in ("model", "optimizer", "checkpoint", "mesh_rules"):
            try:
                ref = gin.query_parameter(f"{entry}.{name}")
            except ValueError:
                continue
            assert ref.scoped_configurable_fn() is not None


def _run(capsys, *argv):
    code = main.main(["train", *argv])
    return code, capsys.readouterr().err


def _write(tmp_path, text):
    path = tmp_path / "bad.gin"
    path.write_text(text)
    return str(path)


def test_unknown_binding_names_file_and_line(tmp_path, capsys):
    bad = _write(tmp_path, "include 'runs/synthetic.gin'\n\nOptimizerConfig.lr = 0.1\n")
    code, err = _run(capsys, f"--gin_file={MODEL_FILE}", f"--gin_file={bad}")
    assert code == 2
    assert "doesn't have a parameter named 'lr'" in err
    assert f'In file "{bad}", line 3' in err


def test_missing_required_value(tmp_path, capsys):
    code, err = _run(capsys, f"--gin_file={MODEL_FILE}", "--gin_file=runs/synthetic.gin")
    assert code == 2
    assert "MODEL_DIR/macro.value set to `%gin.REQUIRED` but not subsequently overridden" in err
    assert not os.path.exists(tmp_path / "run")


def test_wrong_type_in_file_names_file_and_line(tmp_path, capsys):
    bad = _write(tmp_path, "include 'runs/synthetic.gin'\nOptimizerConfig.warmup_steps = 'x'\n")
    code, err = _run(
        capsys, f"--gin_file={MODEL_FILE}", f"--gin_file={bad}", f"--gin.MODEL_DIR={tmp_path}/run"
    )
    assert code == 2
    assert "warmup_steps='x' is not an int" in err
    assert f"set at {bad}:2: OptimizerConfig.warmup_steps = 'x'" in err
    assert not os.path.exists(tmp_path / "run")  # failed before anything was written


def test_wrong_type_on_command_line(tmp_path, capsys):
    code, err = _run(
        capsys,
        f"--gin_file={MODEL_FILE}",
        "--gin_file=runs/synthetic.gin",
        f"--gin.MODEL_DIR={tmp_path}/run",
        "--gin.DecoderOnlyModel.label_smoothing=2",
    )
    assert code == 2
    assert "DecoderOnlyModel.label_smoothing=2 must be a number in [0.0, 1.0)" in err
    assert "set at --gin:" in err


def test_unknown_task_suggests_names(tmp_path, capsys):
    import tiny_seqio_task

    code, err = _run(
        capsys,
        f"--gin_file={MODEL_FILE}",
        "--gin_file=runs/pretrain.gin",
        f"--gin.MODEL_DIR={tmp_path}/run",
        f"--gin.TRAIN_TASK={tiny_seqio_task.TASK[:-1]}",
    )
    assert code == 2
    assert f"unknown seqio task or mixture '{tiny_seqio_task.TASK[:-1]}'" in err
    assert f"closest registered names: {tiny_seqio_task.TASK}" in err


def test_gin_value_quotes_bare_strings():
    assert gin_value("/tmp/x") == "'/tmp/x'"
    assert gin_value("'/tmp/x'") == "'/tmp/x'"
    assert gin_value("1e-3") == "1e-3"
    assert gin_value("@DecoderOnlyModel()") == "@DecoderOnlyModel()"
    assert gin_value("(1, -1, 1)") == "(1, -1, 1)"


def _configurable_modules() -> dict[str, list[str]]:
    """module -> the `@gin.configurable(...)` decorators written in it (read from the source)."""
    import ast

    found = {}
    package = os.path.join(REPO, "encdec_adapt")
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            for dec in getattr(node, "decorator_list", []):
                text = ast.unparse(dec)
                if text.startswith("gin.configurable"):
                    module = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
                    found.setdefault(module, []).append(text)
    return found


def test_configurables_have_stable_names():
    """Every configurable is registered as encdec_adapt.NAME, and configurables.py (the one
    module run files import) imports every module that holds one."""
    import encdec_adapt.configurables as registry

    found = _configurable_modules()
    assert found, "no gin configurables found: the source scan is broken"
    with open(registry.__file__) as f:
        source = f.read()
    for module, decorators in found.items():
        for text in decorators:
            assert "module='encdec_adapt'" in text, f"{module}: {text} has no stable name"
        package, name = module.rsplit(".", 1)
        assert re.search(rf"from {re.escape(package)} import [^\n]*\b{name}\b", source) or (
            re.search(rf"from {re.escape(package)} import \([^)]*\b{name}\b", source)
        ), f"configurables.py does not import {module}"
    for name in ("train", "DataConfig", "GemmaConfig", "DecoderOnlyModel"):
        assert gin.config._REGISTRY.get_match(f"encdec_adapt.{name}") is not None


def test_shipped_gin_files_name_no_module_path():
    """Gin files import only the stable modules, so a run's saved config.gin (which repeats
    their imports) keeps parsing when code moves between modules."""
    stable = {"encdec_adapt.configurables", "encdec_adapt.nn", "encdec_adapt.tasks"}
    stable.add("encdec_adapt.tasks.embedded")
    for path in GIN_FILES:
        with open(path) as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("import encdec_adapt"):
                assert line.split()[1] in stable, f"{path}: {line.strip()}"
            assert "@encdec_adapt." not in line, f"{path}: {line.strip()}"


def test_includes_of_runs_files_work_beside_a_runs_folder(tmp_path, monkeypatch):
    """`python -m` puts the working directory on sys.path, where the quickstarts write runs/:
    gin then finds a namespace package `runs` without a file, and its own existence check
    raised TypeError for every 'runs/...' include (the real quickstart's first train stage)."""
    import importlib

    from encdec_adapt.cli import gin_runner

    (tmp_path / "runs").mkdir()
    user = tmp_path / "user.gin"
    user.write_text("include 'runs/eval.gin'\nMODEL_DIR = '/tmp/x'\nEVAL_TASK = 't'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    gin_runner._make_file_checks_tolerant()
    files = [MODEL_FILE, str(user)]
    config_lib.add_gin_search_path(*files)
    gin.parse_config_files_and_bindings(files, [], finalize_config=False)
    assert gin.query_parameter("MODEL_DIR/macro.value") == "/tmp/x"
