"""Train-step time of the real 270M-270M T5Gemma 2: this package (JAX) next to transformers.

    python scripts/bench_real.py                 # t5gemma2_270m_270m, batch 4, inputs 64 + 32
    python scripts/bench_real.py --small         # a tiny T5Gemma 2 config (smoke run)

Comparison (c) of the real quickstart (README "The real quickstart"). Both sides train the same
architecture on the same random batch in one run on the same machine: this package's train step
(`runtime.trainer.Trainer`, AdamW, jit) on the `t5gemma2_270m_270m` preset (the layout the real
quickstart trains), and transformers' `T5Gemma2ForConditionalGeneration` built from the config that
`convert/t5gemma2.py`'s `config_to_hf` exports for it (eager attention, torch AdamW). Weights are
random: a step costs the same whatever their values. Each side runs in its own worker process
(`bench_ab.py`): one warm-up step each (JAX: with compilation), then `--pairs` alternated A B
rounds; the step functions are scripts/bench_train.py's. Prints a markdown table: median step
time (min-max), target tokens/s, all tokens/s, MFU against `--peak_flops`, peak RSS per side.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ab
import bench_train
import jax

from encdec_adapt.models import generative as models
from encdec_adapt.nn.config import load_encdec_preset

PRESET = "t5gemma2_270m_270m"


def small_config():
    """The preset's layout at toy size (2 layers, d 64, vocab 512)."""
    cfg = load_encdec_preset(PRESET)
    stack = cfg.encoder.replace(
        num_layers=2, embed_dim=64, hidden_dim=128, vocab_size=512, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=16,
    )  # fmt: skip
    return cfg.replace(encoder=stack, decoder=stack)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny config of the same layout")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--targets", type=int, default=32)
    p.add_argument("--pairs", type=int, default=3, help="alternated A B rounds (timed)")
    p.add_argument("--peak_flops", type=float, default=2e11, help="machine peak FLOP/s")
    p.add_argument("--skip_torch", action="store_true")
    args = p.parse_args(argv)

    cfg = small_config() if args.small else load_encdec_preset(PRESET)
    batch = bench_train.make_batch(cfg, args.batch, args.inputs, args.targets)
    lengths = {"inputs": args.inputs, "targets": args.targets}
    model = models.EncoderDecoderModel(config=cfg)
    flops_per_step = model.flops_per_token(lengths) * args.batch * args.targets
    print(
        f"config: {PRESET}{' (small)' if args.small else ''}, "
        f"{bench_train.param_count(cfg) / 1e6:.1f}M params, batch {args.batch}, inputs "
        f"{args.inputs}, targets {args.targets}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {flops_per_step / 1e12:.3f} TFLOP per step",
        flush=True,
    )
    sides = {"jax": (bench_train.setup_jax, {"cfg": cfg, "batch": batch})}
    if not args.skip_torch:
        sides["torch"] = (
            bench_train.setup_torch, {"cfg": cfg, "batch": batch, "layout": "t5gemma2"}
        )  # fmt: skip
    res = bench_ab.run_ab(sides, pairs=args.pairs, warmup=1)
    names = {
        "jax": "encdec_adapt (JAX)",
        "torch": "transformers T5Gemma2ForConditionalGeneration (torch, eager)",
    }
    print(f"{args.pairs} alternated rounds after 1 warm-up step per side; {bench_ab.load_line()}")
    print("| implementation | step time (s): median (min-max) | target tokens/s | all tokens/s "
          "| MFU | peak RSS |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for key, r in res.items():
        sec = r.median
        tgt = args.batch * args.targets / sec
        total = args.batch * (args.inputs + args.targets) / sec
        mfu = flops_per_step / sec / args.peak_flops
        print(
            f"| {names[key]} | {bench_ab.spread(r.times, '{:.2f}')} | {tgt:,.1f} | {total:,.1f} "
            f"| {mfu:.1%} | {r.stats['peak_rss_MiB'] / 1024:.1f} GiB |"
        )
    if "torch" in res:
        ratios = bench_ab.pair_ratios(res, "torch", "jax")
        print(f"speed-up (torch / jax step time per round): {bench_ab.spread(ratios, '{:.2f}')}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
