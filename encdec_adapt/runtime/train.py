"""Gin entry point `train` of `encdec-adapt train` (cli/gin_runner.py runs it; `evaluate` and
`infer` live in infer.py).

    encdec-adapt train --gin_file=models/gemma_tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=1000

The training loop below is the whole story of a run: take the run directory's lock, build the
state (resume > warm start > fresh init), then step, log, evaluate and checkpoint until
`num_steps`. SIGTERM (preemption) and SIGINT stop at the next step boundary with a checkpoint
(exit 0 and 130). A step whose update is not finite is not applied (trainer.py); more than
`max_skipped_updates` of them in a row stop the run before anything is saved, naming the newest
checkpoint, which is finite like every checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import gin
import jax

from encdec_adapt.data import input_pipeline
from encdec_adapt.errors import ConfigError, InputError, StoppedBySignal, TrainingDiverged
from encdec_adapt.evaluation import evaluator as evaluation
from encdec_adapt.models import decoding
from encdec_adapt.models.base import BaseModel, summarize
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, entrypoints, optim, run_guard
from encdec_adapt.runtime.metrics_log import MetricsLogger
from encdec_adapt.runtime.trainer import Trainer
from encdec_adapt.storage import paths


def _tokens(model: BaseModel, local_batch: dict) -> int:
    """Tokens of the global batch (the model says what counts: target tokens, texts' tokens)."""
    return model.count_tokens(local_batch) * jax.process_count()


# Model settings that may change on resume: how the same function is computed, or the dropout
# regime; every other architecture setting must match the checkpoint's.
RESUMABLE_MODEL_SETTINGS = ("dropout_rate", "dtype", "attention_impl", "remat", "loss_chunk_tokens")


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}", v, out)
    else:
        out[prefix] = value


def run_settings(model: BaseModel, train_data) -> dict:
    """What a resume must match (flat name -> value): the model's architecture settings and the
    data fingerprint (kind, task or mixture, split, seed, batch size, feature lengths, converter,
    packing, ...)."""
    out: dict = {}
    _flat("model", model.config_dict(), out)
    out = {k: v for k, v in out.items() if k.rsplit("/", 1)[-1] not in RESUMABLE_MODEL_SETTINGS}
    data = {"kind": type(train_data).__name__}
    if dataclasses.is_dataclass(train_data):
        data.update(dataclasses.asdict(train_data))
    _flat("train_data", data, out)
    return out


def _write_config(model_dir: str, resumed_step: int | None) -> None:
    """config.gin of a fresh run; a resumed run keeps the run's config.gin and writes its own
    next to it when it differs (config.resume-<step>.gin)."""
    if jax.process_index() != 0:
        return
    path = paths.join(model_dir, "config.gin")
    text = gin.config_str()
    previous = None
    if paths.exists(path):
        previous = paths.read_text(path)
    if resumed_step is None:
        if previous is not None and previous != text:  # a start that never saved a step
            paths.move(path, paths.join(model_dir, f"config.replaced-{int(time.time())}.gin"))
        entrypoints.write_text(path, text)
    elif previous != text:
        entrypoints.write_text(paths.join(model_dir, f"config.resume-{resumed_step}.gin"), text)


def _initial_state(trainer, ckpt, data, model, model_dir, warm_start_from, settings, overrides):
    """(state, resumed step or None): the newest good checkpoint, else a fresh (warm) start."""
    restored = ckpt.restore_latest(trainer.abstract_state(), settings, overrides)
    if restored is not None:
        state, data_state, step = restored
        data.set_state(data_state)
        print(f"Resuming from step {step} of {ckpt.directory}", flush=True)
        return state, step
    state = trainer.init_state()
    # Warm start (fresh runs only): parameters from params checkpoints, nothing else.
    if warm_start_from:
        state = trainer.warm_start(state, warm_start_from, model.warm_start_subtree)
        print(f"Warm start: parameters from {warm_start_from}", flush=True)
    if model.teacher_checkpoint:
        state = trainer.warm_start(state, model.teacher_checkpoint, model.teacher_subtree)
        print(f"Teacher parameters from {model.teacher_checkpoint}", flush=True)
    return state, None


def _next_batch(data, train_data, step: int):
    """The next local batch; InputError when the data has ended (a last, partial batch is not
    trained on: every step is compiled for one batch size)."""
    rows = train_data.batch_size // jax.process_count()
    try:
        batch = next(data)
        if all(len(x) == rows for x in batch.values()):
            return batch
    except StopIteration:
        pass
    name = getattr(train_data, "task", type(train_data).__name__)
    raise InputError(
        f"train.train_data ({name}) ran out of batches at step {step}: training data must "
        "repeat (DataConfig.repeat=True, the default); the state of this step is saved"
    )


@gin.configurable(module="encdec_adapt", denylist=["stop_after"])
def train(
    *,
    model_dir: str = gin.REQUIRED,
    model: BaseModel = gin.REQUIRED,
    train_data=gin.REQUIRED,
    num_steps: int = gin.REQUIRED,
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),  # noqa: B008 - frozen
    mesh_rules: sharding.MeshRules = sharding.MeshRules(),  # noqa: B008 - frozen
    checkpoint: checkpoints.CheckpointConfig = checkpoints.CheckpointConfig(),  # noqa: B008
    seed: int = 0,
    log_every: int = 10,
    warm_start_from: str | None = None,
    eval_data=None,
    eval_every: int = 0,
    eval_batches: int | None = 10,
    eval_decode: decoding.DecodeConfig | None = None,
    peak_flops_per_device: float | None = None,
    tensorboard: bool = True,
    max_skipped_updates: int = 0,
    resume_overrides: Sequence[str] = (),
    stop_after: int | None = None,
) -> dict[str, float]:
    """Trains `model` on `train_data` for `num_steps` optimizer steps; returns the last metrics.

    Args:
      model_dir: checkpoints, logs and the gin config go here; an existing run is resumed.
        One trainer at a time: a second one is refused (MODEL_DIR/lock.json names the holder).
      model: the model API (e.g. @DecoderOnlyModel()).
      train_data: an input_pipeline.DataConfig (seqio) or SyntheticConfig.
      num_steps: total optimizer steps of the run (a resumed run continues up to it).
      optimizer, mesh_rules, checkpoint: see their classes.
      seed: initialisation and dropout seed.
      log_every: fetch, check and log the metrics of every this many steps; the metrics of a
        logged step are the ones of that step (tokens/s and step time average the steps since
        the previous log).
      warm_start_from: a params checkpoint (params_io format, e.g. from `import-hf`) whose
        parameters initialise a *fresh* run; ignored when resuming (the checkpoint wins).
      eval_data / eval_every / eval_batches: periodic evaluation (0 = never): loss metrics,
        and the score metric functions of a seqio eval task that has them (for an embedding
        model: the task's retrieval metrics over the eval batches' documents).
      eval_decode: decoding options for the eval task's predict metric functions (None: they
        do not run; decoding during training costs time).
      peak_flops_per_device: the accelerator's peak FLOP/s, for MFU (None: MFU not reported).
      max_skipped_updates: how many steps in a row may have a non-finite update (skipped, the
        state kept) before the run stops (0: stop at the first one, at the next log or save).
      resume_overrides: settings (names as the mismatch error gives them, e.g.
        "train_data/batch_size") allowed to differ from the checkpoint's on resume.
      stop_after: stop (with a checkpoint) after this many steps of *this* invocation; used to
        simulate preemption in tests. Not settable from gin.
    """
    entrypoints.require("train", model_dir=model_dir, num_steps=num_steps)
    paths.check(model_dir, "train.model_dir")
    entrypoints.check_positive("train.num_steps", num_steps)
    entrypoints.check_positive("train.log_every", log_every)
    if not isinstance(max_skipped_updates, int) or max_skipped_updates < 0:
        raise ConfigError(f"train.max_skipped_updates={max_skipped_updates!r} must be an int >= 0")
    if eval_data is not None and eval_every:
        input_pipeline.check_ends(eval_data, eval_batches, "periodic evaluation")
    data = input_pipeline.make_iterator(train_data)  # checks the task name first
    entrypoints.check_vocabulary(model, train_data, "train.train_data")
    if eval_data is not None and eval_every:
        entrypoints.check_vocabulary(model, eval_data, "train.eval_data")
    settings = run_settings(model, train_data)
    with run_guard.StopSignals() as signals, run_guard.RunLock(model_dir):
        mesh = mesh_rules.make_mesh()
        trainer = Trainer(model, optimizer, mesh, mesh_rules, seed=seed)
        # Opened only under the lock: the trainer's manager removes temporary directories.
        ckpt = checkpoints.Checkpointer(model_dir, checkpoint)
        logger = None
        try:
            state, resumed = _initial_state(
                trainer, ckpt, data, model, model_dir, warm_start_from, settings, resume_overrides
            )
            _write_config(model_dir, resumed)
            logger = MetricsLogger(model_dir, num_steps, tensorboard=tensorboard)
            loop = _Loop(trainer, ckpt, data, logger, settings, signals, max_skipped_updates)
            return loop.run(
                state,
                train_data=train_data,
                num_steps=num_steps,
                save_every=checkpoint.save_interval_steps,
                log_every=log_every,
                eval_args=(eval_data, eval_every, eval_batches, eval_decode, seed),
                flops=_flops_per_token(model, train_data),
                peak_flops=peak_flops_per_device,
                stop_after=stop_after,
            )
        finally:
            try:
                ckpt.close()
            finally:
                if logger is not None:
                    logger.close()


class _Loop:
    """The step loop of one `train` invocation: step, log, evaluate, checkpoint, stop."""

    def __init__(self, trainer, ckpt, data, logger, settings, signals, max_skipped):
        self.trainer, self.ckpt, self.data, self.logger = trainer, ckpt, data, logger
        self.settings, self.signals, self.max_skipped = settings, signals, max_skipped

    def _save(self, step: int, state) -> None:
        self.ckpt.save(step, state, self.data.get_state(), settings=self.settings, force=True)

    def _check_finite(self, step: int, m: dict) -> None:
        """Stops (nothing saved) when more than `max_skipped` updates in a row were not finite."""
        skipped = int(m["skipped_updates"])
        if skipped <= self.max_skipped:
            return
        self.ckpt.close()
        steps = self.ckpt.all_steps()
        where = f"step {steps[-1]} in {self.ckpt.directory}" if steps else "none"
        loss = float(m["loss_sum"]) / max(float(m["weight"]), 1e-9)
        raise TrainingDiverged(
            f"Non-finite update at step {step} ({skipped} in a row, more than "
            f"train.max_skipped_updates={self.max_skipped}; loss {loss:.6g}, grad norm "
            f"{float(m['grad_norm']):.6g}): stopping without saving. Last good checkpoint: "
            f"{where}."
        )

    def run(
        self,
        state,
        *,
        train_data,
        num_steps,
        save_every,
        log_every,
        eval_args,
        flops,
        peak_flops,
        stop_after,
    ):
        trainer, logger, model = self.trainer, self.logger, self.trainer.model
        step = first_step = int(state.step)
        sums: dict[str, float] = {}
        tokens, steps_logged, t_log = 0, 0, time.perf_counter()
        last: dict[str, float] = {}
        eval_data, eval_every, eval_batches, eval_decode, seed = eval_args
        # The stop flag is read once per step, below: reading it here as well would let a
        # signal that lands between the two reads end the loop without a save.
        if self.signals.agreed():  # stopped before the first step: nothing new to save
            return self._finish(step, num_steps, last)
        while step < num_steps:
            try:
                local = _next_batch(self.data, train_data, step)
            except InputError:
                self._save(step, state)
                raise
            tokens += _tokens(model, local)
            state, metrics = trainer.train_step(state, trainer.shard_batch(local))
            step += 1
            steps_logged += 1
            if step == first_step + 1:
                # The first step compiled: write what gin actually used, and start the clocks
                # of throughput and ETA after it.
                jax.block_until_ready(metrics)
                entrypoints.write_text(
                    paths.join(logger.model_dir, "operative_config.gin"),
                    gin.operative_config_str(),
                )
                logger.start(step)
                tokens, steps_logged, t_log = 0, 0, time.perf_counter()
            saving = step % save_every == 0 or step == num_steps
            stopping = self.signals.agreed() or (
                stop_after is not None and step - first_step >= stop_after
            )
            if step % log_every == 0 or saving or stopping:
                m = jax.device_get(metrics)
                self._check_finite(step, m)
                for k in ("loss_sum", "z_loss_sum", "kd_sum", "weight", "correct"):
                    if k in m:
                        sums[k] = sums.get(k, 0.0) + float(m[k])
                last = dict(
                    summarize(sums),
                    learning_rate=float(m["learning_rate"]),
                    grad_norm=float(m["grad_norm"]),
                )
                if int(m["skipped_updates"]):
                    last["skipped_updates"] = int(m["skipped_updates"])
                if steps_logged:  # throughput of the steps since the last log (not compiling)
                    elapsed = time.perf_counter() - t_log
                    last.update(step_time_s=elapsed / steps_logged, tokens_per_s=tokens / elapsed)
                    if flops and peak_flops:
                        achieved = flops * last["tokens_per_s"]
                        last["mfu"] = achieved / (peak_flops * jax.device_count())
                logger.write(step, last)
                logger.progress(step, last)
                sums, tokens, steps_logged, t_log = {}, 0, 0, time.perf_counter()
            if eval_data is not None and eval_every and step % eval_every == 0:
                logger.write(
                    step,
                    evaluation.run_eval(
                        trainer, state.params, eval_data, eval_batches, eval_decode, seed=seed
                    ),
                    "eval",
                )
                stopping = stopping or self.signals.agreed()  # a signal during the eval
            if saving or stopping:
                self._save(step, state)
            if stopping:
                break
        return self._finish(step, num_steps, last)

    def _finish(self, step: int, num_steps: int, last: dict) -> dict:
        self.ckpt.wait()
        if self.signals.received is not None:
            print(f"Stopping at step {step} ({self.signals.name}): checkpoint saved.", flush=True)
            if self.signals.exit_code:
                raise StoppedBySignal(
                    f"stopped by {self.signals.name} at step {step}; checkpoint saved in "
                    f"{self.ckpt.directory}",
                    self.signals.exit_code,
                )
        elif step < num_steps:
            print(f"Stopping at step {step}: checkpoint saved.", flush=True)
        if step >= num_steps and jax.process_index() == 0:
            print(f"Finished {num_steps} steps; checkpoints in {self.ckpt.directory}", flush=True)
        return last


def _flops_per_token(model: BaseModel, data_cfg) -> float | None:
    lengths = getattr(data_cfg, "task_feature_lengths", None)
    if lengths is None:
        lengths = {"targets": getattr(data_cfg, "length", 0)}
    try:
        return model.flops_per_token(dict(lengths))
    except NotImplementedError:
        return None
