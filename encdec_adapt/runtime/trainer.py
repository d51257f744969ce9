"""The train state and the jitted, sharded train / eval steps.

The whole training state is one pytree (`TrainState`: step, params, optimizer state, RNG key) of
global jax.Arrays laid out on a device mesh by the logical-axis rules of `sharding.py`. The
network's structure (the nnx GraphDef) is static and closed over; parameters travel as the nested
dict of `nnx.to_pure_dict`, which is also what checkpoints store.

`train_step` runs a few jits with explicit in/out shardings one after the other
(`CompiledStep`): the gradients, the verdict on their update, then the update with the state
donated, so XLA overwrites parameters and optimizer state in place.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from encdec_adapt.errors import ConfigError
from encdec_adapt.models.base import BaseModel
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim
from encdec_adapt.storage import params_io, paths

PyTree = Any


class TrainState(NamedTuple):
    """step: int32 scalar (optimizer steps taken); params: nested dict of arrays;
    opt_state: the optax state; rng: uint32[2] key, folded with the step for dropout;
    skipped: int32 scalar, consecutive steps whose update was not finite (and was not applied)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    skipped: jax.Array


def batch_spec(mesh: Mesh, rules: sharding.MeshRules, shape: tuple[int, ...]) -> PartitionSpec:
    """Rows over the batch axes (data, fsdp), everything else replicated."""
    axes = ("activation_batch",) + (None,) * (len(shape) - 1)
    return sharding.logical_to_spec(axes, shape, mesh, rules)


def _split_micro(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B / n, ...], micro-batch i = rows i, n + i, 2n + i, ...

    Interleaving (not contiguous blocks) keeps every micro-batch spread over all data shards, so
    no device idles while others work.
    """
    if x.shape[0] % n:
        raise ConfigError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


class CompiledStep:
    """A compiled train step: `step(state, batch) -> (new state, metric sums)`, `state` donated.

    Executables run one after the other (`Trainer.compile_step`): the gradients, the verdict
    on their update, then the update applied or skipped on that verdict, writing over the
    donated state. `memory()` combines their footprints."""

    def __init__(self, mesh, rules, inputs_bytes: int, gradients, verdict, apply):
        self.mesh, self.rules, self.inputs_bytes = mesh, rules, inputs_bytes
        self.gradients, self.verdict, self.apply = gradients, verdict, apply

    def __call__(self, state: TrainState, batch: dict[str, jax.Array]):
        with sharding.use_mesh(self.mesh, self.rules):
            grads, metrics, ok = self.gradients(state, batch)
            finite = self.verdict(state, grads, ok)
            for part in self.apply:
                state, more = part(state, grads, finite)
                metrics.update(more)
        return state, metrics

    def memory(self) -> dict[str, int]:
        """Bytes from XLA's compiled memory analysis: `state_and_batch` (the step's inputs),
        `temporaries` (the most held beyond them at once: the gradient part's scratch and
        outputs, or the gradients plus a later part's scratch and new outputs) and `peak`."""
        g = self.gradients.memory_analysis()
        grads = g.output_size_in_bytes
        held = [g.temp_size_in_bytes + grads]
        for part in (self.verdict, *self.apply):
            m = part.memory_analysis()
            held.append(
                grads + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            )
        return {
            "state_and_batch": self.inputs_bytes,
            "temporaries": max(held),
            "peak": self.inputs_bytes + max(held),
        }


class Trainer:
    """Builds the sharded train state of a model and compiles its steps.

    Args:
      model: the model API (`models.DecoderOnlyModel`, ...).
      optimizer: an `optim.OptimizerConfig`.
      mesh, rules: where the state lives (`sharding.MeshRules.make_mesh`).
      seed: parameter init and dropout RNG seed.
    """

    def __init__(
        self,
        model: BaseModel,
        optimizer: optim.OptimizerConfig,
        mesh: Mesh,
        rules: sharding.MeshRules,
        seed: int = 0,
    ):
        self.model, self.opt_cfg, self.mesh, self.rules, self.seed = (
            model,
            optimizer,
            mesh,
            rules,
            seed,
        )
        model = model.on_mesh(mesh, rules)  # e.g. the contrastive loss over the global batch
        self.model = model
        frozen = tuple(model.frozen_patterns)
        if frozen:  # e.g. a distillation teacher: in the state, never updated
            optimizer = dataclasses.replace(optimizer, freeze=optimizer.freeze + frozen)
            self.opt_cfg = optimizer
        abstract = nnx.eval_shape(lambda: model.build(nnx.Rngs(seed)))
        self.graphdef, abstract_params, self.rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(self.rest):
            raise ValueError(
                f"{type(abstract).__name__} has non-parameter state "
                f"{list(nnx.to_flat_state(self.rest))[:3]}: the trainer only carries params"
            )
        param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_params, mesh, rules))
        self.abstract_params = nnx.to_pure_dict(abstract_params)
        self.tx = optim.make_optimizer(optimizer, self.abstract_params)
        self.schedule = optim.make_schedule(optimizer)
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.state_shardings = TrainState(
            step=replicated,
            params=param_shardings,
            opt_state=self._opt_shardings(abstract_opt, param_shardings, replicated),
            rng=replicated,
            skipped=replicated,
        )
        self.replicated = replicated
        self._train_steps: dict[tuple, CompiledStep] = {}
        self._eval_step = None
        self._init_jit = None

    def _opt_shardings(self, abstract_opt, param_shardings, replicated):
        """Optimizer leaves shaped like the parameter at the end of their path (Adam moments)
        share its sharding; factored or scalar statistics (Adafactor rows / columns, counts)
        are replicated."""
        table = {}
        for path, sh in jax.tree_util.tree_flatten_with_path(param_shardings)[0]:
            key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
            table[key] = sh
        shapes = {
            tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]
        }

        def one(path, leaf):
            keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
            for i in range(len(keys)):
                if keys[i:] in table:
                    if shapes[keys[i:]] == leaf.shape:
                        return table[keys[i:]]
                    break
            return replicated

        return jax.tree_util.tree_map_with_path(one, abstract_opt)

    # ---------------------------------------------------------------- state

    def module(self, params: PyTree) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)

    def _init(self) -> TrainState:
        params = nnx.to_pure_dict(nnx.state(self.model.build(nnx.Rngs(self.seed)), nnx.Param))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.key_data(jax.random.key(self.seed + 1)),
            skipped=jnp.zeros((), jnp.int32),
        )

    def init_state(self) -> TrainState:
        """Fresh parameters, optimizer state, step 0; created directly in their shardings."""
        if self._init_jit is None:
            self._init_jit = jax.jit(self._init, out_shardings=self.state_shardings)
        with sharding.use_mesh(self.mesh, self.rules):
            return self._init_jit()

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with this mesh's shardings (targets for checkpoint restore)."""
        with sharding.use_mesh(self.mesh, self.rules):
            shapes = jax.eval_shape(self._init)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    def warm_start(self, state: TrainState, path: str, subtree: str | None = None) -> TrainState:
        """`state` with its parameters (or those under `subtree`, e.g. "teacher") read from a
        params checkpoint (params_io format), restored directly into their shardings.

        A checkpoint of another model type (model.json) goes through the model's
        `warm_start_params` hook, e.g. embedding towers from a decoder-only checkpoint.
        """
        target = self.abstract_state().params
        model, fresh = self.model, state.params
        if subtree is not None:
            target, fresh = target[subtree], fresh[subtree]
            model = self.model.submodel(subtree)
        source_type = None
        if paths.exists(paths.join(path, params_io.MODEL_JSON)):
            source_type, _ = params_io.read_model_json(path)
        converted = None
        if source_type is not None and source_type != model.model_type:
            # Orbax returns list indices as string keys; unflatten restores nnx's int keys
            source = params_io.unflatten(params_io.flatten(params_io.load(path)))
            converted = model.warm_start_params(source, source_type, fresh)
        if converted is None:  # this model's own layout: checked and restored sharded
            loaded = params_io.load(path, target)
        else:
            params_io.check_compatible(target, converted, f"{path} ({source_type} -> model)")
            loaded = jax.tree.map(
                lambda x, t: jax.device_put(jnp.asarray(x, t.dtype), t.sharding), converted, target
            )
        params = dict(state.params)
        if subtree is None:
            params = loaded
        else:
            params[subtree] = loaded
        return state._replace(params=params)

    def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, batch_spec(self.mesh, self.rules, shape))

    def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays (rows of all processes, in process order)."""
        out = {}
        for name, x in local_batch.items():
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out[name] = jax.make_array_from_process_local_data(
                self.batch_sharding(global_shape), x, global_shape
            )
        return out

    # ---------------------------------------------------------------- steps

    def _grads(self, params, batch, rng, normalizer):
        def loss(p):
            return self.model.loss_fn(self.module(p), batch, rng, normalizer)

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, metrics

    def _gradients(self, state: TrainState, batch: dict[str, jax.Array]):
        """Part 1 of a step: (state, batch) -> (gradients, metric sums, whether the loss and the
        gradient norm are finite)."""
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        normalizer = jnp.maximum(self.model.loss_weight(batch), 1.0)
        n = self.opt_cfg.grad_accum_steps
        if n == 1:
            grads, metrics = self._grads(state.params, batch, rng, normalizer)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, n), batch)

            def body(carry, xs):
                i, mb = xs
                g, m = self._grads(state.params, mb, jax.random.fold_in(rng, i), normalizer)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.eval_shape(
                lambda: self._grads(state.params, jax.tree.map(lambda x: x[0], micro), rng, 1.0)
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro))
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(grad_norm)
        return grads, dict(metrics, grad_norm=grad_norm), ok

    def _verdict(self, state: TrainState, grads: PyTree, ok: jax.Array) -> jax.Array:
        """Part 2: whether the update may be applied (optax.apply_if_finite's rule, and more).

        The update is computed here only to be measured; the apply parts compute it again,
        knowing the verdict, so XLA can write it over the donated state. Deciding from the new
        values in the jit that writes them kept the whole new state beside the old one (3.4 GiB
        of t5gemma_270m_270m); measuring in the gradient part added a copy of the update to the
        activations' peak. The norms are float32 sums of squares, so values beyond ~1e19 count
        as overflow too: a huge but finite update (a learning rate of 1e30) would otherwise be
        saved and make every later step NaN."""
        updates, _ = self.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        return (
            ok
            & jnp.isfinite(optax.global_norm(updates))
            & jnp.isfinite(optax.global_norm(new_params))
        )

    def _keep(self, finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    def _apply(self, state: TrainState, grads: PyTree, finite: jax.Array, parts=("params", "opt")):
        """Part 3: the new parameters and / or optimizer state where `finite`, else the old ones
        (nothing non-finite reaches a checkpoint). With "opt": the step and the count of skipped
        updates in a row too (the loop stops the run when it passes its limit)."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        if "params" in parts:
            params = optax.apply_updates(state.params, updates)
            state = state._replace(params=self._keep(finite, params, state.params))
        if "opt" not in parts:
            return state, {}
        skipped = jnp.where(finite, 0, state.skipped + 1).astype(jnp.int32)
        new_state = state._replace(
            step=state.step + 1,
            opt_state=self._keep(finite, opt_state, state.opt_state),
            skipped=skipped,
        )
        metrics = {
            "learning_rate": jnp.asarray(self.schedule(state.step), jnp.float32),
            "skipped_updates": skipped,
        }
        return new_state, metrics

    def compile_step(self, state: TrainState, batch: dict[str, Any]) -> CompiledStep:
        """The train step compiled for `state`'s and `batch`'s shapes (arrays or
        ShapeDtypeStructs; the batch global): what `train_step` runs, and what the benchmarks
        time and measure.

        The update is applied in two executables, parameters first (they read the old optimizer
        state), then the optimizer state given the new parameters, so that neither reads a
        buffer the other overwrites and XLA needs no defensive copies of the state. Where the
        optimizer's state depends on parameter values (Adafactor's momentum of parameter-scaled
        updates) one executable applies both."""
        batch_sh = {k: self.batch_sharding(v.shape) for k, v in batch.items()}
        params_sh, rep = self.state_shardings.params, self.replicated
        gradients = jax.jit(
            self._gradients,
            in_shardings=(self.state_shardings, batch_sh),
            out_shardings=(params_sh, rep, rep),
        )
        verdict = jax.jit(
            self._verdict, in_shardings=(self.state_shardings, params_sh, rep), out_shardings=rep
        )
        split = not optim.state_reads_params(self.tx, self.abstract_params)
        apply = [
            jax.jit(
                functools.partial(self._apply, parts=parts),
                in_shardings=(self.state_shardings, params_sh, rep),
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(0,),
            )
            for parts in ((("params",), ("opt",)) if split else (("params", "opt"),))
        ]
        with sharding.use_mesh(self.mesh, self.rules):
            grads, _, ok = jax.eval_shape(self._gradients, state, batch)
            return CompiledStep(
                self.mesh,
                self.rules,
                sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state, batch))),
                gradients.lower(state, batch).compile(),
                verdict.lower(state, grads, ok).compile(),
                [f.lower(state, grads, ok).compile() for f in apply],
            )

    def train_step(self, state: TrainState, batch: dict[str, jax.Array]):
        """One optimizer step: (state, global batch) -> (new state, metric sums). `state` is
        donated: do not use it afterwards."""
        # One compile per batch layout, as `jax.jit` itself would retrace a new one.
        key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if key not in self._train_steps:
            self._train_steps[key] = self.compile_step(state, batch)
        return self._train_steps[key](state, batch)

    def eval_step(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Metric sums of one global batch (no dropout)."""
        if self._eval_step is None:
            batch_sh = {k: self.batch_sharding(v.shape) for k, v in batch.items()}
            self._eval_step = jax.jit(
                lambda p, b: self.model.eval_fn(self.module(p), b),
                in_shardings=(self.state_shardings.params, batch_sh),
                out_shardings=self.replicated,
            )
        with sharding.use_mesh(self.mesh, self.rules):
            return self._eval_step(params, batch)

    def predict_fn(self, decode_cfg) -> Callable:
        """jitted (params, batch, rng) -> decoding.Decoded (fixed shapes: one compile)."""
        return jax.jit(lambda p, b, r: self.model.predict_batch(self.module(p), b, decode_cfg, r))

    def score_fn(self) -> Callable:
        """jitted (params, batch) -> [B] log-likelihood of the targets."""
        return jax.jit(lambda p, b: self.model.score_batch(self.module(p), b))
