"""Greedy decoding speed: encdec_adapt vs transformers' T5Gemma `generate`, same weights.

A random T5Gemma of the benchmark config is built in transformers, imported with `import-hf`, and
both sides decode the same inputs for exactly `--new_tokens` tokens (EOS disabled) with their
KV caches, each in its own worker process (`bench_ab.py`): after a warm-up run each (ours:
compilation + one run), whole `generate` calls alternate A B A B for `--pairs` rounds. The
script asserts that both sides produce the same token ids in every round. Reported per batch
size: generated tokens per second (batch * new_tokens / seconds) at the median run with the
min-max, the median of the per-round speed ratios, our compile time, and each side's peak
memory (the worker's peak RSS and its growth, from VmHWM; ours also XLA's
`memory_analysis()` of the compiled `generate`).

    python scripts/bench_decode.py                      # batch 1 and 16, prints a markdown table
    python scripts/bench_decode.py --json results.json
    python scripts/bench_decode.py --small --pairs 2    # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_ab
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
SMALL = dict(MODULE, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
START_ID = 2  # HF T5Gemma's decoder start (BOS)
GIB = 2**30


def build(tmp: str, module: dict = MODULE) -> None:
    """A random HF T5Gemma saved under tmp/hf and imported to our checkpoint under tmp/ckpt."""
    hf_cfg = transformers.T5GemmaConfig(encoder=module, decoder=module, attn_implementation="eager")
    torch.manual_seed(0)
    torch_model = transformers.T5GemmaForConditionalGeneration(hf_cfg).eval()
    torch_model.save_pretrained(os.path.join(tmp, "hf"))
    import_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"))


def load_ours(tmp: str) -> EncoderDecoder:
    _, config = params_io.read_model_json(os.path.join(tmp, "ckpt"))
    model = EncoderDecoder(EncoderDecoderConfig.from_dict(config), rngs=nnx.Rngs(0))
    params_io.load_into(model, os.path.join(tmp, "ckpt"))
    return model


def setup_ours(tmp: str, tokens: np.ndarray, new_tokens: int) -> bench_ab.Side:
    """Our jitted `generate` (encode, cross K/V and prefill once, then one while loop)."""
    model = load_ours(tmp)
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
    compiled = generate.lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = (
        mem.temp_size_in_bytes
        + mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )

    def run():
        return np.asarray(compiled(state, x))

    return bench_ab.Side(run, {"compile_s": compile_s, "memory_analysis_GiB": xla_bytes / GIB})


def setup_hf(tmp: str, tokens: np.ndarray, new_tokens: int) -> bench_ab.Side:
    """transformers `generate` (greedy, KV cache, eager attention, no_grad)."""
    torch_model = transformers.T5GemmaForConditionalGeneration.from_pretrained(
        os.path.join(tmp, "hf"), attn_implementation="eager"
    ).eval()
    ids = torch.from_numpy(tokens.astype(np.int64))
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        decoder_start_token_id=START_ID,
        pad_token_id=0,
    )

    def run():
        with torch.no_grad():
            out = torch_model.generate(ids, **kwargs)
        return out[:, 1:].numpy()  # without the decoder start token

    return bench_ab.Side(run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_sizes", default="1,16")
    p.add_argument("--input_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=5, help="alternated A B rounds (timed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side")
    p.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    module = SMALL if args.small else MODULE

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, module)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(load_ours(tmp), nnx.Param)))
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            tokens = np.random.default_rng(0).integers(
                3, module["vocab_size"], (batch, args.input_len)
            )
            kwargs = {"tmp": tmp, "tokens": tokens, "new_tokens": args.new_tokens}
            res = bench_ab.run_ab(
                {"ours": (setup_ours, kwargs), "hf": (setup_hf, kwargs)},
                pairs=args.pairs,
                warmup=args.warmup,
            )
            for i, (a, b) in enumerate(zip(res["ours"].outputs, res["hf"].outputs, strict=True)):
                if not np.array_equal(a, b):
                    raise AssertionError(f"batch {batch}, round {i}: generated tokens differ")
            generated = batch * args.new_tokens
            rows.append(
                {
                    "batch": batch,
                    "ours_times": res["ours"].times,
                    "hf_times": res["hf"].times,
                    "ours_tokens_per_s": [generated / t for t in res["ours"].times],
                    "hf_tokens_per_s": [generated / t for t in res["hf"].times],
                    "speedup_per_round": bench_ab.pair_ratios(res, "hf", "ours"),
                    "ours_stats": res["ours"].stats,
                    "hf_stats": res["hf"].stats,
                }
            )
    print(
        f"T5Gemma {n_params / 1e6:.0f}M params (encoder + decoder), inputs {args.input_len}, "
        f"{args.new_tokens} new tokens, greedy (same token ids asserted), "
        f"jax {jax.__version__} / torch {torch.__version__}, {bench_ab.load_line()}"
    )
    print(
        f"{args.pairs} alternated rounds after {args.warmup} warm-up run(s) per side; "
        "tokens/s: median (min-max); memory: peak RSS of each side's worker (its growth)"
    )
    print(
        "| batch | encdec_adapt tokens/s | transformers tokens/s | ratio per round | "
        "our compile (s) | our memory | transformers memory |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        o, h = r["ours_stats"], r["hf_stats"]
        print(
            f"| {r['batch']} | {bench_ab.spread(r['ours_tokens_per_s'], '{:.1f}')} "
            f"| {bench_ab.spread(r['hf_tokens_per_s'], '{:.1f}')} "
            f"| {bench_ab.spread(r['speedup_per_round'], '{:.2f}')}x | {o['compile_s']:.1f} "
            f"| RSS {o['peak_rss_MiB']:.0f} MiB (+{o['rss_growth_MiB']:.0f}); "
            f"XLA {o['memory_analysis_GiB'] * 1024:.0f} MiB "
            f"| RSS {h['peak_rss_MiB']:.0f} MiB (+{h['rss_growth_MiB']:.0f}) |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n_params, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
