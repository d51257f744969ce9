"""Training throughput of the encoder-decoder: this package (JAX) next to HF transformers (torch).

    python scripts/bench_train.py                # ~80M T5Gemma, batch 8, inputs 512, targets 128
    python scripts/bench_train.py --small        # a seconds-long smoke run
    python scripts/bench_train.py --peak_flops 2e11 --steps 3

Both sides train the same architecture (T5GemmaForConditionalGeneration built from our config
through the converter's `config_to_hf`, eager attention, AdamW) on the same random batch on the
same machine, one run each; compilation (JAX) and the first step (torch) are excluded. Prints a
markdown table row per framework: step time, target tokens/s, all tokens/s, and MFU = model
FLOPs per step / step time / `--peak_flops` (the machine's measured peak, e.g. ~2e11 FLOP/s for
float32 matmuls on the 2-core test machines).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from flax import nnx

from encdec_adapt.models import generative as models
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim, trainer


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


def bench_jax(cfg, batch, steps: int) -> float:
    """Seconds per optimizer step (after compilation)."""
    rules = sharding.MeshRules(mesh_shape=(1, -1, 1))
    t = trainer.Trainer(
        models.EncoderDecoderModel(config=cfg),
        optim.OptimizerConfig(name="adamw", learning_rate=1e-4),
        rules.make_mesh(),
        rules,
    )
    state = t.init_state()
    global_batch = t.shard_batch(batch)
    state, m = t.train_step(state, global_batch)  # compile
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = t.train_step(state, global_batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - start) / steps


def bench_torch(cfg, batch, steps: int, layout: str = "t5gemma") -> float | None:
    """Seconds per step of transformers' T5Gemma (layout "t5gemma") or T5Gemma 2 ("t5gemma2")
    built from the config this package exports for `cfg` (after one warm-up step)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"torch / transformers unavailable: {e}", file=sys.stderr)
        return None
    if layout == "t5gemma2":
        from encdec_adapt.convert.t5gemma2 import config_to_hf

        config_cls, model_cls = (
            transformers.T5Gemma2Config,
            transformers.T5Gemma2ForConditionalGeneration,
        )
    else:
        from encdec_adapt.convert.t5gemma import config_to_hf

        config_cls, model_cls = (
            transformers.T5GemmaConfig,
            transformers.T5GemmaForConditionalGeneration,
        )

    torch.manual_seed(0)
    hf = config_cls.from_dict(config_to_hf(cfg))
    hf._attn_implementation = "eager"
    model = model_cls(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    enc = torch.from_numpy(batch["encoder_input_tokens"]).long()
    dec = torch.from_numpy(batch["decoder_input_tokens"]).long()
    labels = torch.from_numpy(batch["decoder_target_tokens"]).long()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=enc, decoder_input_ids=dec, labels=labels)
        out.loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny config (smoke test)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peak_flops", type=float, default=2e11, help="machine peak FLOP/s")
    p.add_argument("--skip_torch", action="store_true")
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
    print(
        f"config: {n_params / 1e6:.1f}M params, batch {args.batch}, inputs {args.inputs}, "
        f"targets {args.targets}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{flops_per_step / 1e12:.2f} TFLOP per step"
    )
    rows = [("encdec_adapt (JAX)", bench_jax(cfg, batch, args.steps))]
    if not args.skip_torch:
        rows.append(
            ("HF T5GemmaForConditionalGeneration (torch)", bench_torch(cfg, batch, args.steps))
        )
    print("| implementation | step time (s) | target tokens/s | all tokens/s | MFU |")
    print("|---|---|---|---|---|")
    for name, sec in rows:
        if sec is None:
            continue
        tgt = args.batch * args.targets / sec
        total = args.batch * (args.inputs + args.targets) / sec
        mfu = flops_per_step / sec / args.peak_flops
        print(f"| {name} | {sec:.3f} | {tgt:,.0f} | {total:,.0f} | {mfu:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
