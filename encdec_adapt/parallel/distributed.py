"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

On a TPU pod or a multi-GPU cluster each host runs the same command; JAX then sees every device
of the job (`jax.devices()`) and each process feeds its rows of the global batch: it reads only
its input shards (`local_shards`, data/seqio_iterator.py) and the trainer assembles the rows of
all processes into global arrays. `allgather_bytes` collects each process's data position for
the checkpoint. On one machine, several CPU processes talk through gloo collectives, which
exercises the same code path (tests/test_multiprocess.py).

Sources, first found wins: explicit arguments (CLI flags), then the environment variables
ENCDEC_COORDINATOR_ADDRESS, ENCDEC_NUM_PROCESSES, ENCDEC_PROCESS_ID. With none of them the run
stays single-process, unless `auto` is set, in which case JAX discovers the cluster itself (TPU
pods, SLURM, ...).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from encdec_adapt.errors import ConfigError

ENV_ADDRESS = "ENCDEC_COORDINATOR_ADDRESS"
ENV_NUM = "ENCDEC_NUM_PROCESSES"
ENV_ID = "ENCDEC_PROCESS_ID"
ENV_HEARTBEAT = "ENCDEC_HEARTBEAT_TIMEOUT_SECONDS"
# How long the coordination service waits for a silent process before it fails the job, so that
# the survivors of a dead host exit instead of waiting in a collective (JAX's default: 100 s).
HEARTBEAT_TIMEOUT_SECONDS = 30


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Joins the job; returns True when running multi-process.

    Must be called before anything touches the devices.
    """
    address = coordinator_address or os.environ.get(ENV_ADDRESS)
    num = num_processes if num_processes is not None else os.environ.get(ENV_NUM)
    pid = process_id if process_id is not None else os.environ.get(ENV_ID)
    if address is None and num is None and pid is None:
        if auto:
            jax.distributed.initialize()
            return jax.process_count() > 1
        return False
    missing = [
        n
        for n, v in (("coordinator_address", address), ("num_processes", num), ("process_id", pid))
        if v is None
    ]
    if missing:
        raise ConfigError(
            f"multi-process run needs coordinator_address, num_processes and process_id; "
            f"missing {missing} (flags --coordinator_address/--num_processes/--process_id or "
            f"env {ENV_ADDRESS}/{ENV_NUM}/{ENV_ID})"
        )
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        # CPU devices of different processes can only reduce across processes through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(num),
        process_id=int(pid),
        heartbeat_timeout_seconds=int(os.environ.get(ENV_HEARTBEAT, HEARTBEAT_TIMEOUT_SECONDS)),
    )
    return True


def local_rows(batch_size: int, index: int | None = None, count: int | None = None) -> slice:
    """This process's rows of a global batch of `batch_size` rows (the `index`-th of `count`
    equal slices; JAX's process index and count unless given); raises ConfigError when they do
    not divide it."""
    i, n = process_layout(index, count)
    if batch_size % n:
        raise ConfigError(f"global batch size {batch_size} is not divisible by {n} processes")
    per = batch_size // n
    return slice(i * per, (i + 1) * per)


def process_layout(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """(this process's index, number of processes): JAX's, unless given (tests simulate a
    process of a larger job by passing both)."""
    if (index is None) != (count is None):
        raise ValueError("pass both process_index and process_count, or neither")
    if index is None:
        return jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def local_shards(num_shards: int, index: int, count: int) -> range:
    """The input shards process `index` of `count` reads: the `index`-th of `count` equal
    contiguous runs of `range(num_shards)`, so that its rows of the global batch (shard k's rows
    follow shard k-1's) are its `local_rows`. ConfigError when `count` does not divide it."""
    if num_shards % count:
        raise ConfigError(
            f"{num_shards} input shards cannot be split evenly over {count} processes"
        )
    per = num_shards // count
    return range(index * per, (index + 1) * per)


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order, on every process (a collective: all processes
    must call it at the same point). One process: [data]."""
    if jax.process_count() == 1:
        return [data]
    from jax.experimental import multihost_utils  # lazy on purpose: only multi-process runs

    sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int64))
    sizes = np.asarray(sizes).reshape(-1)
    padded = np.zeros(max(1, int(sizes.max())), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [rows[i, : int(n)].tobytes() for i, n in enumerate(sizes)]
