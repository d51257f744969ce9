"""Alternated A/B timing for the benchmarks: each side in its own worker process, A B A B.

A side is a function `setup(**kwargs) -> Side` run in a fresh (spawned) worker process; the
parent warms both sides up, then asks A and B in turn for one timed run each, `pairs` times,
so that a neighbour's load hits both sides alike. Each worker reports its own peak memory:
the process's peak resident set size (VmHWM of /proc/self/status, reset through
/proc/self/clear_refs once the worker has imported its frameworks; `ru_maxrss` where that is
unavailable) and its growth over the RSS at that point, plus whatever the side measures itself
(JAX: XLA's `memory_analysis()` of the compiled step). One process per side keeps these apart.

    results = run_ab({"jax": (setup_a, kwargs_a), "torch": (setup_b, kwargs_b)}, pairs=5)
    print(format_table(results, ratio=("torch", "jax")))
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Side:
    """One benchmarked side, living in its worker process.

    run: one timed unit of work (a train step, a whole `generate`); returns any picklable
      output (e.g. the generated tokens) or None; it must block until the work is done.
    info: extra facts to report (e.g. {"memory_analysis_GiB": ...}).
    """

    run: Callable[[], Any]
    info: dict = dataclasses.field(default_factory=dict)


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM), MiB; None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    """Peak resident set size of this process, MiB: VmHWM, else ru_maxrss (KiB on Linux)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(conn, setup: Callable[..., Side], kwargs: dict) -> None:
    try:
        # The worker has imported the frameworks; its peak from here on is the side's own.
        _reset_peak()
        start_rss = _status_mib("VmRSS") or _peak_mib()
        side = setup(**kwargs)
        conn.send(("ready", None))
        while True:
            cmd = conn.recv()
            if cmd == "run":
                t0 = time.perf_counter()
                out = side.run()
                conn.send(("ok", (time.perf_counter() - t0, out)))
            elif cmd == "stats":
                peak = _peak_mib()
                stats = {"peak_rss_MiB": peak, "rss_growth_MiB": peak - start_rss, **side.info}
                conn.send(("ok", stats))
            else:
                conn.send(("ok", None))
                return
    except Exception:  # report the worker's traceback in the parent
        conn.send(("error", traceback.format_exc()))


class _Proc:
    def __init__(self, name: str, setup, kwargs):
        ctx = mp.get_context("spawn")  # JAX and torch thread pools do not survive fork
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, setup, kwargs), daemon=True)
        self.proc.start()

    def call(self, cmd: str):
        if cmd != "ready":
            self.conn.send(cmd)
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark side {self.name!r} failed:\n{value}")
        return value

    def close(self):
        try:
            self.conn.send("stop")
            self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=30)


@dataclasses.dataclass
class Result:
    times: list[float]
    outputs: list[Any]
    stats: dict

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def run_ab(sides: dict[str, tuple[Callable[..., Side], dict]], pairs: int = 5, warmup: int = 1):
    """Starts every side (one after the other, so their setups do not compete), runs `warmup`
    untimed runs of each, then `pairs` rounds of one timed run per side in the given order.
    Returns {name: Result}."""
    procs = {}
    try:
        for name, (setup, kwargs) in sides.items():
            procs[name] = _Proc(name, setup, kwargs)
            procs[name].call("ready")
        for _ in range(warmup):
            for p in procs.values():
                p.call("run")
        results = {name: Result([], [], {}) for name in procs}
        for _ in range(pairs):
            for name, p in procs.items():
                seconds, out = p.call("run")
                results[name].times.append(seconds)
                results[name].outputs.append(out)
        for name, p in procs.items():
            results[name].stats = p.call("stats")
        return results
    finally:
        for p in procs.values():
            p.close()


def pair_ratios(results: dict[str, Result], slow: str, fast: str) -> list[float]:
    """Per-round time ratios slow / fast (> 1: `fast` is faster)."""
    return [a / b for a, b in zip(results[slow].times, results[fast].times, strict=True)]


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """'median (min-max)'."""
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def load_line() -> str:
    """The 1-minute load average and core count, for the record."""
    try:
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
    except OSError:
        load = ["?"] * 3
    import os

    return f"load average {' '.join(load)} on {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit("bench_ab.py is a helper of bench_train.py and bench_decode.py")
