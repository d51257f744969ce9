"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

On a TPU pod or a multi-GPU cluster each host runs the same command; JAX then sees every device
of the job (`jax.devices()`) and each process feeds its rows of the global batch
(`input_pipeline`). On one machine, several CPU processes talk through gloo collectives, which
exercises the same code path (tests/test_multiprocess.py).

Sources, first found wins: explicit arguments (CLI flags), then the environment variables
ENCDEC_COORDINATOR_ADDRESS, ENCDEC_NUM_PROCESSES, ENCDEC_PROCESS_ID. With none of them the run
stays single-process, unless `auto` is set, in which case JAX discovers the cluster itself (TPU
pods, SLURM, ...).
"""

from __future__ import annotations

import os

import jax

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


def local_rows(batch_size: int) -> slice:
    """This process's rows of a global batch of `batch_size` rows (the `process_index()`-th of
    `process_count()` equal slices); raises ConfigError when they do not divide it."""
    n, i = jax.process_count(), jax.process_index()
    if batch_size % n:
        raise ConfigError(f"global batch size {batch_size} is not divisible by {n} processes")
    per = batch_size // n
    return slice(i * per, (i + 1) * per)
