"""Accelerator benchmark: MFU of a T5Gemma 2B-2B train step and greedy decoding next to HF.

Run through `scripts/bench_accelerator.sh`, which installs the pinned packages first. Two parts:

1. Train step: the t5gemma_2b_2b preset (two Gemma 2 2B stacks) with bfloat16 compute and
   float32 parameters and AdamW moments (fp32 master weights), `scan_layers` + remat "full",
   batch `--batch`, inputs = targets = L tokens for the longest L of `--lengths` whose compiled
   step (XLA `memory_analysis()`: arguments + temporaries + outputs - aliased) fits in 90% of
   the device's memory. Reports the median step time of `--steps` steps after one warm-up,
   tokens/s and MFU = model FLOPs per step (`flops_per_token`, 6 x params x tokens + attention)
   / step time / the chip's peak (`--peak_tflops`, default 989: H200 dense bfloat16), and the
   best of a few 8192^3 bfloat16 matmuls as a measured reference.
2. Greedy decoding: the same architecture with random weights, ours (`models/decoding.py`, one
   jitted while loop) and transformers' `generate` (torch, bfloat16, KV cache, sdpa attention)
   on the same weights (our parameters exported with the converter's tables) on the same
   device; inputs `--input_len`, `--new_tokens` new tokens, EOS disabled; alternated A B runs,
   median tokens/s per batch size, and the fraction of equal token ids (bfloat16 kernels differ
   between the frameworks, so ids may drift apart after a near-tie).

`--tiny` runs both parts on a tiny config in float32 on whatever backend JAX has (the test
suite runs it on CPU, so the script cannot rot); there the token ids must be equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encdec_adapt.models import decoding
from encdec_adapt.models import generative as models
from encdec_adapt.nn.config import EncoderDecoderConfig, load_encdec_preset, load_preset
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim, trainer

GIB = 2**30
START_ID = 2


def config(tiny: bool, dtype: str) -> EncoderDecoderConfig:
    if tiny:
        stack = load_preset("gemma_tiny").replace(num_layers=2, vocab_size=512, dtype=dtype)
        return EncoderDecoderConfig(encoder=stack, decoder=stack)
    cfg = load_encdec_preset("t5gemma_2b_2b")
    return cfg.replace(
        encoder=cfg.encoder.replace(dtype=dtype), decoder=cfg.decoder.replace(dtype=dtype)
    )


def device_bytes() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def matmul_peak(n: int, dtype) -> float:
    """Best FLOP/s of an n^3 matmul in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def train_part(args, cfg: EncoderDecoderConfig) -> None:
    model = models.EncoderDecoderModel(config=cfg, remat="full", scan_layers=True)
    rules = sharding.MeshRules(mesh_shape=(1, -1, 1))
    t = trainer.Trainer(
        model, optim.OptimizerConfig(name="adamw", learning_rate=1e-5), rules.make_mesh(), rules
    )
    names = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
    limit = device_bytes()
    chosen = None
    for length in sorted(args.lengths, reverse=True):
        spec = {k: jax.ShapeDtypeStruct((args.batch, length), jnp.int32) for k in names}
        spec["decoder_loss_weights"] = spec[names[0]]
        t0 = time.perf_counter()
        compiled = t.compile_step(t.abstract_state(), spec)
        need = compiled.memory()["peak"]
        fits = limit is None or need < 0.9 * limit
        print(
            f"train: L={length} needs {need / GIB:.1f} GiB"
            + (f" of {limit / GIB:.1f}" if limit else "")
            + f" (compile {time.perf_counter() - t0:.0f} s){'' if fits else ': too big'}",
            flush=True,
        )
        if fits:
            chosen = (length, compiled)
            break
    if chosen is None:
        print("train: no length fits", flush=True)
        return
    length, compiled = chosen
    rng = np.random.default_rng(0)
    v = cfg.decoder.vocab_size
    tgt = rng.integers(2, v, (args.batch, length)).astype(np.int32)
    batch = {
        "encoder_input_tokens": rng.integers(2, v, (args.batch, length)).astype(np.int32),
        "decoder_input_tokens": np.concatenate(
            [np.zeros((args.batch, 1), np.int32), tgt[:, :-1]], 1
        ),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones((args.batch, length), np.int32),
    }
    state = t.init_state()
    batch = t.shard_batch(batch)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    flops = model.flops_per_token({"inputs": length, "targets": length}) * args.batch * length
    peak = args.peak_tflops * 1e12
    measured = matmul_peak(256 if args.tiny else 8192, jnp.float32 if args.tiny else jnp.bfloat16)
    print(
        f"train: t5gemma {'tiny' if args.tiny else '2b_2b'}, {cfg.decoder.dtype} compute, fp32 "
        f"params + AdamW, batch {args.batch} x ({length} + {length}) tokens, step "
        f"{sec:.3f} s (median of {len(times)}, {min(times):.3f}-{max(times):.3f}), "
        f"{args.batch * 2 * length / sec:,.0f} tokens/s, {flops / 1e12:.1f} TFLOP/step, "
        f"MFU {flops / sec / peak:.1%} of {args.peak_tflops:.0f} TFLOP/s "
        f"({flops / sec / measured:.1%} of the measured matmul peak {measured / 1e12:.1f} "
        f"TFLOP/s); loss {float(metrics['loss_sum']) / float(metrics['weight']):.3f}",
        flush=True,
    )


def decode_part(args, cfg: EncoderDecoderConfig) -> None:
    import torch
    import transformers

    from encdec_adapt.convert.t5gemma import config_to_hf, export_encoder_decoder
    from encdec_adapt.storage import params_io

    model = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    _, tensors = export_encoder_decoder(cfg.to_dict(), params_io.model_params(model))
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    torch_dtype = torch.float32 if args.tiny else torch.bfloat16
    hf_cfg = transformers.T5GemmaConfig.from_dict(config_to_hf(cfg))
    hf_cfg._attn_implementation = "eager" if args.tiny else "sdpa"
    # Built on the device in its dtype (random init there is fast), then our weights copied in.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            hf = transformers.T5GemmaForConditionalGeneration(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = hf.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False
    )
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"weights do not match: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf = hf.eval()
    del tensors
    for batch in args.decode_batches:
        _decode_batch(args, cfg, graphdef, state, hf, device, batch)


def _decode_batch(args, cfg, graphdef, state, hf, device: str, batch: int) -> None:
    """Alternated greedy decoding of one batch size, ours vs transformers; prints one line."""
    import torch

    tokens = np.random.default_rng(batch).integers(
        3, cfg.encoder.vocab_size, (batch, args.input_len)
    )
    dcfg = decoding.DecodeConfig(max_decode_len=args.new_tokens, eos_id=-1)

    @jax.jit
    def generate(state, x):
        m = nnx.merge(graphdef, state)
        step_fn, init_logits, dstate = decoding.encoder_decoder_start(
            m, x, args.new_tokens, decoder_start_id=START_ID
        )
        return decoding.decode(step_fn, init_logits, dstate, dcfg).tokens

    x = jnp.asarray(tokens)
    ids = torch.from_numpy(tokens.astype(np.int64)).to(device)
    kwargs = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        decoder_start_token_id=START_ID,
        pad_token_id=0,
    )

    def ours():
        return np.asarray(generate(state, x))

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, 1:].cpu().numpy()

    ours(), theirs()  # warm-up (our compilation)
    times = {"ours": [], "hf": []}
    outs = {}
    for _ in range(args.pairs):
        for name, fn in (("ours", ours), ("hf", theirs)):
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    same = float(np.mean(outs["ours"] == outs["hf"]))
    if args.tiny and same != 1.0:
        raise AssertionError(f"decode: batch {batch}: token ids differ ({same:.1%} equal)")
    rate = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
    print(
        f"decode: batch {batch}, inputs {args.input_len}, {args.new_tokens} new tokens: "
        f"ours {rate['ours']:,.1f} tokens/s, transformers {rate['hf']:,.1f} tokens/s "
        f"({rate['ours'] / rate['hf']:.2f}x; median of {args.pairs} alternated runs); "
        f"{same:.1%} of token ids equal",
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny float32 config on any backend")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 4096, 2048, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="chip peak for MFU")
    p.add_argument("--decode_batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--input_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_decode", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.lengths = [min(x, 64) for x in args.lengths]
        args.input_len, args.new_tokens = min(args.input_len, 16), min(args.new_tokens, 8)
        args.decode_batches = args.decode_batches[:1]
        args.steps, args.pairs = min(args.steps, 2), min(args.pairs, 1)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}")
    start = time.perf_counter()
    if not args.skip_train:
        train_part(args, config(args.tiny, "float32" if args.tiny else "bfloat16"))
    if not args.skip_decode:
        decode_part(args, config(args.tiny, "float32" if args.tiny else "bfloat16"))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
