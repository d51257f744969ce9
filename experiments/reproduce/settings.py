"""The settings of experiments.reproduce: the macros of experiments/configs/reproduce.gin,
overridden as `--gin.KEY=VALUE`, and the command line (`--seeds`, `--aggregate`, `--output`)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "experiments", "configs")
DEFAULT_GIN = os.path.join(CONFIGS, "reproduce.gin")
PRETRAIN_GIN = os.path.join(CONFIGS, "reproduce_pretrain.gin")
UL2_GIN = os.path.join(CONFIGS, "reproduce_ul2.gin")
KD_GIN = os.path.join(CONFIGS, "reproduce_prefixlm_kd.gin")

#: Every setting the script reads, with its type (the macros of reproduce.gin).
SETTINGS = {
    "OUTPUT_DIR": str,
    "SEED": int,
    "SMALL_DECODER": str,
    "WIDE_DECODER": str,
    "PRETRAIN_STEPS": int,
    "PRETRAIN_BATCH": int,
    "PRETRAIN_LENGTH": int,
    "PRETRAIN_LR": float,
    "PRETRAIN_WARMUP_STEPS": int,
    "BALANCED_MODEL": str,
    "UNBALANCED_MODEL": str,
    "ADAPT_STEPS": int,
    "ADAPT_BATCH": int,
    "INPUT_LENGTH": int,
    "TARGET_LENGTH": int,
    "ADAPT_LR": float,
    "WARMUP_STEPS": int,
    "KD_WEIGHT": float,
    "XATTN_WARMUP_STEPS": int,
    "CROSS_ATTENTION_REGEX": str,
    "EVAL_EVERY": int,
    "EVAL_BATCHES": int,
    "FINAL_EVAL_BATCHES": int,
    "PROBE_SPLIT": str,
    "PROBE_PAIRS": int,
    "PROBE_TRAIN_PAIRS": int,
    "PROBE_MAX_LENGTH": int,
}


class SettingsError(ValueError):
    """A bad reproduce.gin setting or override; the message names it."""


@dataclasses.dataclass(frozen=True)
class Command:
    """The parsed command line.

    files, bindings: gin files and binding lines of the settings; seeds: `--seeds` (None: the
    single run of SEED); aggregate: the run directories of `--aggregate` (None: train);
    output: where `--seeds` / `--aggregate` write the seeds table (None: the default).
    """

    files: list[str]
    bindings: list[str]
    seeds: list[int] | None = None
    aggregate: list[str] | None = None
    output: str | None = None


def parse_seeds(text: str) -> list[int]:
    """The value of `--seeds`, e.g. "0,1,2" -> [0, 1, 2]: distinct integers >= 0, in order."""
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            seed = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} in {text!r} is not an integer (expected e.g. --seeds=0,1,2)"
            ) from None
        if seed < 0:
            raise argparse.ArgumentTypeError(f"seed {seed} in {text!r} must be >= 0")
        if seed in seeds:
            raise argparse.ArgumentTypeError(f"seed {seed} is given twice in {text!r}")
        seeds.append(seed)
    return seeds


def parse_args(argv: list[str]) -> Command:
    """The command line; unknown macro names and contradictory modes exit 2 (argparse)."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description="Small-scale reproduction of the T5Gemma findings (see the module doc). "
        "Settings: the macros of experiments/configs/reproduce.gin, overridden as --gin.KEY=VALUE.",
    )
    parser.add_argument("--gin_file", action="append", default=[], help="extra gin file(s)")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        help="comma-separated seeds, e.g. 0,1,2: one whole run per seed in OUTPUT_DIR/seed_N, "
        "then OUTPUT_DIR/seeds.md",
    )
    parser.add_argument(
        "--aggregate",
        nargs="+",
        metavar="DIR",
        help="train nothing: the seeds table of these finished runs' OUTPUT_DIRs",
    )
    parser.add_argument("--output", help="the seeds table's file (--seeds / --aggregate)")
    from encdec_adapt.cli.gin_runner import gin_value

    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin.") :].split("=", 1)
            if key not in SETTINGS:
                close = difflib.get_close_matches(key, list(SETTINGS), n=3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                parser.error(f"--gin.{key}: not a setting of reproduce.gin.{hint}")
            bindings.append(f"{key} = {gin_value(value)}")
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    if args.aggregate is not None and (args.seeds is not None or bindings or args.gin_file):
        parser.error(
            "--aggregate takes no --seeds, --gin.KEY=VALUE or --gin_file: it reads the "
            "settings of each DIR (settings.json)"
        )
    if args.seeds is not None and any(b.startswith("SEED =") for b in bindings):
        parser.error("--seeds sets SEED of each run: drop --gin.SEED")
    if args.output is not None and args.seeds is None and args.aggregate is None:
        parser.error("--output is the seeds table of --seeds or --aggregate")
    return Command([DEFAULT_GIN, *args.gin_file], bindings, args.seeds, args.aggregate, args.output)


def load_settings(files: list[str], bindings: list[str]) -> dict:
    """The settings (macro values) of `files` + `bindings`, type-checked."""
    import gin

    gin.clear_config()
    gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    out = {}
    for name, kind in SETTINGS.items():
        try:
            value = gin.query_parameter(f"%{name}")
        except ValueError as e:
            raise SettingsError(f"{name} is not set in {files} ({e})") from e
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SettingsError(f"{name}={value!r} must be a {kind.__name__}")
        out[name] = value
    gin.clear_config()
    for name in ("PRETRAIN_STEPS", "PRETRAIN_BATCH", "PRETRAIN_LENGTH", "ADAPT_STEPS"):
        if out[name] < 1:
            raise SettingsError(f"{name}={out[name]} must be >= 1")
    for name in ("ADAPT_BATCH", "INPUT_LENGTH", "TARGET_LENGTH", "EVAL_BATCHES"):
        if out[name] < 1:
            raise SettingsError(f"{name}={out[name]} must be >= 1")
    if not 0 <= out["XATTN_WARMUP_STEPS"] < out["ADAPT_STEPS"]:
        raise SettingsError(
            f"XATTN_WARMUP_STEPS={out['XATTN_WARMUP_STEPS']} must be in [0, ADAPT_STEPS="
            f"{out['ADAPT_STEPS']})"
        )
    for steps, warm in (
        ("PRETRAIN_STEPS", "PRETRAIN_WARMUP_STEPS"),
        ("ADAPT_STEPS", "WARMUP_STEPS"),
    ):
        if not 0 <= out[warm] < out[steps]:
            raise SettingsError(f"{warm}={out[warm]} must be in [0, {steps}={out[steps]})")
    return out


def seed_settings(cmd: Command, seed: int, output_dir: str) -> dict:
    """The settings of one seed of `--seeds`: the command's, with SEED = seed and
    OUTPUT_DIR = output_dir/seed_N."""
    own = [f"SEED = {seed}", f"OUTPUT_DIR = {os.path.join(output_dir, f'seed_{seed}')!r}"]
    return load_settings(cmd.files, [*cmd.bindings, *own])


def settings_path(out: str) -> str:
    """OUTPUT_DIR/settings.json: the run's settings, written when it starts."""
    return os.path.join(out, "settings.json")
