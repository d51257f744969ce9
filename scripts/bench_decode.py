"""Greedy decoding speed: encdec_adapt vs transformers' T5Gemma `generate`, same weights, one run.

A random T5Gemma of the benchmark config is built in transformers, imported with `import-hf`, and
both sides decode the same inputs for exactly `--new_tokens` tokens (EOS disabled) with their
KV caches. Reported: generated tokens per second (batch * new_tokens / seconds, median of
`--repeats` runs after one warm-up run; our compile time is reported separately) and the ratio.

    python scripts/bench_decode.py                      # batch 1 and 16, prints a markdown table
    python scripts/bench_decode.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from encdec_adapt.convert import import_hf
from encdec_adapt.models import decoding
from encdec_adapt.nn.config import EncoderDecoderConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import params_io

# ~50M parameters per side of the pair; Gemma 2 layout (local/global, soft-caps).
MODULE = dict(
    vocab_size=32_000,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=256,
)
START_ID = 2  # HF T5Gemma's decoder start (BOS)


def build(tmp: str) -> tuple[torch.nn.Module, EncoderDecoder]:
    hf_cfg = transformers.T5GemmaConfig(encoder=MODULE, decoder=MODULE, attn_implementation="eager")
    torch.manual_seed(0)
    torch_model = transformers.T5GemmaForConditionalGeneration(hf_cfg).eval()
    torch_model.save_pretrained(os.path.join(tmp, "hf"))
    import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"))
    _, config = params_io.read_model_json(os.path.join(tmp, "ckpt"))
    model = EncoderDecoder(EncoderDecoderConfig.from_dict(config), rngs=nnx.Rngs(0))
    params_io.load_into(model, os.path.join(tmp, "ckpt"))
    return torch_model, model


def time_ours(model, tokens: np.ndarray, new_tokens: int, repeats: int) -> tuple[float, float]:
    cfg = decoding.DecodeConfig(max_decode_len=new_tokens, eos_id=-1)
    graphdef, state = nnx.split(model)

    @jax.jit
    def generate(state, tokens):
        m = nnx.merge(graphdef, state)
        step_fn, init_logits, dstate = decoding.encoder_decoder_start(
            m, tokens, new_tokens, decoder_start_id=START_ID
        )
        return decoding.decode(step_fn, init_logits, dstate, cfg).tokens

    x = jnp.asarray(tokens)
    t0 = time.perf_counter()
    generate(state, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(state, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def time_hf(torch_model, tokens: np.ndarray, new_tokens: int, repeats: int) -> float:
    ids = torch.from_numpy(tokens.astype(np.int64))
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        decoder_start_token_id=START_ID,
        pad_token_id=0,
    )
    with torch.no_grad():
        torch_model.generate(ids, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch_model.generate(ids, **kwargs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_sizes", default="1,16")
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        torch_model, model = build(tmp)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        tokens = np.random.default_rng(0).integers(3, MODULE["vocab_size"], (batch, args.input_len))
        ours_s, compile_s = time_ours(model, tokens, args.new_tokens, args.repeats)
        hf_s = time_hf(torch_model, tokens, args.new_tokens, args.repeats)
        generated = batch * args.new_tokens
        rows.append(
            {
                "batch": batch,
                "ours_tokens_per_s": generated / ours_s,
                "hf_tokens_per_s": generated / hf_s,
                "speedup": hf_s / ours_s,
                "ours_compile_s": compile_s,
            }
        )
    print(
        f"T5Gemma {n_params / 1e6:.0f}M params (encoder + decoder), inputs {args.input_len}, "
        f"{args.new_tokens} new tokens, greedy, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} / torch {torch.__version__}"
    )
    print("| batch | encdec_adapt tokens/s | transformers tokens/s | ratio | our compile (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['batch']} | {r['ours_tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['ours_compile_s']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n_params, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
