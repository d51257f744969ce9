"""Train-step time of the real 270M-270M T5Gemma 2: this package (JAX) next to transformers.

    python scripts/bench_real.py                 # t5gemma2_270m_270m, batch 4, inputs 64 + 32
    python scripts/bench_real.py --small         # a tiny T5Gemma 2 config (smoke run)

Comparison (c) of the real quickstart (README "The real quickstart"). Both sides train the same
architecture on the same random batch in one run on the same machine: this package's train step
(`runtime.trainer.Trainer`, AdamW, jit) on the `t5gemma2_270m_270m` preset (the layout the real
quickstart trains), and transformers' `T5Gemma2ForConditionalGeneration` built from the config that
`convert/t5gemma2.py`'s `config_to_hf` exports for it (eager attention, torch AdamW). Weights are
random: a step costs the same whatever their values. Compilation (JAX) and the first step (torch)
are excluded; the step functions are scripts/bench_train.py's. Prints a markdown table: step time,
target tokens/s, all tokens/s, MFU against `--peak_flops`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
    p.add_argument("--steps", type=int, default=2)
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
    rows = [("encdec_adapt (JAX)", bench_train.bench_jax(cfg, batch, args.steps))]
    print(f"encdec_adapt: {rows[0][1]:.2f} s/step", flush=True)
    if not args.skip_torch:
        name = "transformers T5Gemma2ForConditionalGeneration (torch, eager)"
        rows.append((name, bench_train.bench_torch(cfg, batch, args.steps, "t5gemma2")))
    print("| implementation | step time (s) | target tokens/s | all tokens/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    for name, sec in rows:
        if sec is None:
            continue
        tgt = args.batch * args.targets / sec
        total = args.batch * (args.inputs + args.targets) / sec
        mfu = flops_per_step / sec / args.peak_flops
        print(f"| {name} | {sec:.2f} | {tgt:,.1f} | {total:,.1f} | {mfu:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
