"""scripts/reproduce.py: settings, the report, and (slow) an end-to-end run with resume."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce", os.path.join(REPO, "scripts", "reproduce.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce", None)


def test_default_settings_parse_and_type_check(reproduce):
    files, bindings = reproduce.parse_args(["--gin.ADAPT_STEPS=70", "--gin.SEED=3"])
    s = reproduce.load_settings(files, bindings)
    assert set(s) == set(reproduce.SETTINGS)
    assert s["ADAPT_STEPS"] == 70 and s["SEED"] == 3
    assert all(isinstance(s[k], t) for k, t in reproduce.SETTINGS.items())
    # Every question has arms, and every arm answers a question.
    arms = reproduce.make_arms(s)
    asked = {q for a in arms for q in a.questions.split()}
    assert asked == set(reproduce.QUESTIONS)
    for _, names in reproduce.QUESTIONS.values():
        assert set(names) <= {a.name for a in arms}


def test_unknown_setting_names_the_closest(reproduce, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.parse_args(["--gin.ADAPT_STEP=7"])
    assert e.value.code == 2
    assert "--gin.ADAPT_STEP: not a setting" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("binding", "message"),
    [
        ("--gin.XATTN_WARMUP_STEPS=500", "XATTN_WARMUP_STEPS=500 must be in"),
        ("--gin.ADAPT_STEPS=0", "ADAPT_STEPS=0 must be >= 1"),
        ("--gin.ADAPT_LR='fast'", "ADAPT_LR='fast' must be a float"),
    ],
)
def test_bad_settings_exit_2_naming_the_setting(reproduce, capsys, binding, message):
    assert reproduce.main([binding]) == 2
    assert message in capsys.readouterr().err


def _arm(name, val_ul2, ndcg):
    return {
        "name": name,
        "questions": "a",
        "init": "balanced",
        "objective": "UL2",
        "num_params": 1000,
        "steps": 5,
        "tokens": 640,
        "flops": 1e9,
        "step_time_s": 1.0,
        "val_ul2": val_ul2,
        "val_prefix_lm": val_ul2 + 1,
        "best_val_loss": val_ul2,
        "final_val_loss": val_ul2,
        "ndcg@10": ndcg,
        "curve": [(0, 9.0), (5, val_ul2)],
        "train_curve": [(1, 9.0), (5, val_ul2)],
    }


def test_markdown_report_has_every_arm_and_comparison(reproduce, tmp_path):
    s = reproduce.load_settings(*reproduce.parse_args([]))
    arms = [_arm("adapted_ul2", 3.25, 0.5), _arm("scratch_ul2", 4.5, 0.25)]
    pretrained = [
        {
            "preset": "gemma_tiny",
            "num_params": 10,
            "steps": 2,
            "tokens": 20,
            "flops": 1e6,
            "step_time_s": 0.5,
            "final_train_loss": 6.0,
        }
    ]
    text = reproduce.markdown(s, pretrained, arms)
    assert f"Seed {s['SEED']}" in text and f"{s['ADAPT_STEPS']} steps" in text
    assert "| adapted_ul2 | a | balanced | UL2 | 1,000 | 5 | 640 |" in text
    assert "- (a) adapted vs from scratch: adapted_ul2 3.2500 / nDCG 0.500; scratch_ul2 4.5000" in (
        text
    )
    assert "| gemma_tiny | 10 | 2 | 20 |" in text
    reproduce.plot(arms, str(tmp_path / "v.png"), str(tmp_path / "t.png"))
    assert (tmp_path / "v.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


TINY = [
    "--gin.PRETRAIN_STEPS=2",
    "--gin.PRETRAIN_BATCH=2",
    "--gin.PRETRAIN_LENGTH=32",
    "--gin.PRETRAIN_WARMUP_STEPS=1",
    "--gin.ADAPT_STEPS=2",
    "--gin.ADAPT_BATCH=2",
    "--gin.INPUT_LENGTH=32",
    "--gin.TARGET_LENGTH=16",
    "--gin.WARMUP_STEPS=1",
    "--gin.XATTN_WARMUP_STEPS=1",
    "--gin.EVAL_EVERY=1",
    "--gin.EVAL_BATCHES=1",
    "--gin.FINAL_EVAL_BATCHES=1",
    "--gin.PROBE_PAIRS=8",
    "--gin.PROBE_TRAIN_PAIRS=8",
    "--gin.PROBE_MAX_LENGTH=32",
]


@pytest.mark.slow
def test_end_to_end_at_a_tiny_budget_then_resume(reproduce, tmp_path, capsys):
    out = tmp_path / "repro"
    argv = [*TINY, f"--gin.OUTPUT_DIR={out}"]
    assert reproduce.main(argv) == 0
    text = (out / "results.md").read_text()
    for arm in reproduce.make_arms(reproduce.load_settings(*reproduce.parse_args(TINY))):
        assert f"| {arm.name} |" in text
    assert "nan |" not in text.split("Shared cost")[0]  # every arm has losses and probes
    assert (out / "curves.png").stat().st_size > 0 and (out / "train_curves.png").stat().st_size
    capsys.readouterr()
    # A second run reuses every finished stage and writes the same table.
    assert reproduce.main(argv) == 0
    log = capsys.readouterr().out
    assert "pretrain small: done" in log and "arm unbalanced_warmup_ul2: done" in log
    assert (out / "results.md").read_text() == text
