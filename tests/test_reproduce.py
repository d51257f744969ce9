"""experiments.reproduce: settings, the report, the seeds table (--seeds / --aggregate), and
(slow) an end-to-end run with resume."""

import os

import pytest

import experiments.reproduce


@pytest.fixture(scope="module")
def reproduce():
    return experiments.reproduce


def test_default_settings_parse_and_type_check(reproduce):
    cmd = reproduce.parse_args(["--gin.ADAPT_STEPS=70", "--gin.SEED=3"])
    assert cmd.seeds is None and cmd.aggregate is None
    s = reproduce.load_settings(cmd.files, cmd.bindings)
    assert set(s) == set(reproduce.SETTINGS)
    assert s["ADAPT_STEPS"] == 70 and s["SEED"] == 3
    assert all(isinstance(s[k], t) for k, t in reproduce.SETTINGS.items())
    # Every question has arms, and every arm answers a question.
    arms = reproduce.make_arms(s)
    asked = {q for a in arms for q in a.questions.split()}
    assert asked == set(reproduce.QUESTIONS)
    for _, names in reproduce.QUESTIONS.values():
        assert set(names) <= {a.name for a in arms}


def _settings(reproduce, argv):
    cmd = reproduce.parse_args(argv)
    return reproduce.load_settings(cmd.files, cmd.bindings)


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
    s = _settings(reproduce, [])
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


# ------------------------------------------------------------------ seeds: --seeds, --aggregate


@pytest.mark.parametrize(("value", "seeds"), [("0,1,2", [0, 1, 2]), ("7", [7]), (" 3, 1", [3, 1])])
def test_seeds_argument_parses(reproduce, value, seeds):
    assert reproduce.parse_args([f"--seeds={value}"]).seeds == seeds


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds=0,x"], "'x' in '0,x' is not an integer"),
        (["--seeds=0,,1"], "'' in '0,,1' is not an integer"),
        (["--seeds="], "is not an integer (expected e.g. --seeds=0,1,2)"),
        (["--seeds=1,-2"], "seed -2 in '1,-2' must be >= 0"),
        (["--seeds=1,2,1"], "seed 1 is given twice"),
        (["--seeds=0,1", "--gin.SEED=3"], "--seeds sets SEED of each run: drop --gin.SEED"),
        (["--aggregate", "a", "--gin.ADAPT_STEPS=5"], "--aggregate takes no --seeds"),
        (["--aggregate", "a", "--seeds=0,1"], "--aggregate takes no --seeds"),
        (["--output", "x.md"], "--output is the seeds table of --seeds or --aggregate"),
    ],
)
def test_bad_seeds_arguments_exit_2_with_a_message(reproduce, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        reproduce.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def _losses(seed):
    """Made-up final validation losses (UL2, PrefixLM) of every arm, different in each seed."""
    return {
        "scratch_ul2": (5.75 + 0.01 * seed, 6.25 - 0.02 * seed),
        "adapted_ul2": (5.0 + 0.03 * seed, 5.25 + 0.01 * seed),
        "causal_encoder_ul2": (4.97 + 0.031 * seed, 5.2 + 0.013 * seed),
        "adapted_prefixlm_kd": (5.9 + 0.1 * seed, 5.05 - 0.003 * seed),
        "unbalanced_ul2": (5.06 + 0.012 * seed, 5.18 + 0.004 * seed),
        "unbalanced_warmup_ul2": (5.04 + 0.025 * seed, 5.17 + 0.02 * seed),
    }


def _fake_run(reproduce, out, seed, losses=None, overrides=(), arms=None):
    """A finished run's directory as experiments.reproduce leaves it (settings.json,
    pretrain/WHICH/result.json, arms/NAME/result.json), made without training; returns its
    settings. `arms`: the arms written (default: all)."""
    s = _settings(reproduce, [f"--gin.SEED={seed}", f"--gin.OUTPUT_DIR={out}", *overrides])
    losses = losses or _losses(seed)
    os.makedirs(out, exist_ok=True)
    reproduce.write_json(reproduce.settings_path(out), s)
    for i, which in enumerate(("small", "wide")):
        path = reproduce.result_path(out, "pretrain", which)
        os.makedirs(os.path.dirname(path))
        reproduce.write_json(
            path, {"which": which, "steps": s["PRETRAIN_STEPS"], "wall_s": 100.0 + i}
        )
    for i, arm in enumerate(reproduce.make_arms(s)):
        if arms is not None and arm.name not in arms:
            continue
        ul2, prefix_lm = losses[arm.name]
        result = reproduce.arm_record(
            arm,
            s,
            wall_s=10.0 + seed + i,
            val_ul2=ul2,
            val_prefix_lm=prefix_lm,
            **{
                "ndcg@10": 0.01 * (i + 1) + 0.001 * seed,
                "pair_accuracy": 0.5,
                "linear_probe_accuracy": 0.25 + 0.1 * seed,
            },
        )
        path = reproduce.result_path(out, "arms", arm.name)
        os.makedirs(os.path.dirname(path))
        reproduce.write_json(path, result)
    return s


def _row(table_text, first_cell):
    """The cells of the markdown row starting with `first_cell`."""
    for line in table_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row {first_cell!r} in:\n{table_text}")


def _section(text, start, end=None):
    body = text.split(start, 1)[1]
    return body.split(end, 1)[0] if end else body


def test_aggregate_tables_hold_the_per_seed_values_means_and_differences(reproduce, tmp_path):
    seeds = [4, 0, 1]  # given out of order: the table is in seed order
    dirs = [str(tmp_path / f"run{seed}") for seed in seeds]
    for seed, d in zip(seeds, dirs):
        _fake_run(reproduce, d, seed)
    output = tmp_path / "docs" / "seeds.md"
    assert reproduce.main(["--aggregate", *dirs, "--output", str(output)]) == 0
    text = output.read_text()
    s = _settings(reproduce, [])
    assert f"pretraining {s['PRETRAIN_STEPS']} steps x batch {s['PRETRAIN_BATCH']}" in text
    assert f"every arm {s['ADAPT_STEPS']} steps x batch {s['ADAPT_BATCH']}" in text
    ordered = sorted(seeds)
    # Header: one row per seed; wall time = both pretraining runs + the six arms.
    for seed, d in zip(seeds, dirs):
        wall = 100.0 + 101.0 + sum(10.0 + seed + i for i in range(6))
        assert _row(text, str(seed)) == [d, f"{wall:.0f}"]
    # Per-seed losses and their means.
    losses = {seed: _losses(seed) for seed in ordered}
    values = _section(text, "Final validation loss", "Difference to")
    assert "val UL2, seeds 0 / 1 / 4" in values
    for arm in losses[0]:
        ul2 = [losses[seed][arm][0] for seed in ordered]
        plm = [losses[seed][arm][1] for seed in ordered]
        assert _row(values, arm) == [
            " / ".join(f"{v:.3f}" for v in ul2),
            f"{sum(ul2) / 3:.3f}",
            " / ".join(f"{v:.3f}" for v in plm),
            f"{sum(plm) / 3:.3f}",
        ]
    # Within-seed differences to adapted_ul2, their mean and min / max.
    diffs = _section(text, "Difference to", "Frozen-encoder probes")
    assert _row(diffs, "arm") == ["seed 0", "seed 1", "seed 4", "mean", "min / max"]
    assert "| adapted_ul2" not in diffs
    tags = {"scratch_ul2": "(a)", "causal_encoder_ul2": "(b)", "adapted_prefixlm_kd": "(c)"}
    for arm in losses[0]:
        if arm == "adapted_ul2":
            continue
        du = [losses[k][arm][0] - losses[k]["adapted_ul2"][0] for k in ordered]
        dp = [losses[k][arm][1] - losses[k]["adapted_ul2"][1] for k in ordered]
        cells = _row(diffs, f"{arm} {tags.get(arm, '(d)')}")
        assert cells[:3] == [f"{u:+.3f} ({p:+.3f})" for u, p in zip(du, dp)]
        assert cells[3] == f"{sum(du) / 3:+.3f} ({sum(dp) / 3:+.3f})"
        assert cells[4] == f"{min(du):+.3f} / {max(du):+.3f} ({min(dp):+.3f} / {max(dp):+.3f})"
    # The causal encoder's difference grows with the seed here (-0.030, -0.029, -0.026).
    assert _row(diffs, "causal_encoder_ul2 (b)")[:3] == [
        "-0.030 (-0.050)",
        "-0.029 (-0.047)",
        "-0.026 (-0.038)",
    ]
    # Probes: nDCG@10 of the third arm (causal_encoder_ul2) = 0.03 + 0.001 * seed.
    probes = _section(text, "Frozen-encoder probes")
    assert _row(probes, "causal_encoder_ul2")[:2] == ["0.030 / 0.031 / 0.034", "0.032"]
    assert _row(probes, "causal_encoder_ul2")[4:] == ["0.250 / 0.350 / 0.650", "0.417"]


def test_aggregate_refuses_runs_with_different_budgets(reproduce, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(reproduce, a, 0)
    _fake_run(reproduce, b, 1, overrides=["--gin.ADAPT_BATCH=4", "--gin.KD_WEIGHT=0.25"])
    assert reproduce.main(["--aggregate", a, b, "--output", str(tmp_path / "x.md")]) == 2
    err = capsys.readouterr().err
    assert f"reproduce: cannot aggregate: {b}: ADAPT_BATCH=4 (but ADAPT_BATCH=8 in {a})" in err
    assert "KD_WEIGHT=0.25 (but KD_WEIGHT=0.5" in err
    assert "Only SEED and OUTPUT_DIR may differ" in err
    assert not (tmp_path / "x.md").exists()


def test_aggregate_refuses_two_runs_of_one_seed(reproduce, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(reproduce, a, 3)
    _fake_run(reproduce, b, 3)
    assert reproduce.main(["--aggregate", a, b]) == 2
    assert f"{b}: SEED=3, as {a}: the runs of a seeds table need distinct seeds" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("missing", "{d}: no such directory"),
        ("empty", "{d}: no results of experiments.reproduce here (no settings.json"),
        ("settings_only", "{d}: no results (no arms/NAME/result.json)"),
        ("two_arms", "{d}: no result for arm(s) causal_encoder_ul2, adapted_prefixlm_kd, "),
        (
            "other_steps",
            "{d}/arms/scratch_ul2/result.json: steps=150 but settings.json has ADAPT_STEPS=99",
        ),
    ],
)
def test_aggregate_refuses_a_run_without_results(reproduce, tmp_path, capsys, make, message):
    good = str(tmp_path / "good")
    _fake_run(reproduce, good, 0)
    d = str(tmp_path / "bad")
    if make == "empty":
        os.makedirs(d)
    elif make == "settings_only":
        _fake_run(reproduce, d, 1, arms=[])
    elif make == "two_arms":
        _fake_run(reproduce, d, 1, arms=["scratch_ul2", "adapted_ul2"])
    elif make == "other_steps":  # settings.json rewritten by a run with another budget
        _fake_run(reproduce, d, 1)
        s = _settings(reproduce, ["--gin.SEED=1", "--gin.ADAPT_STEPS=99"])
        reproduce.write_json(reproduce.settings_path(d), s)
    assert reproduce.main(["--aggregate", good, d]) == 2
    assert "reproduce: cannot aggregate: " + message.format(d=d) in capsys.readouterr().err


def test_seeds_mode_runs_every_seed_in_its_own_dir_then_writes_the_table(
    reproduce, tmp_path, monkeypatch, capsys
):
    ran = []

    def fake_run_one(repro):  # stands in for the training: writes a finished run's results
        ran.append((repro.s["SEED"], repro.s["OUTPUT_DIR"], repro.s["ADAPT_STEPS"]))
        _fake_run(
            reproduce, repro.s["OUTPUT_DIR"], repro.s["SEED"], overrides=["--gin.ADAPT_STEPS=40"]
        )

    monkeypatch.setattr(reproduce, "run_one", fake_run_one)
    out = str(tmp_path / "repro")
    assert reproduce.main(["--seeds=2,0", f"--gin.OUTPUT_DIR={out}", "--gin.ADAPT_STEPS=40"]) == 0
    assert ran == [(2, f"{out}/seed_2", 40), (0, f"{out}/seed_0", 40)]
    text = (tmp_path / "repro" / "seeds.md").read_text()
    assert "val UL2, seeds 0 / 2 |" in text and "every arm 40 steps" in text
    assert _row(text, "2")[0] == f"{out}/seed_2"
    assert text in capsys.readouterr().out


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
    for arm in reproduce.make_arms(_settings(reproduce, TINY)):
        assert f"| {arm.name} |" in text
    assert "nan |" not in text.split("Shared cost")[0]  # every arm has losses and probes
    assert (out / "curves.png").stat().st_size > 0 and (out / "train_curves.png").stat().st_size
    capsys.readouterr()
    # A second run reuses every finished stage and writes the same table.
    assert reproduce.main(argv) == 0
    log = capsys.readouterr().out
    assert "pretrain small: finished" in log and "arm unbalanced_warmup_ul2: finished" in log
    assert (out / "results.md").read_text() == text
