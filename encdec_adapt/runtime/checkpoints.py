"""Training checkpoints: an Orbax CheckpointManager over the full train state and data position.

Layout of MODEL_DIR/checkpoints/<step>/:
  state/  Orbax tree of `TrainState` (step, params, optimizer state, RNG key, skipped updates)
  data/   JSON position of the batch iterator
  run/    JSON: the run's settings (model architecture, data fingerprint) and a digest of every
          array of the state, computed on the device before the save

Orbax writes each step under a temporary name and renames it when complete, so a process killed
mid-save leaves no step that looks finished (the trainer's manager removes the temporary
directory when it opens; readers never do). `restore_latest` tells three failures apart:
- mismatch: the checkpoint's tree, shapes or dtypes (from its metadata) or its settings differ
  from this run's: refused (CheckpointMismatch, exit 2, naming the first difference) before
  anything is read or moved;
- transient: a timeout, a connection or busy error: retried, never quarantined;
- corruption: metadata or arrays that cannot be read, or arrays whose digest differs from the one
  saved (a flipped byte, a truncated or missing chunk that reads back as zeros): the step is moved
  to MODEL_DIR/checkpoints_corrupt/<step>[.N] (never over an earlier copy), and the previous step
  is tried.

Warm starts (parameters only, e.g. from `import-hf`) are `params_io`'s business, not this module's;
`restore_run_params` reads the parameters of one step of a run (export, eval, infer, embed).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from encdec_adapt.errors import CheckpointError, ConfigError, MissingFileError
from encdec_adapt.storage import params_io, paths

log = logging.getLogger(__name__)


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how training checkpoints are written.

    Attributes:
      save_interval_steps: save every this many steps (and at the end, and on SIGTERM).
      keep: keep the newest `keep` checkpoints (None: all).
      async_save: write in a background thread while training continues.
    """

    save_interval_steps: int = 1000
    keep: int | None = 3
    async_save: bool = True

    def __post_init__(self):
        if not isinstance(self.save_interval_steps, int) or self.save_interval_steps < 1:
            raise ConfigError(
                f"CheckpointConfig.save_interval_steps={self.save_interval_steps!r} must be an "
                "int >= 1"
            )
        if self.keep is not None and (not isinstance(self.keep, int) or self.keep < 1):
            raise ConfigError(f"CheckpointConfig.keep={self.keep!r} must be None or an int >= 1")


class MissingCheckpointError(MissingFileError):
    """No training checkpoint (or not the step asked for); the message names the directory."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not fit this run (tree, shape, dtype or setting): nothing moved."""


class CorruptCheckpoint(Exception):
    """A step whose files cannot be read or whose arrays fail the digest check."""


# Errors worth retrying (storage that is briefly unavailable), by type and by the status words
# TensorStore / gRPC put in their messages.
TRANSIENT_TYPES = (TimeoutError, ConnectionError, InterruptedError, BlockingIOError)
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ENETDOWN, errno.ECONNRESET}
TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Temporarily unavailable")
RESOURCE_WORDS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
RETRIES = 3
RETRY_SECONDS = 1.0


def _transient(e: BaseException) -> bool:
    if isinstance(e, TRANSIENT_TYPES):
        return True
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
        return True
    return any(w in str(e) for w in TRANSIENT_WORDS)


def _resource(e: BaseException) -> bool:
    """Out of memory while restoring says nothing about the checkpoint: never quarantine."""
    return isinstance(e, MemoryError) or any(w in str(e) for w in RESOURCE_WORDS)


def _bits32(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 values (any dtype of 1, 2, 4 or 8 bytes)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()  # [..., 2] -> flat
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


def _leaf_digest(x: jax.Array) -> jax.Array:
    """sum_i bits_i * w_i mod 2^32 with odd weights w_i: any single changed bit changes the sum
    (an odd weight times 2^k is never 0 mod 2^32), and a run of zeros in place of data does too."""
    bits = _bits32(x)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32) ^ jnp.uint32(bits.size & 0xFFFFFFFF)


@jax.jit
def _digests(tree: Any) -> Any:
    return jax.tree.map(_leaf_digest, tree)


def state_digest(state: Any) -> dict[str, int]:
    """{leaf path: uint32 digest} of a train state (computed where the arrays live; all
    processes take part)."""
    tree = state._asdict() if hasattr(state, "_asdict") else state
    return {k: int(v) for k, v in params_io.flatten(jax.device_get(_digests(tree))).items()}


def _describe(leaf: Any) -> str:
    return f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"


def check_fits(stored: Any, expected: Any, where: str) -> None:
    """Raises CheckpointMismatch at the first leaf of `expected` (this run's abstract state)
    that `stored` (the checkpoint's metadata tree) lacks or holds with another shape or dtype,
    or the first leaf only `stored` has."""
    got, want = params_io.flatten(stored), params_io.flatten(expected)
    advice = (
        "The model or optimizer configuration changed since this run was saved: restore it, or "
        "train in a new MODEL_DIR. Nothing was moved."
    )
    for name, leaf in want.items():
        if name not in got:
            raise CheckpointMismatch(f"{where}: {name} is not in the checkpoint. {advice}")
        old = got[name]
        if tuple(old.shape) != tuple(leaf.shape) or np.dtype(old.dtype) != np.dtype(leaf.dtype):
            raise CheckpointMismatch(
                f"{where}: {name} is {_describe(old)} in the checkpoint, {_describe(leaf)} in "
                f"this run. {advice}"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointMismatch(
            f"{where}: the checkpoint has {extra[0]}, which this run does not ({len(extra)} in "
            f"all). {advice}"
        )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def check_settings(stored: dict, current: dict, where: str, allowed: tuple[str, ...]) -> None:
    """Raises CheckpointMismatch at the first setting (e.g. "train_data/batch_size") whose value
    differs between the checkpoint and this run, unless it is in `allowed`."""
    current = _jsonable(current)
    for name in sorted(set(stored) | set(current)):
        old, new = stored.get(name, "<unset>"), current.get(name, "<unset>")
        if old != new and name not in allowed:
            raise CheckpointMismatch(
                f"{where}: setting {name} is {old!r} in the checkpoint and {new!r} in this run; "
                f"resuming would not continue the same run. Restore the setting, train in a new "
                f"MODEL_DIR, or accept the change with --gin.train.resume_overrides=\"['{name}']\"."
                " Nothing was moved."
            )


class Checkpointer:
    """Saves and restores (train state, data iterator position, run record) under `model_dir`.

    `read_only`: open an existing run to read it (no directory created, no temporary directory
    cleaned up, no save); raises MissingCheckpointError when the run has no checkpoints/.
    """

    def __init__(self, model_dir: str, cfg: CheckpointConfig, *, read_only: bool = False):
        self.cfg = cfg
        self.read_only = read_only
        self.directory = paths.join(paths.absolute(model_dir), "checkpoints")
        self.corrupt_dir = paths.join(paths.absolute(model_dir), "checkpoints_corrupt")
        if read_only and not paths.isdir(self.directory):
            raise MissingCheckpointError(f"no training checkpoint in {self.directory}")
        self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.keep,
            save_interval_steps=self.cfg.save_interval_steps,
            enable_async_checkpointing=self.cfg.async_save,
            create=not self.read_only,
            cleanup_tmp_directories=not self.read_only,
            read_only=self.read_only,
        )
        self.manager = ocp.CheckpointManager(
            paths.epath_of(self.directory),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "run": ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state: Any, data_state: dict, *, settings: dict | None = None, force=False
    ) -> bool:
        """Starts saving (asynchronously if configured); True if a save was started.

        Without `force`, only steps on the save interval are written. `settings` (flat name ->
        JSON value) are what a resume must match (`check_settings`).
        """
        if force and step in self.manager.all_steps():
            return False
        if not force and not self.manager.should_save(step):
            return False
        run = {"settings": _jsonable(settings or {}), "digest": state_digest(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            data=ocp.args.JsonSave(data_state),
            run=ocp.args.JsonSave(run),
        )
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def _retrying(self, what: str, read):
        """`read()`, retried on transient errors; CorruptCheckpoint on any other read error."""
        for attempt in range(RETRIES):
            try:
                return read()
            except CorruptCheckpoint:
                raise
            except Exception as e:
                if _resource(e):
                    raise
                if not _transient(e):
                    raise CorruptCheckpoint(f"{type(e).__name__}: {_first_line(e)}") from e
                if attempt == RETRIES - 1:
                    raise CheckpointError(
                        f"could not read {what} after {RETRIES} tries ({type(e).__name__}: "
                        f"{_first_line(e)}); a storage error, not a damaged checkpoint: nothing "
                        "was moved"
                    ) from e
                log.warning("reading %s failed (%s); retrying", what, e)
                time.sleep(RETRY_SECONDS * 2**attempt)
        raise AssertionError("unreachable")

    def _run_record(self, step: int) -> dict | None:
        if not paths.isdir(paths.join(self.directory, str(step), "run")):
            return None  # saved before run records existed: no settings or digests to check
        return self._retrying(
            f"the run record of step {step}",
            lambda: dict(
                self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))[
                    "run"
                ]
            ),
        )

    def check(
        self, step: int, abstract_state: Any, settings: dict | None, allowed=()
    ) -> dict | None:
        """Checks that `step` fits this run (metadata, and `settings` unless None; nothing read
        but metadata): raises CheckpointMismatch or CorruptCheckpoint; returns the step's run
        record."""
        where = f"checkpoint {self.directory}/{step}"
        meta = self._retrying(
            f"the metadata of step {step}", lambda: self.manager.item_metadata(step)["state"]
        )
        if meta is None:
            raise CorruptCheckpoint("no state metadata")
        check_fits(meta, abstract_state._asdict(), where)
        record = self._run_record(step)
        if record is not None and settings is not None:
            check_settings(record.get("settings", {}), settings, where, tuple(allowed))
        return record

    def restore(self, step: int, abstract_state: Any, record: dict | None = None):
        """(train state laid out as `abstract_state`'s shardings, data position) of `step`;
        CorruptCheckpoint when a read fails or an array's digest differs from the saved one."""

        def read():
            return self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state._asdict()),
                    data=ocp.args.JsonRestore(),
                ),
            )

        restored = self._retrying(f"step {step}", read)
        state = type(abstract_state)(**restored["state"])
        if record is not None and record.get("digest"):
            digest = state_digest(state)
            bad = [k for k, v in record["digest"].items() if digest.get(k) != v]
            if bad:
                raise CorruptCheckpoint(
                    f"{len(bad)} arrays differ from their saved digest, e.g. {bad[0]}"
                )
        return state, dict(restored["data"])

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters of `step` (default: the newest), laid out as `abstract_params`
        (ShapeDtypeStructs with shardings): evaluation and inference need no optimizer state,
        so any optimizer configuration reads any training checkpoint."""
        steps = self.all_steps()
        if not steps:
            raise MissingCheckpointError(f"no training checkpoint in {self.directory}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise MissingCheckpointError(f"step {step} is not in {self.directory} (steps: {steps})")
        item = {"params": abstract_params}
        # A partial restore needs the PyTree handler, not the Standard one `self.manager` has
        # for the state: a second, read-only manager over the same directory.
        reader = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                create=False, cleanup_tmp_directories=False, read_only=True
            ),
            item_names=("state",),
        )
        try:
            restored = reader.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    )
                ),
            )
        finally:
            reader.close()
        return restored["state"]["params"]

    def restore_latest(
        self, abstract_state: Any, settings: dict | None = None, allowed=()
    ) -> tuple[Any, dict, int] | None:
        """(state, data position, step) of the newest good checkpoint, or None when there is none.

        A step that does not fit this run raises CheckpointMismatch (nothing moved); a corrupt
        step is quarantined and the previous step tried. `settings` None: not compared.
        """
        while True:
            steps = self.all_steps()
            if not steps:
                return None
            step = steps[-1]
            try:
                record = self.check(step, abstract_state, settings, allowed)
                state, data = self.restore(step, abstract_state, record)
                corrupt = None
            except CorruptCheckpoint as e:
                corrupt = e
            if not _agree_corrupt(corrupt is not None, step):
                return state, data, step
            self._quarantine(step, corrupt or CorruptCheckpoint("on another process"), steps[:-1])

    def _quarantine(self, step: int, error: Exception, remaining: list[int]) -> None:
        fallback = f"step {remaining[-1]}" if remaining else "a fresh start (no older checkpoint)"
        target = _free_name(paths.join(self.corrupt_dir, str(step)))
        msg = (
            f"Checkpoint {self.directory}/{step} is damaged ({str(error)[:300]}); moving it to "
            f"{target} and resuming from {fallback}."
        )
        log.warning(msg)
        print(f"WARNING: {msg}", flush=True)
        self.manager.close()
        if jax.process_index() == 0:
            paths.makedirs(self.corrupt_dir)
            paths.move(paths.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self._open()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ...: the first that does not exist (an earlier quarantined
    copy of the same step is never replaced)."""
    candidate, n = path, 0
    while paths.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _agree_corrupt(local: bool, step: int) -> bool:
    """Whether any process found `step` corrupt (every process must quarantine together)."""
    if jax.process_count() == 1:
        return local
    flags = multihost_utils.process_allgather(np.asarray(int(local), np.int32))
    return bool(np.any(flags))


def restore_run_params(
    model_dir: str, abstract_params: Any, step: int | None = None
) -> tuple[Any, int]:
    """(parameters, step) of `step` (default: the newest) of the training run in `model_dir`.

    The run's checkpoints are opened read-only and closed again; only the parameters are read,
    laid out as `abstract_params` (ShapeDtypeStructs with shardings, e.g.
    `Trainer.abstract_state().params`), so any optimizer configuration reads any run.
    Raises MissingCheckpointError (no checkpoint, or no such step).
    """
    ckpt = Checkpointer(model_dir, CheckpointConfig(async_save=False), read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise MissingCheckpointError(f"no training checkpoint in {ckpt.directory}")
        step = steps[-1] if step is None else step
        return ckpt.restore_params(abstract_params, step), step
    finally:
        ckpt.close()
