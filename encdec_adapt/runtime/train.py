"""Gin entry point `train` of `encdec-adapt train` (cli/gin_runner.py runs it; `evaluate` and
`infer` live in infer.py).

    encdec-adapt train --gin_file=models/gemma_tiny.gin --gin_file=runs/pretrain.gin \
        --gin.MODEL_DIR=/tmp/run --gin.TRAIN_STEPS=1000

The training loop below is the whole story of a run: build the state (resume > warm start >
fresh init), then step, log, evaluate and checkpoint until `num_steps`. Preemption (SIGTERM)
saves a checkpoint and exits with code 0; a non-finite loss stops the run before it can be
checkpointed, so the newest checkpoint on disk is always a good one.
"""

from __future__ import annotations

import math
import os
import signal
import time

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from encdec_adapt.data import input_pipeline
from encdec_adapt.errors import TrainingDiverged
from encdec_adapt.evaluation import evaluator as evaluation
from encdec_adapt.models import decoding
from encdec_adapt.models.base import BaseModel, summarize
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, entrypoints, optim
from encdec_adapt.runtime.metrics_log import MetricsLogger
from encdec_adapt.runtime.trainer import Trainer


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. called from a test harness thread)
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """True when any process was asked to stop (all processes must save together)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))


def _tokens(model: BaseModel, local_batch: dict) -> int:
    """Tokens of the global batch (the model says what counts: target tokens, texts' tokens)."""
    return model.count_tokens(local_batch) * jax.process_count()


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
    stop_after: int | None = None,
) -> dict[str, float]:
    """Trains `model` on `train_data` for `num_steps` optimizer steps; returns the last metrics.

    Args:
      model_dir: checkpoints, logs and the gin config go here; an existing run is resumed.
      model: the model API (e.g. @DecoderOnlyModel()).
      train_data: an input_pipeline.DataConfig (seqio) or SyntheticConfig.
      num_steps: total optimizer steps of the run (a resumed run continues up to it).
      optimizer, mesh_rules, checkpoint: see their classes.
      seed: initialisation and dropout seed.
      log_every: fetch, check (NaN / Inf) and log the metrics of every this many steps; the
        metrics of a logged step are the ones of that step (tokens/s and step time average the
        steps since the previous log).
      warm_start_from: a params checkpoint (params_io format, e.g. from `import-hf`) whose
        parameters initialise a *fresh* run; ignored when resuming (the checkpoint wins).
      eval_data / eval_every / eval_batches: periodic evaluation (0 = never): loss metrics,
        and the score metric functions of a seqio eval task that has them (for an embedding
        model: the task's retrieval metrics over the eval batches' documents).
      eval_decode: decoding options for the eval task's predict metric functions (None: they
        do not run; decoding during training costs time).
      peak_flops_per_device: the accelerator's peak FLOP/s, for MFU (None: MFU not reported).
      stop_after: stop (with a checkpoint) after this many steps of *this* invocation; used to
        simulate preemption in tests. Not settable from gin.
    """
    entrypoints.require("train", model_dir=model_dir, num_steps=num_steps)
    entrypoints.check_positive("train.num_steps", num_steps)
    entrypoints.check_positive("train.log_every", log_every)
    data = input_pipeline.make_iterator(train_data)  # checks the task name first
    mesh = mesh_rules.make_mesh()
    trainer = Trainer(model, optimizer, mesh, mesh_rules, seed=seed)
    ckpt = checkpoints.Checkpointer(model_dir, checkpoint)
    entrypoints.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())

    restored = ckpt.restore_latest(trainer.abstract_state())
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
        print(f"Resuming from step {int(state.step)} of {ckpt.directory}", flush=True)
    else:
        state = trainer.init_state()
        # Warm start (fresh runs only): parameters from params checkpoints, nothing else.
        if warm_start_from:
            state = trainer.warm_start(state, warm_start_from, model.warm_start_subtree)
            print(f"Warm start: parameters from {warm_start_from}", flush=True)
        if model.teacher_checkpoint:
            state = trainer.warm_start(state, model.teacher_checkpoint, model.teacher_subtree)
            print(f"Teacher parameters from {model.teacher_checkpoint}", flush=True)
    step = int(state.step)
    last_good = ckpt.all_steps()[-1] if ckpt.all_steps() else None

    logger = MetricsLogger(model_dir, num_steps, tensorboard=tensorboard)
    flops = _flops_per_token(model, train_data)
    sums: dict[str, float] = {}
    tokens = 0
    t_log = time.perf_counter()
    steps_logged = 0
    last: dict[str, float] = {}
    first_step = step
    with _Preemption() as preemption:
        while step < num_steps:
            local = next(data)
            tokens += _tokens(model, local)
            state, metrics = trainer.train_step(state, trainer.shard_batch(local))
            step += 1
            steps_logged += 1
            if step == first_step + 1:
                # The first step compiled: write what gin actually used, and start the clocks
                # of throughput and ETA after it.
                jax.block_until_ready(metrics)
                entrypoints.write_text(
                    os.path.join(model_dir, "operative_config.gin"), gin.operative_config_str()
                )
                logger.start(step)
                tokens, steps_logged, t_log = 0, 0, time.perf_counter()
            saving = step % checkpoint.save_interval_steps == 0 or step == num_steps
            stopping = preemption.agreed() or (
                stop_after is not None and step - first_step >= stop_after
            )
            if step % log_every == 0 or saving or stopping:
                m = jax.device_get(metrics)
                for k in ("loss_sum", "z_loss_sum", "kd_sum", "weight", "correct"):
                    if k in m:
                        sums[k] = sums.get(k, 0.0) + float(m[k])
                loss = float(m["loss_sum"]) / max(float(m["weight"]), 1e-9)
                if not math.isfinite(loss):
                    ckpt.close()
                    logger.close()
                    where = f"step {last_good} in {ckpt.directory}" if last_good else "none"
                    raise TrainingDiverged(
                        f"Loss is {loss} at step {step}: stopping. Last good checkpoint: {where}."
                    )
                last = dict(
                    summarize(sums),
                    learning_rate=float(m["learning_rate"]),
                    grad_norm=float(m["grad_norm"]),
                )
                if steps_logged:  # throughput of the steps since the last log (not compiling)
                    elapsed = time.perf_counter() - t_log
                    last.update(step_time_s=elapsed / steps_logged, tokens_per_s=tokens / elapsed)
                    if flops and peak_flops_per_device:
                        achieved = flops * last["tokens_per_s"]
                        last["mfu"] = achieved / (peak_flops_per_device * jax.device_count())
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
            if (saving or stopping) and ckpt.save(step, state, data.get_state(), force=True):
                last_good = step
            if stopping:
                print(f"Stopping at step {step}: checkpoint saved.", flush=True)
                break
    ckpt.close()
    logger.close()
    if step >= num_steps and jax.process_index() == 0:
        print(f"Finished {num_steps} steps; checkpoints in {ckpt.directory}", flush=True)
    return last


def _flops_per_token(model: BaseModel, data_cfg) -> float | None:
    lengths = getattr(data_cfg, "task_feature_lengths", None)
    if lengths is None:
        lengths = {"targets": getattr(data_cfg, "length", 0)}
    try:
        return model.flops_per_token(dict(lengths))
    except NotImplementedError:
        return None
