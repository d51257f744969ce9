"""Gin entry point `train`, and the `encdec-adapt train|eval|infer` CLI (`evaluate` and `infer`
live in infer.py).

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
import sys
import time

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from encdec_adapt.data import input_pipeline
from encdec_adapt.evaluation import evaluator as evaluation
from encdec_adapt.models import decoding
from encdec_adapt.models.base import BaseModel, summarize
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, entrypoints, optim
from encdec_adapt.runtime.metrics_log import MetricsLogger
from encdec_adapt.runtime.trainer import Trainer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


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


@gin.configurable(denylist=["stop_after"])
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


# ---------------------------------------------------------------------------------------- CLI

# command -> (module, gin entry point)
ENTRY_POINTS = {
    "train": ("encdec_adapt.runtime.train", "train"),
    "eval": ("encdec_adapt.runtime.infer", "evaluate"),
    "infer": ("encdec_adapt.runtime.infer", "infer"),
    "embed": ("encdec_adapt.runtime.embed", "embed"),
}


def gin_value(text: str) -> str:
    """A `--gin.KEY=VALUE` value as gin syntax: Python literals, @references, %macros and
    quoted strings pass through; anything else (e.g. a bare path) becomes a string."""
    import ast

    stripped = text.strip()
    if stripped[:1] in ("@", "%", "'", '"', "(", "[", "{"):
        return text
    try:
        ast.literal_eval(stripped)
        return text
    except (ValueError, SyntaxError):
        return repr(text)


def parse_flags(argv: list[str], command: str):
    """(argparse namespace, gin bindings) of a command line."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"encdec-adapt {command}",
        description=f"Runs the gin entry point `{ENTRY_POINTS[command][1]}`. Bindings are "
        "given as --gin.KEY=VALUE (repeatable), e.g. --gin.MODEL_DIR=/tmp/run "
        "--gin.train.num_steps=100.",
    )
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument(
        "--gin_search_path", action="append", default=[], help="where gin files are looked up"
    )
    parser.add_argument("--coordinator_address", help="host:port of process 0 (multi-process)")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument(
        "--distributed_auto",
        action="store_true",
        help="let JAX discover the cluster (TPU pods, SLURM)",
    )
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin.") :].split("=", 1)
            bindings.append(f"{key} = {gin_value(value)}")
        elif arg.startswith("--gin."):
            parser.error(f"{arg}: expected --gin.KEY=VALUE")
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("at least one --gin_file is required")
    return args, bindings


def locate_bindings(message: str, files: list[str], bindings: list[str]) -> list[str]:
    """'file:line: text' of the gin bindings a config error message names.

    Config classes name their fields as `Class.field=value` or `Invalid Class: field=value`.
    """
    import re

    names = set(re.findall(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)=", message))
    invalid = re.search(r"Invalid ([A-Za-z_]\w*): (.*)", message)
    if invalid:
        names |= {(invalid.group(1), f) for f in re.findall(r"\b(\w+)=", invalid.group(2))}
    found = []
    sources = [(f, _read_gin(f)) for f in files] + [("--gin", "\n".join(bindings))]
    for path, text in sources:
        for i, line in enumerate(text.splitlines(), 1):
            for cls, field in names:
                if re.match(rf"\s*([\w./]*/)?{cls}\.{field}\s*=", line):
                    found.append(f"{path}:{i}: {line.strip()}")
    return found


def _read_gin(path: str) -> str:
    for root in ["", *gin.config._LOCATION_PREFIXES]:  # gin has no public search-path getter
        full = os.path.join(root, path)
        if os.path.exists(full):
            with open(full) as f:
                return f.read()
    return ""


def run_command(command: str, argv: list[str], input_errors: tuple[type, ...] = ()) -> int:
    """Parses flags and gin, then calls the entry point; returns the exit code.

    Exit codes: 0 done (or preempted with a checkpoint), 1 loss diverged, 2 bad configuration.
    `input_errors`: exception types that always mean bad input (exit 2 with their message, e.g.
    a file:line), where other errors keep their traceback unless they name a gin binding.
    """
    from encdec_adapt.parallel import distributed

    args, bindings = parse_flags(argv, command)
    distributed.initialize(
        args.coordinator_address, args.num_processes, args.process_id, auto=args.distributed_auto
    )
    from encdec_adapt.nn import config as config_lib

    config_lib.add_gin_search_path(*args.gin_file, extra=args.gin_search_path)
    import importlib

    module, name = ENTRY_POINTS[command]
    entry = getattr(importlib.import_module(module), name)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, bindings)
    except Exception as e:  # gin's parse errors carry the file and line in their message
        print(f"encdec-adapt {command}: bad gin config: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        entry()
    except TrainingDiverged as e:
        print(f"encdec-adapt {command}: {e}", file=sys.stderr)
        return 1
    except input_errors as e:
        print(f"encdec-adapt {command}: {e}", file=sys.stderr)
        for w in locate_bindings(str(e), args.gin_file, bindings):
            print(f"  set at {w}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError, input_pipeline.UnknownTaskError) as e:
        where = locate_bindings(str(e), args.gin_file, bindings)
        if not where and not str(e).startswith(("Required bindings", "Invalid", "Unknown")):
            raise  # not a configuration problem: keep the traceback
        print(f"encdec-adapt {command}: bad configuration: {e}", file=sys.stderr)
        for w in where:
            print(f"  set at {w}", file=sys.stderr)
        return 2
    return 0


def train_main(argv: list[str]) -> int:
    return run_command("train", argv)


def eval_main(argv: list[str]) -> int:
    return run_command("eval", argv)


def infer_main(argv: list[str]) -> int:
    return run_command("infer", argv)
