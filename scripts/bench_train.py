"""Training throughput of the encoder-decoder: this package (JAX) next to HF transformers (torch).

    python scripts/bench_train.py                # ~80M T5Gemma, batch 8, inputs 512, targets 128
    python scripts/bench_train.py --small        # a seconds-long smoke run
    python scripts/bench_train.py --pairs 7 --json train.json

Both sides train the same architecture (T5GemmaForConditionalGeneration built from our config
through the converter's `config_to_hf`, eager attention, AdamW) on the same random batch, each
in its own worker process (`bench_ab.py`): after a warm-up step each (JAX: compilation + one
step), the steps alternate A B A B for `--pairs` rounds. Reported per side: the median step
time with its min-max, target tokens/s and all tokens/s at the median, MFU = model FLOPs per
step / median step time / the machine's fp32 peak, and peak memory (the worker's peak RSS and
its growth over the run, both from VmHWM; for JAX also XLA's `memory_analysis()` of the
compiled step: temporaries + arguments + outputs); and the median of the per-round ratios. The
fp32 peak is measured here, as the best of a few 2048 x 2048 x 2048 float32 matmuls in each
framework (the higher of the two is the machine's peak); `--peak_flops` overrides it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ab
import jax
import numpy as np
from flax import nnx

from encdec_adapt.models import generative as models
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim, trainer

GIB = 2**30


def bench_config(small: bool) -> EncoderDecoderConfig:
    """~80M parameters (two 8-layer d=512 Gemma-2 stacks, vocab 8192), or a tiny one."""
    stack = GemmaConfig(
        family="gemma2",
        vocab_size=8192,
        num_layers=8,
        embed_dim=512,
        hidden_dim=2048,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=256,
    )
    if small:
        stack = stack.replace(num_layers=2, embed_dim=64, hidden_dim=128, vocab_size=512)
    return EncoderDecoderConfig(encoder=stack, decoder=stack)


def make_batch(cfg: EncoderDecoderConfig, batch: int, inputs: int, targets: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    v = cfg.decoder.vocab_size
    tgt = rng.integers(2, v, (batch, targets)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, v, (batch, inputs)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }


def param_count(cfg: EncoderDecoderConfig) -> int:
    model = models.EncoderDecoderModel(config=cfg)
    abstract = nnx.eval_shape(lambda: model.build(nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def matmul_peak_jax(n: int = 2048, reps: int = 8) -> float:
    """Best float32 FLOP/s of an n x n x n matmul in JAX."""
    a = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_peak_torch(n: int = 2048, reps: int = 8) -> float:
    """Best float32 FLOP/s of an n x n x n matmul in torch."""
    import torch

    a = torch.randn(n, n)
    a @ a
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bench_trainer(cfg: EncoderDecoderConfig) -> trainer.Trainer:
    """The benchmark's Trainer: the encoder-decoder's loss, AdamW, one device."""
    rules = sharding.MeshRules(mesh_shape=(1, -1, 1))
    return trainer.Trainer(
        models.EncoderDecoderModel(config=cfg),
        optim.OptimizerConfig(name="adamw", learning_rate=1e-4),
        rules.make_mesh(),
        rules,
    )


def setup_jax(cfg: EncoderDecoderConfig, batch: dict) -> bench_ab.Side:
    """The project's Trainer step (loss + grad + AdamW, donated state), compiled."""
    small = cfg.decoder.embed_dim < 256
    t = bench_trainer(cfg)
    holder = {"state": t.init_state()}
    global_batch = t.shard_batch(batch)
    compiled = t.compile_step(holder["state"], global_batch)
    mem = compiled.memory()

    def run():
        holder["state"], metrics = compiled(holder["state"], global_batch)
        jax.block_until_ready(metrics)
        return float(metrics["loss_sum"]) / float(metrics["weight"])

    info = {
        "memory_analysis_GiB": mem["peak"] / GIB,
        "temporaries_GiB": mem["temporaries"] / GIB,
        "matmul_peak_flops": matmul_peak_jax(256 if small else 2048),
    }
    return bench_ab.Side(run, info)


def setup_torch(
    cfg: EncoderDecoderConfig, batch: dict, layout: str = "t5gemma", threads: int | None = None
) -> bench_ab.Side:
    """transformers' T5Gemma (layout "t5gemma") or T5Gemma 2 ("t5gemma2") built from the config
    this package exports for `cfg` (eager attention) + torch AdamW."""
    import torch
    import transformers

    if layout == "t5gemma2":
        from encdec_adapt.convert.t5gemma2 import config_to_hf

        config_cls = transformers.T5Gemma2Config
        model_cls = transformers.T5Gemma2ForConditionalGeneration
    else:
        from encdec_adapt.convert.t5gemma import config_to_hf

        config_cls = transformers.T5GemmaConfig
        model_cls = transformers.T5GemmaForConditionalGeneration
    if threads:
        torch.set_num_threads(threads)
    small = cfg.decoder.embed_dim < 256
    torch.manual_seed(0)
    hf = config_cls.from_dict(config_to_hf(cfg))
    hf._attn_implementation = "eager"
    model = model_cls(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    enc = torch.from_numpy(batch["encoder_input_tokens"]).long()
    dec = torch.from_numpy(batch["decoder_input_tokens"]).long()
    labels = torch.from_numpy(batch["decoder_target_tokens"]).long()

    def run():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=enc, decoder_input_ids=dec, labels=labels)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())

    info = {"matmul_peak_flops": matmul_peak_torch(256 if small else 2048)}
    return bench_ab.Side(run, info)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny config (smoke test)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=128)
    p.add_argument("--pairs", type=int, default=5, help="alternated A B rounds (timed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side")
    p.add_argument("--peak_flops", type=float, default=None, help="override the measured peak")
    p.add_argument("--skip_torch", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.small:
        args.inputs, args.targets = min(args.inputs, 64), min(args.targets, 16)

    cfg = bench_config(args.small)
    batch = make_batch(cfg, args.batch, args.inputs, args.targets)
    lengths = {"inputs": args.inputs, "targets": args.targets}
    flops_per_step = (
        models.EncoderDecoderModel(config=cfg).flops_per_token(lengths) * args.batch * args.targets
    )
    n_params = param_count(cfg)
    sides = {"jax": (setup_jax, {"cfg": cfg, "batch": batch})}
    if not args.skip_torch:
        sides["torch"] = (setup_torch, {"cfg": cfg, "batch": batch})
    res = bench_ab.run_ab(sides, pairs=args.pairs, warmup=args.warmup)
    peaks = {k: r.stats["matmul_peak_flops"] for k, r in res.items()}
    peak = args.peak_flops or max(peaks.values())
    print(
        f"config: {n_params / 1e6:.1f}M params, batch {args.batch}, inputs {args.inputs}, "
        f"targets {args.targets}, {flops_per_step / 1e12:.2f} TFLOP per step; "
        f"{jax.devices()[0].platform}, {bench_ab.load_line()}"
    )
    print(
        "fp32 matmul peak (2048^3, best of 8): "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; MFU uses {peak / 1e9:.0f} GFLOP/s"
    )
    names = {"jax": "encdec_adapt (JAX)", "torch": "HF T5GemmaForConditionalGeneration (torch)"}
    print(
        f"{args.pairs} alternated rounds after {args.warmup} warm-up step(s) per side; "
        "step time: median (min-max)"
    )
    print("| implementation | step time (s) | target tokens/s | all tokens/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for key, r in res.items():
        sec = r.median
        rss, growth = r.stats["peak_rss_MiB"] / 1024, r.stats["rss_growth_MiB"] / 1024
        mem = f"RSS {rss:.2f} GiB (+{growth:.2f})"
        if "memory_analysis_GiB" in r.stats:
            mem += f"; XLA {r.stats['memory_analysis_GiB']:.2f} GiB"
        rows[key] = {
            "times": r.times,
            "median_s": sec,
            "target_tokens_per_s": args.batch * args.targets / sec,
            "mfu": flops_per_step / sec / peak,
            **r.stats,
        }
        print(
            f"| {names[key]} | {bench_ab.spread(r.times)} | {args.batch * args.targets / sec:,.0f} "
            f"| {args.batch * (args.inputs + args.targets) / sec:,.0f} "
            f"| {flops_per_step / sec / peak:.1%} | {mem} |"
        )
    if "torch" in res:
        ratios = bench_ab.pair_ratios(res, "torch", "jax")
        print(f"speed-up (torch / jax step time per round): {bench_ab.spread(ratios, '{:.2f}')}x")
        rows["ratio_per_round"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "peak_flops": peak, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
