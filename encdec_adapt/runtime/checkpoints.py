"""Training checkpoints: an Orbax CheckpointManager over the full train state and data position.

Layout: MODEL_DIR/checkpoints/<step>/state (Orbax tree of `TrainState`: step, params, optimizer
state, RNG key) and MODEL_DIR/checkpoints/<step>/data (JSON position of the batch iterator).

Orbax writes each step under a temporary name and renames it when complete, so a process killed
mid-save leaves no step that looks finished (the temporary directory is removed when the next
manager opens). A finished step can still be damaged afterwards (disk full, a file removed by
hand, a copy interrupted): `restore_latest` then moves the bad step aside to
MODEL_DIR/checkpoints_corrupt/<step>, says so, and restores the previous good step.

Warm starts (parameters only, e.g. from `import-hf`) are `params_io`'s business, not this module's;
`restore_run_params` reads the parameters of one step of a run (export, eval, infer, embed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from encdec_adapt.errors import ConfigError, MissingFileError

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


class Checkpointer:
    """Saves and restores (train state, data iterator position) under `model_dir`.

    `read_only`: open an existing run to read it (no directory created, no temporary directory
    cleaned up, no save); raises MissingCheckpointError when the run has no checkpoints/.
    """

    def __init__(self, model_dir: str, cfg: CheckpointConfig, *, read_only: bool = False):
        self.cfg = cfg
        self.read_only = read_only
        self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
        self.corrupt_dir = os.path.join(os.path.abspath(model_dir), "checkpoints_corrupt")
        if read_only and not os.path.isdir(self.directory):
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
            self.directory, options=options, item_names=("state", "data")
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving (asynchronously if configured); True if a save was started.

        Without `force`, only steps on the save interval are written.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            data=ocp.args.JsonSave(data_state),
        )
        if force and step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=args, force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(train state laid out as `abstract_state`'s shardings, data position) of `step`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state._asdict()),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = type(abstract_state)(**restored["state"])
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
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,
                )
            ),
        )
        return restored["state"]["params"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable checkpoint, or None when there is none.

        A step that fails to restore is moved to `checkpoints_corrupt/` (with a warning naming
        it and the error) and the previous step is tried.
        """
        while True:
            steps = self.all_steps()
            if not steps:
                return None
            step = steps[-1]
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # any read failure means a bad checkpoint
                self._quarantine(step, e, steps[:-1])

    def _quarantine(self, step: int, error: Exception, remaining: list[int]) -> None:
        fallback = f"step {remaining[-1]}" if remaining else "a fresh start (no older checkpoint)"
        msg = (
            f"Checkpoint {self.directory}/{step} is unreadable "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); moving it to "
            f"{self.corrupt_dir}/{step} and resuming from {fallback}."
        )
        log.warning(msg)
        print(f"WARNING: {msg}", flush=True)
        self.manager.close()
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_dir, exist_ok=True)
            target = os.path.join(self.corrupt_dir, str(step))
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self._open()


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
