"""Where the train step's time goes: a jax.profiler trace of bench_train's step, summed per op.

    python scripts/profile_train.py                 # bench_train's config, 2 profiled steps
    python scripts/profile_train.py --small --steps 1
    python scripts/profile_train.py --hlo_dir /tmp/hlo   # also dump the optimized HLO

Runs `Trainer.compile_step` on bench_train's model and batch (same config, AdamW, one CPU
device), warms up, then traces `--steps` steps with `jax.profiler.trace` (XLA:CPU records one
event per executed thunk when `--xla_cpu_enable_xprof_traceme` is set, which this script does
before importing JAX). The perfetto trace is read back and the thunks' durations are summed per
op name (numeric suffixes dropped, so `dot.12` and `dot.3` add up) and per kind: matrix
multiplies (`dot`, `convolution` and the XNNPACK `ynn` fusions that hold them), other fusions,
copies and the rest. With two threads a thunk's time can overlap another's; the table also
gives the wall time per step. The FLOP count of each executable is XLA's `cost_analysis()`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train
import jax

# Events of the runtime around the thunks, not ops of the step.
RUNTIME = re.compile(
    r"^(\$|end: |PjitFunction|ThreadpoolListener|CommonPjRt|ParseArguments|Handle |Allocate|"
    r"Wait for|ThunkExecutor|SlinkyThreadPool|PythonRefManager|TfrtCpu|PjRt)"
)


def kind(name: str) -> str:
    if name.startswith(("dot", "convolution", "ynn", "custom-call")):
        return "matmul / XNNPACK / library call"
    if "fusion" in name:
        return "other fusions (elementwise, reductions)"
    if name.startswith("copy") or name.startswith("transpose"):
        return "copies and transposes"
    return "other"


def op_times(trace_dir: str, instances: bool = False) -> dict[str, float]:
    """{op name: summed seconds} of the thunks in the trace (`instances`: per HLO instruction,
    `dot.12` apart from `dot.3`)."""
    path = sorted(
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    )
    with gzip.open(path[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or RUNTIME.match(e.get("name", "")):
            continue
        name = e["name"] if instances else re.sub(r"\.\d+$", "", e["name"])
        per_op[name] += e.get("dur", 0) / 1e6
    return dict(per_op)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hlo_dir", default=None, help="also write each executable's optimized HLO")
    p.add_argument(
        "--instances", type=int, default=0, help="also list the N slowest HLO instructions"
    )
    args = p.parse_args(argv)
    if args.small:
        args.inputs, args.targets = min(args.inputs, 64), min(args.targets, 16)
    cfg = bench_train.bench_config(args.small)
    t = bench_train.bench_trainer(cfg)
    state = t.init_state()
    batch = t.shard_batch(bench_train.make_batch(cfg, args.batch, args.inputs, args.targets))
    step = t.compile_step(state, batch)
    parts = {"gradients": step.gradients, "verdict": step.verdict}
    parts.update({f"apply{i}": a for i, a in enumerate(step.apply)})
    for name, exe in parts.items():
        cost = exe.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print(f"{name}: XLA cost analysis {cost.get('flops', 0) / 1e9:,.1f} GFLOP")
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            with open(os.path.join(args.hlo_dir, f"{name}.hlo.txt"), "w") as f:
                f.write(exe.as_text())
    hlo = "\n".join(exe.as_text() for exe in parts.values())
    state, m = step(state, batch)  # warm-up
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, m = step(state, batch)
                jax.block_until_ready(m)
        wall = (time.perf_counter() - t0) / args.steps
        per_op = op_times(tmp)
        per_instance = op_times(tmp, instances=True) if args.instances else {}
    total = sum(per_op.values()) / args.steps
    print(
        f"{args.steps} step(s): wall {wall:.3f} s per step, thunks {total:.3f} s per step "
        f"(summed over threads)"
    )
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, sec in per_op.items():
        by_kind[kind(name)] += sec / args.steps
    print("| kind | s per step | share of thunk time |")
    print("|---|---:|---:|")
    for k, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {sec:.3f} | {sec / total:.1%} |")
    print(f"\n| op (top {args.top}) | s per step | share |")
    print("|---|---:|---:|")
    for name, sec in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name} | {sec / args.steps:.3f} | {sec / args.steps / total:.1%} |")
    if per_instance:
        print(f"\n| instruction (top {args.instances}) | s per step | shape and source |")
        print("|---|---:|---|")
        top = sorted(per_instance.items(), key=lambda kv: -kv[1])[: args.instances]
        for name, sec in top:
            print(f"| {name} | {sec / args.steps:.3f} | {describe(hlo, name)} |")
    return 0


def describe(hlo: str, name: str) -> str:
    """The result shape and the JAX op that made an HLO instruction, from the HLO text."""
    m = re.search(rf"%{re.escape(name)} = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
    return f"{m.group(1)} {m.group(2)}" if m else "?"


if __name__ == "__main__":
    sys.exit(main())
