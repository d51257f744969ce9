"""UL2-mixture input throughput vs what the benchmark training config consumes.

    python scripts/bench_data.py [--seconds 20] [--task stdlib_ul2] [--no-pack]

Produces packed encoder-decoder batches (batch 8, inputs 512, targets 128) of the UL2 task on the
embedded corpus and reports tokens/s: token slots (batch x (512 + 128), what the model consumes)
and non-padding tokens. The consumption reference is the issue's benchmark config, an ~80M
parameter encoder-decoder at the same batch shape, whose step time is ESTIMATED as
6 * params * tokens FLOPs at the float32 matmul rate MEASURED here with JAX (no encoder-decoder
model is timed). Goal: production >= 10x consumption.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARAMS = 80e6
BATCH, INPUTS, TARGETS = 8, 512, 128


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Measured float32 matmul rate of JAX on this machine (GFLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def produce(task: str, seconds: float, pack: bool) -> dict:
    import encdec_adapt.tasks  # noqa: F401
    from encdec_adapt.data import feature_converters, registry

    ds = registry.get_dataset(
        task,
        {"inputs": INPUTS, "targets": TARGETS},
        feature_converters.EncDecConverter(pack=pack),
        batch_size=BATCH,
        seed=0,
        num_epochs=None,
    )
    it = ds.as_numpy_iterator()
    for _ in range(5):  # pipeline start-up: graph tracing, corpus opening, tokenizer loading
        next(it)
    batches = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = next(it)
        batches += 1
        tokens += int((b["encoder_input_tokens"] != 0).sum() + b["decoder_loss_weights"].sum())
    elapsed = time.perf_counter() - start
    return {
        "batches_per_s": batches / elapsed,
        "slots_per_s": batches * BATCH * (INPUTS + TARGETS) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "fill": tokens / (batches * BATCH * (INPUTS + TARGETS)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="stdlib_ul2")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-pack", action="store_true")
    args = parser.parse_args()

    gflops = matmul_gflops()
    step_flops = 6 * PARAMS * BATCH * (INPUTS + TARGETS)
    step_s = step_flops / (gflops * 1e9)
    consumed = BATCH * (INPUTS + TARGETS) / step_s
    produced = produce(args.task, args.seconds, pack=not args.no_pack)
    ratio = produced["slots_per_s"] / consumed

    print(f"machine: {os.cpu_count()} CPU cores")
    print(f"input pipeline ({args.task}, packed={not args.no_pack}, batch {BATCH}, "
          f"inputs {INPUTS}, targets {TARGETS}):")  # fmt: skip
    print(f"  {produced['batches_per_s']:.2f} batches/s = {produced['slots_per_s']:,.0f} token "
          f"slots/s, {produced['tokens_per_s']:,.0f} non-pad tokens/s "
          f"(fill {produced['fill']:.0%})")  # fmt: skip
    print("training consumption (ESTIMATED step time, measured matmul rate):")
    print(f"  ~{PARAMS / 1e6:.0f}M-param encoder-decoder, 6*N*T = {step_flops / 1e12:.2f} TFLOP "
          f"per step at {gflops:.0f} GFLOP/s (measured float32 matmul) -> {step_s:.1f} s/step "
          f"-> {consumed:,.0f} token slots/s")  # fmt: skip
    verdict = "OK (>= 10x)" if ratio >= 10 else "BELOW the 10x goal"
    print(f"input / consumption = {ratio:,.1f}x  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
