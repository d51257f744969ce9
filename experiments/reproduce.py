"""Small-scale reproduction of the T5Gemma findings on the embedded corpus, at equal compute.

    python -m experiments.reproduce                          # default budget (~25 min, 2 cores)
    python -m experiments.reproduce --gin.ADAPT_STEPS=2000 --gin.OUTPUT_DIR=runs/reproduce_2k

Budgets, seeds and presets are the macros of experiments/configs/reproduce.gin (`--gin.KEY=VALUE`
overrides one; `--gin_file` adds files). Every stage is an ordinary `encdec-adapt` run:

  1. pretrain  two decoder-only "released models" on `stdlib_lm`: gemma_tiny and the wider
               gemma_tiny_wide (experiments/configs/reproduce_pretrain.gin), then export params;
  2. adapt     `encdec-adapt adapt`: t5gemma_tiny from gemma_tiny (balanced, cross-attention
               copied from self-attention), t5gemma_tiny_unbalanced from gemma_tiny_wide
               (encoder) + gemma_tiny (decoder, random cross-attention);
  3. arms      `encdec-adapt train` of each arm (reproduce_ul2.gin / reproduce_prefixlm_kd.gin):
                 scratch_ul2          t5gemma_tiny from random init, UL2            (a)
                 adapted_ul2          t5gemma_tiny adapted, UL2                     (a)(b)(c)(d)
                 causal_encoder_ul2   adapted, encoder made causal, UL2             (b)
                 adapted_prefixlm_kd  adapted, PrefixLM + KD from gemma_tiny        (c)
                 unbalanced_ul2       t5gemma_tiny_unbalanced adapted, UL2          (d)
                 unbalanced_warmup_ul2  same, cross-attention alone first           (d)
  4. evaluate  every arm on the same UL2 and PrefixLM validation batches, and probe its frozen
               encoder on code search (experiments.probe: mean pooling, no fine-tuning);
  5. report    OUTPUT_DIR/results.md (tables) and curves.png / train_curves.png.

Equal compute: every arm runs ADAPT_STEPS optimizer steps of ADAPT_BATCH rows of
(INPUT_LENGTH, TARGET_LENGTH) token slots; the FLOPs column is the model's training FLOPs per
target slot times the slots (a bigger encoder or the KD teacher's forward pass costs more per
step, and says so). Pretraining is the "released model" cost, reported in its own table.

Resuming: a finished stage leaves a marker (params checkpoint or result.json) and is skipped;
an interrupted training run resumes from its newest checkpoint (exactly, as any
`encdec-adapt train`). Delete OUTPUT_DIR/arms/NAME to redo one arm.

Several seeds (whole replicates: pretraining, adaptation and arms again with another SEED):

    python -m experiments.reproduce --seeds=0,1,2 --gin.OUTPUT_DIR=runs/reproduce
    python -m experiments.reproduce --aggregate runs/reproduce_seed1 runs/reproduce_seed2 \
        --output seeds.md

`--seeds` runs one ordinary single-seed reproduction per seed in OUTPUT_DIR/seed_N (each
resumes on its own), then writes OUTPUT_DIR/seeds.md (or `--output`). `--aggregate DIR...`
trains nothing: it reads each finished run's settings.json and arms/NAME/result.json and prints
(and with `--output` writes) the same tables: validation losses per seed and their mean, the
difference of every arm to adapted_ul2 within each seed (mean, min, max), and the probes. Runs
whose settings differ in anything but SEED and OUTPUT_DIR are refused (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GIN = os.path.join(REPO, "experiments", "configs", "reproduce.gin")
PRETRAIN_GIN = "experiments/configs/reproduce_pretrain.gin"
UL2_GIN = "experiments/configs/reproduce_ul2.gin"
KD_GIN = "experiments/configs/reproduce_prefixlm_kd.gin"

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


# ------------------------------------------------------------------------------- settings


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
        prog="experiments/reproduce.py",
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


# ------------------------------------------------------------------------------------ arms


@dataclasses.dataclass(frozen=True)
class Arm:
    """One adaptation run.

    init: "scratch" (random), "balanced" or "unbalanced" (the `adapt` checkpoint);
    objective: "UL2" or "PrefixLM+KD"; causal_encoder: the encoder's attention made causal;
    xattn_warmup: cross-attention trained alone for XATTN_WARMUP_STEPS steps first.
    """

    name: str
    questions: str
    init: str
    objective: str = "UL2"
    causal_encoder: bool = False
    xattn_warmup: bool = False
    note: str = ""


def make_arms(s: dict) -> list[Arm]:
    return [
        Arm("scratch_ul2", "a", "scratch", note="random init"),
        Arm("adapted_ul2", "a b c d", "balanced"),
        Arm("causal_encoder_ul2", "b", "balanced", causal_encoder=True, note="causal encoder"),
        Arm("adapted_prefixlm_kd", "c", "balanced", "PrefixLM+KD"),
        Arm("unbalanced_ul2", "d", "unbalanced", note="no warm-up"),
        Arm(
            "unbalanced_warmup_ul2",
            "d",
            "unbalanced",
            xattn_warmup=True,
            note=f"cross-attention alone for {s['XATTN_WARMUP_STEPS']} steps",
        ),
    ]


# ------------------------------------------------------------------------------- running


@contextlib.contextmanager
def logged(path: str):
    """Sends stdout and stderr (progress bars, gin dumps) to `path`, keeping the console short."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


def run_train(model_dir: str, gin_files: list[str], bindings: list[str], log: str) -> float:
    """`encdec-adapt train` in this process (resumes from model_dir's checkpoints); returns
    the wall time of this invocation in seconds."""
    import gin

    from encdec_adapt.cli import main

    argv = [f"--gin_file={f}" for f in gin_files]
    argv += [f"--gin.MODEL_DIR={model_dir}", *(f"--gin.{b}" for b in bindings)]
    gin.clear_config()
    t0 = time.perf_counter()
    with logged(log):
        print("encdec-adapt train " + " ".join(argv), flush=True)
        code = main.main(["train", *argv])
    gin.clear_config()
    if code != 0:
        raise RuntimeError(f"encdec-adapt train {' '.join(argv)} exited with {code}; see {log}")
    return time.perf_counter() - t0


def export_params(model_dir: str, output: str, model_type: str, cfg, subtree: str | None = None):
    """The newest training checkpoint's parameters (under `subtree`, e.g. the KD student) ->
    a params checkpoint (what `adapt`, warm starts, evaluation and the probe read)."""
    import jax

    from encdec_adapt.models import warm_start as adapt
    from encdec_adapt.runtime import checkpoints
    from encdec_adapt.storage import params_io

    shapes = adapt.encdec_shapes(cfg) if model_type == "encoder_decoder" else None
    if shapes is None:
        shapes = adapt.decoder_only_shapes(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    if subtree:
        target = {subtree: target}
    ckpt = checkpoints.Checkpointer(model_dir, checkpoints.CheckpointConfig(async_save=False))
    try:
        params = ckpt.restore_params(target)
    finally:
        ckpt.close()
    if subtree:
        params = params[subtree]
    params_io.save(output, params, model_type, cfg.to_dict(), overwrite=True)


def read_metrics(model_dir: str) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]} records of metrics.jsonl, one per step (a resumed run
    logs some steps twice: the last record wins), sorted by step."""
    by_split: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    path = os.path.join(model_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                by_split.setdefault(r["split"], {})[r["step"]] = r
    return {k: [v[s] for s in sorted(v)] for k, v in by_split.items()}


def train_summary(model_dir: str) -> dict:
    """Target tokens and summed step time (compile excluded) over the logged training steps
    (log_every = 1: every step), the final train loss, and the validation curve."""
    m = read_metrics(model_dir)
    train = m["train"]
    return {
        "tokens": int(sum(r.get("tokens", 0) for r in train)),
        "step_time_s": float(sum(r.get("step_time_s", 0.0) for r in train)),
        "final_train_loss": train[-1]["loss"] if train else float("nan"),
        "curve": [(r["step"], r["loss"]) for r in m["eval"]],
        "train_curve": [(r["step"], r["loss"]) for r in train],
    }


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)  # a marker is whole or absent


def settings_path(out: str) -> str:
    """OUTPUT_DIR/settings.json: the run's settings, written when it starts."""
    return os.path.join(out, "settings.json")


def result_path(out: str, stage: str, name: str) -> str:
    """OUTPUT_DIR/STAGE/NAME/result.json, the marker and the numbers of a finished stage:
    STAGE "pretrain" (NAME "small" / "wide") or "arms" (NAME an arm's name)."""
    return os.path.join(out, stage, name, "result.json")


def arm_record(arm: Arm, s: dict, **measured) -> dict:
    """The arms/NAME/result.json of `arm`: its identity and step budget, then `measured`
    (params, tokens, FLOPs, wall_s / step_time_s in seconds, losses in nats per target token,
    the probe metrics)."""
    return {
        "name": arm.name,
        "questions": arm.questions,
        "init": arm.init,
        "objective": arm.objective,
        "note": arm.note,
        "steps": s["ADAPT_STEPS"],
        **measured,
    }


class Reproduction:
    """The stages of one reproduction in OUTPUT_DIR; each is skipped when already done."""

    def __init__(self, s: dict, echo=print):
        from encdec_adapt.nn import config

        self.s = s
        self.out = s["OUTPUT_DIR"]
        if not os.path.isabs(self.out):
            self.out = os.path.join(os.getcwd(), self.out)
        self.echo = echo
        self.logs = os.path.join(self.out, "logs")
        self.bal_file = self._repo_path(s["BALANCED_MODEL"])
        self.unbal_file = self._repo_path(s["UNBALANCED_MODEL"])
        self.bal_cfg = config.load_encdec_preset(self.bal_file)
        self.unbal_cfg = config.load_encdec_preset(self.unbal_file)
        self.decoders = {
            "small": (s["SMALL_DECODER"], self.bal_file, self.bal_cfg.decoder),
            "wide": (s["WIDE_DECODER"], self.unbal_file, self.unbal_cfg.encoder),
        }

    @staticmethod
    def _repo_path(path: str) -> str:
        if os.path.isabs(path) or os.path.exists(path):
            return os.path.abspath(path)
        full = os.path.join(REPO, path)
        if not os.path.exists(full):
            raise SettingsError(f"model file {path!r} not found (relative to . or {REPO})")
        return full

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    # -- stage 1: decoder-only pretraining ----------------------------------------------------

    def pretrain(self, which: str) -> dict:
        """Pretrains one decoder ("small" / "wide"); returns its result (params path, cost)."""
        from encdec_adapt.models.generative import DecoderOnlyModel

        s = self.s
        scope, model_file, cfg = self.decoders[which]
        done = read_json(result_path(self.out, "pretrain", which))
        if done is not None:
            self.echo(f"pretrain {which}: done ({done['params']})")
            return done
        model_dir = self.path("pretrain", which, "run")
        bindings = [
            f"MODEL_CONFIG = @{scope}/GemmaConfig()",
            f"TRAIN_STEPS = {s['PRETRAIN_STEPS']}",
            f"BATCH_SIZE = {s['PRETRAIN_BATCH']}",
            f"TARGET_LENGTH = {s['PRETRAIN_LENGTH']}",
            f"LEARNING_RATE = {s['PRETRAIN_LR']}",
            f"WARMUP_STEPS = {s['PRETRAIN_WARMUP_STEPS']}",
            f"train.seed = {s['SEED']}",
            f"train/DataConfig.seed = {s['SEED']}",
        ]
        self.echo(f"pretrain {which} ({scope}): {s['PRETRAIN_STEPS']} steps ...")
        wall = run_train(
            model_dir, [model_file, PRETRAIN_GIN], bindings, self._log(f"pretrain_{which}")
        )
        params = self.path("pretrain", which, "params")
        export_params(model_dir, params, "decoder_only", cfg)
        summary = train_summary(model_dir)
        slots = s["PRETRAIN_STEPS"] * s["PRETRAIN_BATCH"] * s["PRETRAIN_LENGTH"]
        flops = DecoderOnlyModel(config=cfg).flops_per_token({"targets": s["PRETRAIN_LENGTH"]})
        result = {
            "which": which,
            "preset": scope,
            "params": params,
            "num_params": _num_params(cfg, "decoder_only"),
            "steps": s["PRETRAIN_STEPS"],
            "tokens": summary["tokens"],
            "flops": flops * slots,
            "wall_s": wall,
            "step_time_s": summary["step_time_s"],
            "final_train_loss": summary["final_train_loss"],
        }
        write_json(result_path(self.out, "pretrain", which), result)
        return result

    # -- stage 2: warm-start checkpoints ------------------------------------------------------

    def adapt(self, kind: str, small: dict, wide: dict) -> str:
        """`encdec-adapt adapt` for "balanced" / "unbalanced"; returns the checkpoint path."""
        from encdec_adapt.cli import main

        out = self.path("adapted", kind)
        if os.path.exists(os.path.join(out, "model.json")):
            self.echo(f"adapt {kind}: done ({out})")
            return out
        if kind == "balanced":
            argv = ["--preset", self.bal_file, "--encoder", small["params"]]
        else:
            argv = ["--preset", self.unbal_file, "--encoder", wide["params"]]
            argv += ["--decoder", small["params"], "--seed", str(self.s["SEED"])]
        with logged(self._log(f"adapt_{kind}")):
            code = main.main(["adapt", *argv, "--output", out, "--overwrite"])
        if code != 0:
            raise RuntimeError(f"encdec-adapt adapt {' '.join(argv)} failed; see the log")
        self.echo(f"adapt {kind}: {out}")
        return out

    # -- stage 3/4: adaptation arms, evaluation, probe ---------------------------------------

    def arm_config(self, arm: Arm):
        """The arm's EncoderDecoderConfig (what its model.json and the probe use)."""
        cfg = self.unbal_cfg if arm.init == "unbalanced" else self.bal_cfg
        return cfg.replace(encoder_causal=True) if arm.causal_encoder else cfg

    def arm_bindings(self, arm: Arm, adapted: dict[str, str], teacher: str) -> list[str]:
        """The `--gin.` bindings of the arm's `encdec-adapt train` run."""
        s = self.s
        bindings = [
            f"TRAIN_STEPS = {s['ADAPT_STEPS']}",
            f"BATCH_SIZE = {s['ADAPT_BATCH']}",
            f"INPUT_LENGTH = {s['INPUT_LENGTH']}",
            f"TARGET_LENGTH = {s['TARGET_LENGTH']}",
            f"LEARNING_RATE = {s['ADAPT_LR']}",
            f"WARMUP_STEPS = {s['WARMUP_STEPS']}",
            f"EVAL_EVERY = {s['EVAL_EVERY']}",
            f"EVAL_BATCHES = {s['EVAL_BATCHES']}",
            f"train.seed = {s['SEED']}",
            f"train/DataConfig.seed = {s['SEED']}",
        ]
        if arm.init != "scratch":
            bindings.append(f"train.warm_start_from = {adapted[arm.init]!r}")
        if arm.causal_encoder:
            bindings.append("EncoderDecoderConfig.encoder_causal = True")
        if arm.xattn_warmup:
            bindings += [
                f"OptimizerConfig.train_only = ({s['CROSS_ATTENTION_REGEX']!r},)",
                f"OptimizerConfig.unfreeze_at_step = {s['XATTN_WARMUP_STEPS']}",
            ]
        if arm.objective == "PrefixLM+KD":
            bindings += [
                f"TEACHER_CONFIG = @{s['SMALL_DECODER']}/GemmaConfig()",
                f"TEACHER_CHECKPOINT = {teacher!r}",
                f"KD_WEIGHT = {s['KD_WEIGHT']}",
            ]
        return bindings

    def run_arm(self, arm: Arm, adapted: dict[str, str], teacher: str) -> dict:
        s = self.s
        done = read_json(result_path(self.out, "arms", arm.name))
        if done is not None:
            self.echo(f"arm {arm.name}: done")
            return done
        cfg = self.arm_config(arm)
        model_dir = self.path("arms", arm.name, "run")
        bindings = self.arm_bindings(arm, adapted, teacher)
        model_file = self.unbal_file if arm.init == "unbalanced" else self.bal_file
        run_file = KD_GIN if arm.objective == "PrefixLM+KD" else UL2_GIN
        self.echo(f"arm {arm.name}: {s['ADAPT_STEPS']} steps ...")
        wall = run_train(model_dir, [model_file, run_file], bindings, self._log(arm.name))
        params = self.path("arms", arm.name, "params")
        subtree = "student" if arm.objective == "PrefixLM+KD" else None
        export_params(model_dir, params, "encoder_decoder", cfg, subtree)
        summary = train_summary(model_dir)
        with logged(self._log(arm.name)):
            evals = self.final_eval(cfg, params)
            probe = self.probe(cfg, params)
        curve = summary["curve"]
        result = arm_record(
            arm,
            s,
            num_params=_num_params(cfg, "encoder_decoder"),
            tokens=summary["tokens"],
            flops=self.arm_flops(arm, cfg),
            wall_s=wall,
            step_time_s=summary["step_time_s"],
            final_train_loss=summary["final_train_loss"],
            final_val_loss=curve[-1][1] if curve else float("nan"),
            best_val_loss=min(v for _, v in curve) if curve else float("nan"),
            curve=curve,
            train_curve=summary["train_curve"],
            **evals,
            **probe,
        )
        write_json(result_path(self.out, "arms", arm.name), result)
        self.echo(
            f"arm {arm.name}: val UL2 {evals['val_ul2']:.4f}, val PrefixLM "
            f"{evals['val_prefix_lm']:.4f}, nDCG@10 {probe.get('ndcg@10', float('nan')):.4f}"
        )
        return result

    def arm_flops(self, arm: Arm, cfg) -> float:
        from encdec_adapt.models.generative import (
            DecoderOnlyModel,
            DistillationModel,
            EncoderDecoderModel,
        )

        s = self.s
        lengths = {"inputs": s["INPUT_LENGTH"], "targets": s["TARGET_LENGTH"]}
        model = EncoderDecoderModel(config=cfg)
        if arm.objective == "PrefixLM+KD":
            teacher = DecoderOnlyModel(config=self.decoders["small"][2])
            model = DistillationModel(student=model, teacher=teacher)
        slots = s["ADAPT_STEPS"] * s["ADAPT_BATCH"] * s["TARGET_LENGTH"]
        return model.flops_per_token(lengths) * slots

    def final_eval(self, cfg, params: str) -> dict[str, float]:
        """Validation loss of the arm's final parameters on the same UL2 and PrefixLM batches
        (the loss evaluation of `encdec-adapt eval`, without the task's metric functions)."""
        from encdec_adapt.data.input_pipeline import DataConfig
        from encdec_adapt.evaluation import evaluator as evaluation
        from encdec_adapt.models.generative import EncoderDecoderModel
        from encdec_adapt.parallel import sharding
        from encdec_adapt.runtime import optim
        from encdec_adapt.runtime.trainer import Trainer
        from encdec_adapt.storage import params_io

        s = self.s
        rules = sharding.MeshRules()
        trainer = Trainer(
            EncoderDecoderModel(config=cfg), optim.OptimizerConfig(), rules.make_mesh(), rules
        )
        loaded = params_io.load(params, trainer.abstract_state().params)
        out = {}
        for key, task in (("val_ul2", "stdlib_ul2"), ("val_prefix_lm", "stdlib_prefix_lm")):
            data = DataConfig(
                task=task,
                split="validation",
                batch_size=s["ADAPT_BATCH"],
                task_feature_lengths={"inputs": s["INPUT_LENGTH"], "targets": s["TARGET_LENGTH"]},
                feature_converter="encdec",
                pack=True,
                shuffle=False,
                repeat=False,
                seed=s["SEED"],
            )
            metrics = evaluation.loss_metrics(trainer, loaded, data, s["FINAL_EVAL_BATCHES"])
            out[key] = metrics["loss"]
        return out

    def probe(self, cfg, params: str) -> dict[str, float]:
        """Code-search probes of the frozen encoder (experiments.probe)."""
        from flax import nnx

        from encdec_adapt.data import registry
        from encdec_adapt.nn.encdec import EncoderDecoder
        from encdec_adapt.storage import params_io
        from experiments import probe

        s = self.s
        model = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
        params_io.load_into(model, params)
        encode = nnx.jit(lambda m, tokens: m.encode(tokens).hidden)
        pairs = probe.code_search_pairs(s["PROBE_SPLIT"], s["PROBE_PAIRS"] or None)
        train_pairs = None
        if s["PROBE_TRAIN_PAIRS"]:
            train_pairs = probe.code_search_pairs("train", s["PROBE_TRAIN_PAIRS"])
        return probe.probe_encoder(
            lambda tokens: encode(model, tokens),
            registry.vocabulary(),
            pairs,
            train_pairs=train_pairs,
            max_length=s["PROBE_MAX_LENGTH"],
        )

    def _log(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")

    # -- everything ---------------------------------------------------------------------------

    def run(self) -> tuple[list[dict], list[dict]]:
        import encdec_adapt.tasks.embedded  # noqa: F401  (registers the stdlib tasks)

        os.makedirs(self.out, exist_ok=True)
        write_json(settings_path(self.out), self.s)
        small = self.pretrain("small")
        wide = self.pretrain("wide")
        adapted = {
            "balanced": self.adapt("balanced", small, wide),
            "unbalanced": self.adapt("unbalanced", small, wide),
        }
        arms = [self.run_arm(a, adapted, small["params"]) for a in make_arms(self.s)]
        return [small, wide], arms


def _num_params(cfg, model_type: str) -> int:
    import jax
    import numpy as np

    from encdec_adapt.models import warm_start as adapt

    shapes = adapt.encdec_shapes(cfg) if model_type == "encoder_decoder" else None
    if shapes is None:
        shapes = adapt.decoder_only_shapes(cfg)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


# ---------------------------------------------------------------------------------- report

QUESTIONS = {
    "a": ("(a) adapted vs from scratch", ["adapted_ul2", "scratch_ul2"]),
    "b": ("(b) bidirectional vs causal encoder", ["adapted_ul2", "causal_encoder_ul2"]),
    "c": ("(c) UL2 vs PrefixLM + KD", ["adapted_ul2", "adapted_prefixlm_kd"]),
    "d": (
        "(d) balanced vs unbalanced",
        ["adapted_ul2", "unbalanced_ul2", "unbalanced_warmup_ul2"],
    ),
}


def _fmt(x, digits=4) -> str:
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{digits}f}"
    return str(x)


def markdown(s: dict, pretrained: list[dict], arms: list[dict]) -> str:
    """The results tables as markdown."""
    lines = [
        "# T5Gemma findings at small scale (experiments/reproduce.py)",
        "",
        f"Seed {s['SEED']}. Equal compute: every arm runs {s['ADAPT_STEPS']} steps x batch "
        f"{s['ADAPT_BATCH']} x (inputs {s['INPUT_LENGTH']}, targets {s['TARGET_LENGTH']}) token "
        f"slots, AdamW, cosine learning rate {s['ADAPT_LR']} (warm-up {s['WARMUP_STEPS']}); "
        "'tokens' counts the real (non-padding) target tokens the arm trained on (UL2 batches "
        "are packed, PrefixLM + KD batches are not). FLOPs: training FLOPs per target slot x "
        "slots (the KD teacher's forward pass and a wider encoder cost more per step). Time: "
        "summed step times, compilation excluded, on a machine shared with other jobs.",
        "",
        "Validation losses are per-token cross-entropy (nats) of the final parameters on the "
        f"same {s['FINAL_EVAL_BATCHES']} validation batches of UL2 and of PrefixLM; 'best / "
        f"final (own)' is the curve on the arm's own objective, every {s['EVAL_EVERY']} steps. "
        f"Probe: frozen encoder, mean pooling, stdlib_code_search {s['PROBE_SPLIT']} split: "
        "retrieval nDCG@10 (docstring -> function among all functions, cosine, no training), "
        "pair accuracy (own function above a same-module hard negative, no training), and a "
        f"logistic-regression probe on pair features fitted on {s['PROBE_TRAIN_PAIRS']} "
        "train pairs.",
        "",
        "| arm | questions | init | objective | params | steps | tokens | FLOPs | time (s) "
        "| val UL2 | val PrefixLM | best / final (own) | nDCG@10 | pair acc | linear probe |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        init = a["init"] + (f" ({a['note']})" if a.get("note") else "")
        lines.append(
            f"| {a['name']} | {a['questions']} | {init} | {a['objective']} | "
            f"{a['num_params']:,} | {a['steps']} | {a['tokens']:,} | {a['flops']:.3g} | "
            f"{a['step_time_s']:.0f} | {_fmt(a['val_ul2'])} | {_fmt(a['val_prefix_lm'])} | "
            f"{_fmt(a['best_val_loss'])} / {_fmt(a['final_val_loss'])} | "
            f"{_fmt(a.get('ndcg@10', float('nan')))} | "
            f"{_fmt(a.get('pair_accuracy', float('nan')))} | "
            f"{_fmt(a.get('linear_probe_accuracy', float('nan')))} |"
        )
    lines += [
        "",
        'Shared cost, the "released" decoder-only models (next-token prediction on stdlib_lm, '
        f"{s['PRETRAIN_STEPS']} steps x batch {s['PRETRAIN_BATCH']} x {s['PRETRAIN_LENGTH']} "
        f"tokens, learning rate {s['PRETRAIN_LR']}):",
        "",
        "| decoder | params | steps | tokens | FLOPs | time (s) | final train loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pretrained:
        lines.append(
            f"| {p['preset']} | {p['num_params']:,} | {p['steps']} | {p['tokens']:,} | "
            f"{p['flops']:.3g} | {p['step_time_s']:.0f} | {_fmt(p['final_train_loss'])} |"
        )
    by_name = {a["name"]: a for a in arms}
    lines += [
        "",
        "Comparisons (validation loss on UL2, lower is better; nDCG@10 higher is better):",
        "",
    ]
    for title, names in QUESTIONS.values():
        parts = [
            f"{n} {_fmt(by_name[n]['val_ul2'])} / "
            f"nDCG {_fmt(by_name[n].get('ndcg@10', float('nan')), 3)}"
            for n in names
            if n in by_name
        ]
        lines.append(f"- {title}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def plot(arms: list[dict], path_val: str, path_train: str) -> None:
    """Validation curves per question (2 x 2 panels) and training-loss curves of every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {a["name"]: a for a in arms}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, names) in zip(axes.flat, QUESTIONS.values()):
        for n in names:
            if n in by_name and by_name[n]["curve"]:
                steps, losses = zip(*by_name[n]["curve"])
                ax.plot(steps, losses, marker="o", markersize=3, label=n)
        ax.set_title(title)
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("validation loss (own objective)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_val, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for a in arms:
        if a["train_curve"]:
            steps, losses = zip(*a["train_curve"])
            ax.plot(steps, losses, label=a["name"], linewidth=1)
    ax.set_xlabel("adaptation step")
    ax.set_ylabel("training loss (cross-entropy of the targets)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_train, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- several seeds

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
        training run, compilation included (adapt, final evaluation and probes excluded; a
        resumed stage counts its last invocation). None without both pretraining results."""
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
            f"{path}: no results of experiments/reproduce.py here (no settings.json, "
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
        "# Seeds of experiments/reproduce.py",
        "",
        "Each seed is a whole replicate: both decoder-only stand-ins are pretrained again, and "
        "the arms draw other initialisations, dropout and data order. Budgets, the same in "
        f"every run: pretraining {s['PRETRAIN_STEPS']} steps x batch {s['PRETRAIN_BATCH']} x "
        f"{s['PRETRAIN_LENGTH']} tokens; every arm {s['ADAPT_STEPS']} steps x batch "
        f"{s['ADAPT_BATCH']} x (inputs {s['INPUT_LENGTH']}, targets {s['TARGET_LENGTH']}) "
        f"token slots, learning rate {s['ADAPT_LR']}. Tables made by `python scripts/"
        "reproduce.py --aggregate` from each run's settings.json and arms/NAME/result.json.",
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


# ------------------------------------------------------------------------------------ main


def seed_settings(cmd: Command, seed: int, output_dir: str) -> dict:
    """The settings of one seed of `--seeds`: the command's, with SEED = seed and
    OUTPUT_DIR = output_dir/seed_N."""
    own = [f"SEED = {seed}", f"OUTPUT_DIR = {os.path.join(output_dir, f'seed_{seed}')!r}"]
    return load_settings(cmd.files, [*cmd.bindings, *own])


def run_one(repro: Reproduction) -> None:
    """One whole reproduction (finished stages skipped), then results.md and the plots."""
    t0 = time.perf_counter()
    pretrained, arms = repro.run()
    table = markdown(repro.s, pretrained, arms)
    with open(repro.path("results.md"), "w") as f:
        f.write(table)
    plot(arms, repro.path("curves.png"), repro.path("train_curves.png"))
    print(table)
    print(
        f"results: {repro.path('results.md')}; plots: {repro.path('curves.png')}, "
        f"{repro.path('train_curves.png')}; logs: {repro.logs} ({time.perf_counter() - t0:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    cmd = parse_args(sys.argv[1:] if argv is None else argv)
    if cmd.aggregate is not None:
        return write_seeds_table(cmd.aggregate, cmd.output)
    try:
        settings = load_settings(cmd.files, cmd.bindings)
        if cmd.seeds is None:
            runs = [settings]
        else:
            runs = [seed_settings(cmd, seed, settings["OUTPUT_DIR"]) for seed in cmd.seeds]
        repros = [Reproduction(s) for s in runs]
    except (SettingsError, FileNotFoundError, ValueError) as e:
        print(f"reproduce: bad settings: {e}", file=sys.stderr)
        return 2
    for repro in repros:
        if cmd.seeds is not None:
            print(f"seed {repro.s['SEED']}: {repro.s['OUTPUT_DIR']}", flush=True)
        run_one(repro)
    if cmd.seeds is None:
        return 0
    output = cmd.output or os.path.join(settings["OUTPUT_DIR"], "seeds.md")
    return write_seeds_table([r.s["OUTPUT_DIR"] for r in repros], output)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
