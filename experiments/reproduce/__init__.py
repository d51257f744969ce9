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

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from experiments.reproduce.arms import (
    Arm,
    Reproduction,
    arm_record,
    make_arms,
    result_path,
    train_summary,
)
from experiments.reproduce.report import QUESTIONS, markdown, plot
from experiments.reproduce.seeds import (
    AggregateError,
    SeedRun,
    aggregate,
    load_seed_run,
    seeds_markdown,
    write_seeds_table,
)
from experiments.reproduce.settings import (
    SETTINGS,
    Command,
    SettingsError,
    load_settings,
    parse_args,
    parse_seeds,
    seed_settings,
    settings_path,
)
from experiments.stages import read_json, write_json

__all__ = [
    "QUESTIONS",
    "SETTINGS",
    "AggregateError",
    "Arm",
    "Command",
    "Reproduction",
    "SeedRun",
    "SettingsError",
    "aggregate",
    "arm_record",
    "load_seed_run",
    "load_settings",
    "main",
    "make_arms",
    "markdown",
    "parse_args",
    "parse_seeds",
    "plot",
    "read_json",
    "result_path",
    "run_one",
    "seed_settings",
    "seeds_markdown",
    "settings_path",
    "train_summary",
    "write_json",
    "write_seeds_table",
]


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
