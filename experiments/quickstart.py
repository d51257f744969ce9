"""The quickstart: the whole adaptation job at toy scale, stage by stage, resumable.

    bash scripts/quickstart.sh                    # = python -m experiments.quickstart
    QUICKSTART_SCALE=0.02 bash scripts/quickstart.sh   # a few steps per stage (tests)

Stages (each one `encdec-adapt` command line that a user can also run alone; the gin files are
experiments/configs/quickstart_*.gin):
  1. corpus       build the embedded corpus and show a `stdlib_lm` example (`tasks --show`)
  2. pretrain     a tiny Gemma-2-style decoder-only LM on the embedded prose (`train`): the
                  stand-in for a released Gemma checkpoint
  3. adapt        its newest checkpoint -> a params checkpoint (`export-params`), then a
                  balanced T5Gemma pair warm-started from it (`adapt`)
  4. adapt_ul2 / adapt_prefixlm
                  adaptation training with UL2, and with PrefixLM + KD from the decoder (`train`,
                  warm start from stage 3), each exported to a params checkpoint
  5. dual_encoder contrastive towers from the decoder (`train`), and the code-search retrieval
                  report: trained vs untrained towers vs BM25 (`embed`)
  6. evaluate     validation loss / accuracy (`eval`), a few greedy decodes (`infer`), PNG plots
                  of the training curves, and the summary table (summary.md)

Everything runs in this process, through `encdec_adapt.cli.main.main` (what the `encdec-adapt`
command calls), so JAX and TensorFlow start once. Resuming (experiments.stages): a stage's
outputs are checked for completeness, not presence: a training stage is finished when its newest
checkpoint is its last step (otherwise `train` resumes from the newest checkpoint, "Resuming from
step N"); params checkpoints and results are written under temporary names and renamed at the
end, so they exist only when complete. Interrupt at any point (Ctrl-C, kill -9) and run again.

Environment: QUICKSTART_DIR (default runs/quickstart), QUICKSTART_SCALE (default 1: multiplies
every stage's steps; below 0.1 the batches also shrink to 4 rows and evaluation to 2 batches).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time

from encdec_adapt.runtime.metrics_log import read_metrics
from experiments.plots import write_plots
from experiments.stages import StageError, Stages, StageTimes, read_json, write_json

STAGES = ("corpus", "pretrain", "adapt", "adapt_ul2", "adapt_prefixlm", "dual_encoder", "evaluate")
EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Validation tasks of the encoder-decoders: PrefixLM (generation) and span corruption (denoising).
EVAL_TASKS = {"prefix_lm": "stdlib_prefix_lm", "span_corruption": "stdlib_span_corruption"}


# Modules with gin configurables that an entry point imports only when called (after gin has
# locked the config, which in a long-lived process refuses new configurables).
LAZY_CONFIGURABLES = ("encdec_adapt.data.jsonl_inputs",)


class QuickstartError(StageError):
    """A stage's command failed; the message names the stage and the command line."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Steps and batch sizes of the training stages (scale 1: about 8 minutes on 2 idle CPU cores,
    14 when shared with other jobs; a gemma_tiny step of 8 x 256 tokens takes about 0.4 s).

    `scaled(s)` multiplies the steps by s (at least `min_steps`); test scales (< 0.1) also use
    batches of 4 rows and 2 evaluation batches.
    """

    pretrain_steps: int = 400
    adapt_steps: int = 120
    contrastive_steps: int = 60
    batch_size: int = 8
    contrastive_batch_size: int = 64  # in-batch negatives: more rows, a harder task to learn
    eval_batches: int = 20
    min_steps: int = 2

    def scaled(self, scale: float) -> Budget:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"QUICKSTART_SCALE={scale!r} must be a positive number")

        def steps(n: int) -> int:
            return max(self.min_steps, round(n * scale))

        small = scale < 0.1
        return dataclasses.replace(
            self,
            pretrain_steps=steps(self.pretrain_steps),
            adapt_steps=steps(self.adapt_steps),
            contrastive_steps=steps(self.contrastive_steps),
            batch_size=4 if small else self.batch_size,
            contrastive_batch_size=4 if small else self.contrastive_batch_size,
            eval_batches=2 if small else self.eval_batches,
        )


def save_interval(steps: int) -> int:
    """Checkpoint about six times a run (an interruption loses at most a sixth of a stage), and
    not every step of a short test run (each save waits for the previous one)."""
    return max(min(5, steps), steps // 6)


def newest_step(model_dir: str) -> int | None:
    from encdec_adapt.runtime.export_params import newest_step as newest

    return newest(model_dir)


# --------------------------------------------------------------------------- running commands


def run(stage: str, argv: list[str]) -> None:
    """`encdec-adapt ARGV` in this process; a non-zero exit code raises QuickstartError."""
    import gin

    from encdec_adapt.cli import main

    line = "encdec-adapt " + " ".join(argv)
    print(f"\n[quickstart] {stage}: {line}", flush=True)
    t0 = time.perf_counter()
    # Each command parses its own gin files from scratch. The previous one left the config
    # locked (finalized), and a module imported while it is locked may not register
    # configurables: clear_config also unlocks it.
    gin.clear_config()
    for module in LAZY_CONFIGURABLES:  # registered now, while the config is unlocked
        importlib.import_module(module)
    code = main.main(argv)
    gin.clear_config()
    if code:
        raise QuickstartError(f"stage {stage}: `{line}` exited with code {code}")
    print(f"[quickstart] {stage}: {argv[0]} took {time.perf_counter() - t0:.1f}s", flush=True)


def train_args(gin_file: str, model_dir: str, steps: int, batch: int, *extra: str) -> list[str]:
    return [
        "train",
        f"--gin_file={EXPERIMENTS}/{gin_file}",
        f"--gin.MODEL_DIR={model_dir}",
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.BATCH_SIZE={batch}",
        f"--gin.CheckpointConfig.save_interval_steps={save_interval(steps)}",
        f"--gin.OptimizerConfig.warmup_steps={max(1, steps // 10)}",
        f"--gin.train.log_every={max(1, min(25, steps // 10))}",
        *extra,
    ]


def is_params_checkpoint(path: str) -> bool:
    """params_io writes model.json last and renames the directory: present means complete."""
    return os.path.exists(os.path.join(path, "model.json"))


# --------------------------------------------------------------------------------- the stages


class Quickstart:
    """The stages over one output directory; `run_all` runs the ones not finished yet.

    Subclasses (experiments/quickstart_real.py) change the class attributes and the stage methods
    they replace; the stage runner, the training / command / eval stages, plots and the summary
    table are shared.
    """

    NAME = "quickstart"
    STAGES = STAGES
    TRAINING_STAGES = ("pretrain", "adapt_ul2", "adapt_prefixlm", "dual_encoder")
    PARAMS_CHECKPOINTS = ("pretrained", "t5gemma_init", "adapt_ul2_params", "adapt_prefixlm_params")
    EVAL_TASKS = EVAL_TASKS
    BUDGET = Budget

    def __init__(self, out: str, scale: float = 1.0, budget: Budget | None = None):
        self.out = os.path.abspath(out)
        self.scale = scale
        self.budget = (budget or self.BUDGET()).scaled(scale)
        self.times = StageTimes(self.path("stage_times.json"))
        self.stages = Stages(lambda m: print(f"[{self.NAME}] {m}", flush=True), self.times)
        self.settings_file = self.path("quickstart.json")

    def check_settings(self) -> None:
        """A directory holds one budget: finished stages of another scale would be reused."""
        settings = {"scale": self.scale, "budget": dataclasses.asdict(self.budget)}
        before = read_json(self.settings_file)
        if before is not None:
            if before != settings:
                raise QuickstartError(
                    f"{self.out} holds a quickstart run at scale {before.get('scale')} "
                    f"({before.get('budget')}), not {self.scale}: set QUICKSTART_DIR to a new "
                    "directory (or remove this one)"
                )
        else:
            write_json(self.settings_file, settings)

    def path(self, *names: str) -> str:
        return os.path.join(self.out, *names)

    def train_stage(
        self, name: str, gin_file: str, steps: int, *extra: str, batch: int | None = None
    ) -> None:
        """A training run: finished when its newest checkpoint is step `steps`."""
        model_dir = self.path(name)
        batch = batch or self.budget.batch_size
        self.stages.run(
            name,
            lambda: run(name, train_args(gin_file, model_dir, steps, batch, *extra)),
            finished=lambda: (newest_step(model_dir) or 0) >= steps,
            done=f" ({steps} steps in {model_dir})",
        )

    def command_stage(self, name: str, output: str, argv: list[str]) -> None:
        """A command that writes the params checkpoint `output` (complete when present)."""
        self.stages.run(
            name,
            lambda: run(name, argv),
            finished=lambda: is_params_checkpoint(output),
            done=f" ({output})",
        )

    def export_stage(self, name: str, model_dir: str, output: str) -> None:
        self.command_stage(
            name, output, ["export-params", f"--model_dir={model_dir}", f"--output={output}"]
        )

    def corpus(self) -> None:
        # Idempotent (the corpus is built once per machine); later stages would build it too.
        def show() -> dict:
            run("corpus", ["tasks", "--show", "stdlib_lm", "-n", "1", "--lengths", "targets=64"])
            return {"task": "stdlib_lm"}

        self.stages.run("corpus", show, result=self.path("corpus_shown"))

    def pretrain(self) -> None:
        self.train_stage("pretrain", "quickstart_pretrain.gin", self.budget.pretrain_steps)

    def adapt(self) -> None:
        self.export_stage("adapt", self.path("pretrain"), self.path("pretrained"))
        self.command_stage(
            "adapt",
            self.path("t5gemma_init"),
            [
                "adapt",
                "--preset=t5gemma_tiny",
                f"--encoder={self.path('pretrained')}",
                f"--output={self.path('t5gemma_init')}",
            ],
        )

    def adapt_ul2(self) -> None:
        self.train_stage(
            "adapt_ul2",
            "quickstart_adapt_ul2.gin",
            self.budget.adapt_steps,
            f"--gin.train.warm_start_from={self.path('t5gemma_init')}",
        )
        self.export_stage("adapt_ul2", self.path("adapt_ul2"), self.path("adapt_ul2_params"))

    def adapt_prefixlm(self) -> None:
        self.train_stage(
            "adapt_prefixlm",
            "quickstart_adapt_prefixlm.gin",
            self.budget.adapt_steps,
            f"--gin.train.warm_start_from={self.path('t5gemma_init')}",
            f"--gin.TEACHER_CHECKPOINT={self.path('pretrained')}",
        )
        self.export_stage(
            "adapt_prefixlm", self.path("adapt_prefixlm"), self.path("adapt_prefixlm_params")
        )

    def dual_encoder(self) -> None:
        self.train_stage(
            "dual_encoder",
            "quickstart_contrastive.gin",
            self.budget.contrastive_steps,
            f"--gin.train.warm_start_from={self.path('pretrained')}",
            batch=self.budget.contrastive_batch_size,
        )
        report = self.path("retrieval", "retrieval_report.json")

        def embed() -> dict:
            run(
                "dual_encoder",
                [
                    "embed",
                    "--gin_file=models/gemma_tiny.gin",
                    "--gin_file=runs/embed.gin",
                    "--gin_file=experiments/configs/quickstart_towers.gin",
                    f"--gin.MODEL_DIR={self.path('dual_encoder')}",
                    "--gin.TASK=stdlib_code_search_subtokens",
                    f"--gin.OUTPUT_DIR={self.path('retrieval')}",
                    f"--gin.embed.untrained_from={self.path('pretrained')}",
                    "--gin.embed.progress=False",
                ],
            )
            if not os.path.exists(report):
                raise QuickstartError(f"stage dual_encoder: `embed` wrote no {report}")
            return {"report": report}

        self.stages.run("dual_encoder", embed, result=self.path("retrieval", "done"))

    # evaluation: every result is a JSON file written once, complete
    def _eval(self, name: str, argv: list[str]) -> None:
        out_dir = self.path("eval", name)
        metrics = os.path.join(out_dir, "metrics.jsonl")

        def evaluate() -> dict:
            run("evaluate", [*argv, f"--gin.MODEL_DIR={out_dir}"])
            records = read_metrics(metrics, "eval")
            if not records:
                raise QuickstartError(f"stage evaluate: `eval` wrote no result to {metrics}")
            return records[-1]

        # an interrupted evaluation starts again (its metrics.jsonl would hold two results)
        self.stages.run(
            "evaluate",
            evaluate,
            result=os.path.join(out_dir, "result.json"),
            restart=[metrics],
            done=f" ({name})",
        )

    def evaluate(self) -> None:
        b = self.budget
        self._eval(
            "pretrained_lm",
            [
                "eval",
                f"--gin_file={EXPERIMENTS}/quickstart_eval_lm.gin",
                f"--gin.PARAMS={self.path('pretrained')}",
                f"--gin.EVAL_BATCHES={b.eval_batches}",
            ],
        )
        for model in ("t5gemma_init", "adapt_ul2_params", "adapt_prefixlm_params"):
            for short, task in self.EVAL_TASKS.items():
                self._eval(
                    f"{model}_{short}",
                    [
                        "eval",
                        f"--gin_file={EXPERIMENTS}/quickstart_eval.gin",
                        f"--gin.PARAMS={self.path(model)}",
                        f"--gin.EVAL_TASK={task}",
                        f"--gin.EVAL_BATCHES={b.eval_batches}",
                    ],
                )
        for model in ("adapt_ul2_params", "adapt_prefixlm_params"):
            output = self.path("predictions", f"{model.removesuffix('_params')}.jsonl")
            argv = [
                "infer",
                f"--gin_file={EXPERIMENTS}/quickstart_predict.gin",
                f"--gin.PARAMS={self.path(model)}",
                f"--gin.OUTPUT={output}",
            ]
            self.stages.run(
                "evaluate",
                lambda argv=argv: run("evaluate", argv),
                finished=lambda output=output: os.path.exists(output),
                done=f" ({output})",
            )

    def describe_budget(self) -> str:
        b = self.budget
        return (
            f"scale {self.scale:g}: pretrain {b.pretrain_steps} steps, adaptation "
            f"{b.adapt_steps} steps each, dual encoder {b.contrastive_steps} steps of "
            f"{b.contrastive_batch_size}, batch {b.batch_size}"
        )

    def run_all(self) -> str:
        """Runs the unfinished stages, then writes plots and the summary; returns the summary."""
        import jax

        os.makedirs(self.out, exist_ok=True)
        self.check_settings()
        # Compiled steps are cached on disk: a resumed quickstart does not compile them again.
        jax.config.update("jax_compilation_cache_dir", self.path("jax_cache"))
        print(f"[{self.NAME}] output: {self.out} ({self.describe_budget()})", flush=True)
        for stage in self.STAGES:
            getattr(self, stage)()
        plots = write_plots(self.out, self.TRAINING_STAGES)
        summary = self.summary(plots)
        with open(self.path("summary.md"), "w") as f:
            f.write(summary)
        return summary

    # ------------------------------------------------------------------------------ summary

    def evals(self, name: str) -> dict:
        """The result of evaluation `name` (eval/NAME/result.json), {} when missing."""
        return read_json(self.path("eval", name, "result.json")) or {}

    def both(self, model: str, key: str) -> str:
        """`key` of `model` on each of EVAL_TASKS, "a / b"."""
        values = [self.evals(f"{model}_{t}").get(key) for t in self.EVAL_TASKS]
        return " / ".join(fmt_number(v) for v in values)

    def retrieval(self, row: str, metric: str = "ndcg@10") -> str:
        """`metric` of a row of the retrieval report ("towers", "untrained towers", "BM25")."""
        report = read_json(self.path("retrieval", "retrieval_report.json")) or {}
        return fmt_number(report.get("results", {}).get(row, {}).get(metric))

    def summary_rows(self) -> list[tuple]:
        """(stage, steps, seconds, final train loss, validation loss, validation accuracy,
        code search nDCG@10) rows of the summary table."""
        times, evals, both = self.times.get(), self.evals, self.both

        def ndcg(row: str) -> str:
            return self.retrieval(row)

        lm = evals("pretrained_lm")
        return [
            (
                "pretrain (decoder-only LM)",
                self._steps("pretrain"),
                times.get("pretrain"),
                self._final_loss("pretrain"),
                f"{fmt_number(lm.get('loss'))} (LM)",
                f"{fmt_number(lm.get('accuracy'))} (LM)",
                "",
            ),
            ("adapt (warm start, untrained)", 0, times.get("adapt"), None,
             both("t5gemma_init", "loss"), both("t5gemma_init", "accuracy"), ""),
            ("adapt + UL2", self._steps("adapt_ul2"), times.get("adapt_ul2"),
             self._final_loss("adapt_ul2"), both("adapt_ul2_params", "loss"),
             both("adapt_ul2_params", "accuracy"), ""),
            ("adapt + PrefixLM + KD", self._steps("adapt_prefixlm"), times.get("adapt_prefixlm"),
             self._final_loss("adapt_prefixlm"), both("adapt_prefixlm_params", "loss"),
             both("adapt_prefixlm_params", "accuracy"), ""),
            ("dual encoder (contrastive)", self._steps("dual_encoder"),
             times.get("dual_encoder"), self._final_loss("dual_encoder"), "", "",
             ndcg("towers")),
            ("  untrained towers", "", None, None, "", "", ndcg("untrained towers")),
            ("  BM25", "", None, None, "", "", ndcg("BM25")),
            ("evaluate (eval, infer)", "", times.get("evaluate"), None, "", "", ""),
        ]  # fmt: skip

    def summary_sections(self) -> list[str]:
        """Markdown lines between the table and the paths (default: the greedy decodes)."""
        return self._examples()

    def summary(self, plots: list[str]) -> str:
        rows = self.summary_rows()
        header = (
            "| stage | steps | time | final train loss | validation loss "
            "(PrefixLM / span corr.) | validation accuracy (PrefixLM / span corr.) | "
            "code search nDCG@10 |"
        )
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
        for name, steps, seconds, loss, vloss, vacc, nd in rows:
            t = fmt_duration(seconds) if seconds is not None else ""
            lines.append(
                f"| {name} | {steps} | {t} | {fmt_number(loss) if loss is not None else ''} | "
                f"{vloss} | {vacc} | {nd} |"
            )
        examples = self.summary_sections()
        paths = [
            (
                "checkpoints (training runs)",
                [self.path(s, "checkpoints") for s in self.TRAINING_STAGES],
            ),
            (
                "params checkpoints",
                [
                    self.path(p)
                    for p in self.PARAMS_CHECKPOINTS
                    if is_params_checkpoint(self.path(p))
                ],
            ),
            ("TensorBoard logs", [f"tensorboard --logdir {self.out}"]),
            ("plots", plots),
            ("retrieval report", [self.path("retrieval", "retrieval_report.md")]),
            ("predictions", [self.path("predictions")]),
        ]
        title = self.NAME.replace("_", " ").capitalize()
        out = [f"# {title} summary", "", *lines, "", *examples, "## Paths", ""]
        for title, items in paths:
            out.append(f"- {title}:")
            out += [f"  - {p}" for p in items]
        return "\n".join(out) + "\n"

    def _steps(self, name: str) -> int | str:
        step = newest_step(self.path(name))
        return step if step is not None else ""

    def _final_loss(self, name: str) -> float | None:
        records = read_metrics(self.path(name, "metrics.jsonl"), "train")
        return records[-1].get("loss") if records else None

    def _examples(
        self, names=("adapt_ul2", "adapt_prefixlm"), task="stdlib_prefix_lm"
    ) -> list[str]:
        out = []
        for name in names:
            path = self.path("predictions", f"{name}.jsonl")
            if not os.path.exists(path):
                continue
            out.append(f"## Greedy decodes, {name} ({task} validation)")
            out.append("")
            with open(path) as f:
                for line in list(f)[:2]:
                    r = json.loads(line)
                    out.append(f"- input: `{shorten(r['inputs'])}`")
                    out.append(f"  prediction: `{shorten(r['prediction'])}`")
            out.append("")
        return out


TRAINING_STAGES = Quickstart.TRAINING_STAGES
PARAMS_CHECKPOINTS = Quickstart.PARAMS_CHECKPOINTS


def fmt_number(value) -> str:
    return "" if value is None else f"{value:.3f}"


def fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def shorten(text: str, n: int = 80) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= n else text[: n - 3] + "..."


def main(argv: list[str] | None = None, cls: type[Quickstart] = Quickstart) -> int:
    """Runs the quickstart `cls` in $QUICKSTART_DIR (default runs/NAME) at $QUICKSTART_SCALE."""
    del argv
    name = cls.NAME
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out = os.environ.get("QUICKSTART_DIR") or os.path.join("runs", name)
    try:
        scale = float(os.environ.get("QUICKSTART_SCALE", "1"))
        qs = cls(out, scale)
    except ValueError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        summary = qs.run_all()
    except StageError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\n{name}: interrupted; run it again to continue from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    print("\n" + summary, flush=True)
    print(f"[{name}] done in {fmt_duration(time.perf_counter() - t0)}; summary: "
          f"{qs.path('summary.md')}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    if "--real" in sys.argv[1:]:
        from experiments.quickstart_real import RealQuickstart

        sys.exit(main(cls=RealQuickstart))
    sys.exit(main())
