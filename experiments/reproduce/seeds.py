"""Several seeds: the seeds table of finished single-seed runs (`--seeds`, `--aggregate`)."""

from __future__ import annotations

import dataclasses
import os
import sys

from experiments.reproduce.arms import make_arms, result_path
from experiments.reproduce.settings import SETTINGS, settings_path
from experiments.stages import read_json

#: Settings that may differ between the runs of one seeds table.
PER_RUN_SETTINGS = ("SEED", "OUTPUT_DIR")
#: The arm every other arm is compared with, within each seed.
BASELINE_ARM = "adapted_ul2"
#: Probe metrics of the seeds table: (result.json key, title); shown when every arm has it.
PROBE_METRICS = (
    ("ndcg@10", "nDCG@10"),
    ("pair_accuracy", "pair accuracy"),
    ("linear_probe_accuracy", "linear probe"),
)


class AggregateError(ValueError):
    """Runs that cannot share a seeds table; the message names the directory and the setting."""


@dataclasses.dataclass(frozen=True)
class SeedRun:
    """The machine-readable results of one finished single-seed run (one OUTPUT_DIR).

    path: the directory, as given; settings: its settings.json; arms: arm name -> the arm's
    arms/NAME/result.json, in make_arms order; pretrained: "small" / "wide" -> its
    pretrain/WHICH/result.json (missing ones left out).
    """

    path: str
    settings: dict
    arms: dict[str, dict]
    pretrained: dict[str, dict]

    @property
    def seed(self) -> int:
        return self.settings["SEED"]

    def wall_s(self) -> float | None:
        """Wall time of the training stages in seconds: both pretraining runs and every arm's
        training run, compilation included (adapt, final evaluation and probes excluded; an
        interrupted and resumed run counts every invocation). None without both pretraining
        results."""
        if set(self.pretrained) != {"small", "wide"}:
            return None
        stages = [*self.pretrained.values(), *self.arms.values()]
        return float(sum(r["wall_s"] for r in stages))


def load_seed_run(path: str) -> SeedRun:
    """The results of the finished reproduction in `path` (its OUTPUT_DIR); AggregateError
    when it has none, misses an arm, or holds results of other budgets than settings.json."""
    if not os.path.isdir(path):
        raise AggregateError(f"{path}: no such directory")
    settings = read_json(settings_path(path))
    if settings is None:
        raise AggregateError(
            f"{path}: no results of experiments.reproduce here (no settings.json, "
            "no arms/NAME/result.json)"
        )
    unset = [k for k in SETTINGS if k not in settings]
    if unset:
        raise AggregateError(f"{settings_path(path)}: {', '.join(unset)} not set")
    names = [a.name for a in make_arms(settings)]
    found = {n: read_json(result_path(path, "arms", n)) for n in names}
    found = {n: r for n, r in found.items() if r is not None}
    if not found:
        raise AggregateError(
            f"{path}: no results (no arms/NAME/result.json): no arm of this run has finished"
        )
    missing = [n for n in names if n not in found]
    if missing:
        raise AggregateError(
            f"{path}: no result for arm(s) {', '.join(missing)} (arms/NAME/result.json): "
            "the run has not finished"
        )
    for name, result in found.items():
        if result.get("steps") != settings["ADAPT_STEPS"]:
            raise AggregateError(
                f"{result_path(path, 'arms', name)}: steps={result.get('steps')} but "
                f"settings.json has ADAPT_STEPS={settings['ADAPT_STEPS']}: a result of "
                "another budget (delete the arm's directory to redo it)"
            )
    pretrained = {}
    for which in ("small", "wide"):
        result = read_json(result_path(path, "pretrain", which))
        if result is not None:
            pretrained[which] = result
    return SeedRun(path, settings, found, pretrained)


def check_same_budgets(runs: list[SeedRun]) -> None:
    """AggregateError unless all runs have distinct seeds and the first run's settings, apart
    from PER_RUN_SETTINGS; the message names the run and every differing setting."""
    first, by_seed = runs[0], {}
    for run in runs:
        if run.seed in by_seed:
            raise AggregateError(
                f"{run.path}: SEED={run.seed}, as {by_seed[run.seed]}: the runs of a seeds "
                "table need distinct seeds"
            )
        by_seed[run.seed] = run.path
        differing = [
            f"{k}={run.settings.get(k)!r} (but {k}={first.settings.get(k)!r} in {first.path})"
            for k in sorted(set(first.settings) | set(run.settings))
            if k not in PER_RUN_SETTINGS and run.settings.get(k) != first.settings.get(k)
        ]
        if differing:
            raise AggregateError(
                f"{run.path}: {'; '.join(differing)}. Only "
                f"{' and '.join(PER_RUN_SETTINGS)} may differ between the runs of a seeds table"
            )


def per_seed(runs: list[SeedRun], key: str) -> dict[str, list[float]]:
    """Arm name -> result[key] in each run (runs' order), e.g. key "val_ul2": nats/token."""
    return {name: [float(run.arms[name][key]) for run in runs] for name in runs[0].arms}


def differences(runs: list[SeedRun], key: str) -> dict[str, list[float]]:
    """Arm name -> result[key] minus BASELINE_ARM's result[key] within each run (runs' order;
    the baseline itself left out). Same unit as the key (nats/token for the losses)."""
    values = per_seed(runs, key)
    base = values[BASELINE_ARM]
    return {
        name: [v - b for v, b in zip(vs, base)]
        for name, vs in values.items()
        if name != BASELINE_ARM
    }


def _slash(values: list[float], fmt: str = ".3f") -> str:
    return " / ".join(format(v, fmt) for v in values)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _question_tags(result: dict) -> str:
    """ "(a)", "(d)", "(a)(b)": the questions an arm answers."""
    return "".join(f"({q})" for q in result["questions"].split())


def _per_seed_table(runs: list[SeedRun], columns: list[tuple[str, str]], fmt: str) -> list[str]:
    """Markdown rows: per arm, for each (key, title) column the value of every seed and the
    mean."""
    seeds = " / ".join(str(r.seed) for r in runs)
    head = "| arm | " + " | ".join(f"{title}, seeds {seeds} | mean" for _, title in columns)
    lines = [head + " |", "|---|" + "---|---:|" * len(columns)]
    tables = [per_seed(runs, key) for key, _ in columns]
    for name in runs[0].arms:
        cells = [f"{_slash(t[name], fmt)} | {_mean(t[name]):{fmt}}" for t in tables]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _difference_table(runs: list[SeedRun]) -> list[str]:
    """Markdown rows: per arm, the UL2 (PrefixLM) validation-loss difference to BASELINE_ARM
    in each seed, their mean and min / max, in nats per target token."""
    ul2, plm = differences(runs, "val_ul2"), differences(runs, "val_prefix_lm")
    seeds = [f"seed {r.seed}" for r in runs]
    lines = [
        "| arm | " + " | ".join(seeds) + " | mean | min / max |",
        "|---|" + "---:|" * (len(runs) + 2),
    ]
    for name in ul2:
        u, p = ul2[name], plm[name]
        cells = [f"{a:+.3f} ({b:+.3f})" for a, b in zip(u, p)]
        cells.append(f"{_mean(u):+.3f} ({_mean(p):+.3f})")
        cells.append(f"{min(u):+.3f} / {max(u):+.3f} ({min(p):+.3f} / {max(p):+.3f})")
        tags = _question_tags(runs[0].arms[name])
        lines.append(f"| {name} {tags} | " + " | ".join(cells) + " |")
    return lines


def seeds_markdown(runs: list[SeedRun]) -> str:
    """The seeds table of runs that passed check_same_budgets, as markdown."""
    s = runs[0].settings
    lines = [
        "# Seeds of experiments.reproduce",
        "",
        "Each seed is a whole replicate: both decoder-only stand-ins are pretrained again, and "
        "the arms draw other initialisations, dropout and data order. Budgets, the same in "
        f"every run: pretraining {s['PRETRAIN_STEPS']} steps x batch {s['PRETRAIN_BATCH']} x "
        f"{s['PRETRAIN_LENGTH']} tokens; every arm {s['ADAPT_STEPS']} steps x batch "
        f"{s['ADAPT_BATCH']} x (inputs {s['INPUT_LENGTH']}, targets {s['TARGET_LENGTH']}) "
        f"token slots, learning rate {s['ADAPT_LR']}. Tables made by `python -m "
        "experiments.reproduce --aggregate` from each run's settings.json and "
        "arms/NAME/result.json.",
        "",
        "| seed | run | wall time (s) |",
        "|---:|---|---:|",
    ]
    for run in runs:
        wall = run.wall_s()
        lines.append(f"| {run.seed} | {run.path} | {'n/a' if wall is None else f'{wall:.0f}'} |")
    lines += [
        "",
        "Wall time: the pretraining runs and the arms' training runs, summed (compilation "
        "included; adapt, final evaluation and probes excluded).",
        "",
        "Final validation loss, nats per target token, on the same "
        f"{s['FINAL_EVAL_BATCHES']} validation batches of each objective:",
        "",
        *_per_seed_table(runs, [("val_ul2", "val UL2"), ("val_prefix_lm", "val PrefixLM")], ".3f"),
        "",
        f"Difference to {BASELINE_ARM} (the balanced, bidirectional, UL2 arm) within each "
        "seed, UL2 validation (PrefixLM validation in brackets), nats per target token; "
        f"negative is better than {BASELINE_ARM}:",
        "",
        *_difference_table(runs),
    ]
    probes = [
        (key, title)
        for key, title in PROBE_METRICS
        if all(key in r for run in runs for r in run.arms.values())
    ]
    if probes:
        lines += [
            "",
            f"Frozen-encoder probes on stdlib_code_search ({s['PROBE_SPLIT']} split; higher "
            "is better; see results.md):",
            "",
            *_per_seed_table(runs, probes, ".3f"),
        ]
    return "\n".join(lines) + "\n"


def aggregate(paths: list[str]) -> str:
    """The seeds table (markdown) of the finished runs in `paths`, in seed order;
    AggregateError when a run has no results or the runs' budgets differ."""
    runs = [load_seed_run(p) for p in paths]
    check_same_budgets(runs)
    return seeds_markdown(sorted(runs, key=lambda r: r.seed))


def write_seeds_table(paths: list[str], output: str | None) -> int:
    """Prints (and writes to `output`) the seeds table of `paths`; the exit status."""
    try:
        text = aggregate(paths)
    except AggregateError as e:
        print(f"reproduce: cannot aggregate: {e}", file=sys.stderr)
        return 2
    print(text)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(text)
        print(f"seeds table: {output}")
    return 0
