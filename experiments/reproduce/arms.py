"""The stages of one reproduction: pretraining the decoder-only stand-ins, `adapt`, and the
arms (training, final evaluation, frozen-encoder probes), each run by experiments.stages (a
finished stage is skipped, an interrupted training run resumes from its newest checkpoint)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

from encdec_adapt.runtime.metrics_log import read_metrics
from experiments.reproduce.settings import (
    KD_GIN,
    PRETRAIN_GIN,
    REPO,
    UL2_GIN,
    SettingsError,
    settings_path,
)
from experiments.stages import StageError, Stages, StageTimes, write_json


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
        raise StageError(f"encdec-adapt train {' '.join(argv)} exited with {code}; see {log}")
    return time.perf_counter() - t0


def newest_step(model_dir: str) -> int | None:
    from encdec_adapt.runtime import export_params

    return export_params.newest_step(model_dir)


def export_params(model_dir: str, output: str) -> None:
    """The newest training checkpoint's parameters (a distillation run's student) -> a params
    checkpoint (what `adapt`, warm starts, evaluation and the probe read): the library's
    `encdec-adapt export-params`."""
    from encdec_adapt.runtime import export_params

    export_params.export_params(model_dir, output, overwrite=True)


def train_summary(model_dir: str) -> dict:
    """Target tokens and summed step time (compile excluded) over the logged training steps
    (log_every = 1: every step), the final train loss, and the validation curve."""
    train = read_metrics(model_dir, "train")
    evals = read_metrics(model_dir, "eval")
    return {
        "tokens": int(sum(r.get("tokens", 0) for r in train)),
        "step_time_s": float(sum(r.get("step_time_s", 0.0) for r in train)),
        "final_train_loss": train[-1]["loss"] if train else float("nan"),
        "curve": [(r["step"], r["loss"]) for r in evals],
        "train_curve": [(r["step"], r["loss"]) for r in train],
    }


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
    """The stages of one reproduction in OUTPUT_DIR (experiments.stages): a stage is skipped
    when its result.json (or checkpoint) exists, a training run resumes from its newest
    checkpoint, and training wall times add up over invocations (OUTPUT_DIR/stage_times.json).
    """

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
        self.times = StageTimes(self.path("stage_times.json"))
        self.stages = Stages(echo, self.times)

    @staticmethod
    def _repo_path(path: str) -> str:
        """A model file: relative to ., the repository, or the configs shipped in the package
        (`models/NAME.gin`)."""
        from encdec_adapt.nn.config import CONFIGS_DIR

        if os.path.isabs(path) or os.path.exists(path):
            return os.path.abspath(path)
        for root in (REPO, CONFIGS_DIR):
            full = os.path.join(root, path)
            if os.path.exists(full):
                return full
        raise SettingsError(
            f"model file {path!r} not found (relative to ., {REPO} or {CONFIGS_DIR})"
        )

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def train(
        self, name: str, model_dir: str, steps: int, files: list[str], bindings: list[str]
    ) -> float:
        """Stage `name (train)`: `encdec-adapt train` until its newest checkpoint is `steps`
        (resuming an interrupted run); its wall seconds summed over invocations."""
        stage = f"{name} (train)"
        log = self._log(name.replace(" ", "_").removeprefix("arm_"))
        self.stages.run(
            stage,
            lambda: run_train(model_dir, files, bindings, log),
            finished=lambda: (newest_step(model_dir) or 0) >= steps,
            done=f" ({steps} steps in {model_dir})",
        )
        return self.times.get().get(stage, 0.0)

    # -- stage 1: decoder-only pretraining ----------------------------------------------------

    def pretrain(self, which: str) -> dict:
        """Stage `pretrain WHICH`: pretrains one decoder ("small" / "wide") and exports its
        params; returns its result (params path, cost)."""
        return self.stages.run(
            f"pretrain {which}",
            lambda: self._pretrain(which),
            result=result_path(self.out, "pretrain", which),
        )

    def _pretrain(self, which: str) -> dict:
        from encdec_adapt.models.generative import DecoderOnlyModel

        s = self.s
        scope, model_file, cfg = self.decoders[which]
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
        wall = self.train(
            f"pretrain {which}",
            model_dir,
            s["PRETRAIN_STEPS"],
            [model_file, PRETRAIN_GIN],
            bindings,
        )
        params = self.path("pretrain", which, "params")
        export_params(model_dir, params)
        summary = train_summary(model_dir)
        slots = s["PRETRAIN_STEPS"] * s["PRETRAIN_BATCH"] * s["PRETRAIN_LENGTH"]
        flops = DecoderOnlyModel(config=cfg).flops_per_token({"targets": s["PRETRAIN_LENGTH"]})
        return {
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

    # -- stage 2: warm-start checkpoints ------------------------------------------------------

    def adapt(self, kind: str, small: dict, wide: dict) -> str:
        """Stage `adapt KIND`: `encdec-adapt adapt` for "balanced" / "unbalanced"; returns the
        checkpoint path."""
        from encdec_adapt.cli import main

        out = self.path("adapted", kind)
        if kind == "balanced":
            argv = ["--preset", self.bal_file, "--encoder", small["params"]]
        else:
            argv = ["--preset", self.unbal_file, "--encoder", wide["params"]]
            argv += ["--decoder", small["params"], "--seed", str(self.s["SEED"])]

        def work() -> None:
            with logged(self._log(f"adapt_{kind}")):
                code = main.main(["adapt", *argv, "--output", out, "--overwrite"])
            if code != 0:
                raise StageError(f"encdec-adapt adapt {' '.join(argv)} failed; see the log")
            self.echo(f"adapt {kind}: {out}")

        self.stages.run(
            f"adapt {kind}",
            work,
            finished=lambda: os.path.exists(os.path.join(out, "model.json")),
            done=f" ({out})",
        )
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
        """Stage `arm NAME`: trains the arm, exports its params, evaluates and probes them;
        returns its result (arms/NAME/result.json)."""
        return self.stages.run(
            f"arm {arm.name}",
            lambda: self._run_arm(arm, adapted, teacher),
            result=result_path(self.out, "arms", arm.name),
        )

    def _run_arm(self, arm: Arm, adapted: dict[str, str], teacher: str) -> dict:
        s = self.s
        cfg = self.arm_config(arm)
        model_dir = self.path("arms", arm.name, "run")
        bindings = self.arm_bindings(arm, adapted, teacher)
        model_file = self.unbal_file if arm.init == "unbalanced" else self.bal_file
        run_file = KD_GIN if arm.objective == "PrefixLM+KD" else UL2_GIN
        self.echo(f"arm {arm.name}: {s['ADAPT_STEPS']} steps ...")
        wall = self.train(
            f"arm {arm.name}", model_dir, s["ADAPT_STEPS"], [model_file, run_file], bindings
        )
        params = self.path("arms", arm.name, "params")
        export_params(model_dir, params)  # a PrefixLM + KD run: its student
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
        """Validation loss of the arm's final parameters on the same UL2 and PrefixLM batches:
        `encdec-adapt eval` (runtime.infer.evaluate) without the task's metric functions."""
        from encdec_adapt.data.input_pipeline import DataConfig
        from encdec_adapt.models.generative import EncoderDecoderModel
        from encdec_adapt.runtime import infer

        s = self.s
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
            metrics = infer.evaluate(
                model=EncoderDecoderModel(config=cfg),
                eval_data=data,
                params_from=params,
                eval_batches=s["FINAL_EVAL_BATCHES"],
                task_metric_fns=False,
            )
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
