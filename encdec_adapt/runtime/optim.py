"""Optimizers, learning-rate schedules, clipping and freezing, from one gin-configurable dataclass.

The optimizer is kept apart from the model API (`models/`): a model gives a loss, this module
turns gradients into updates. Parameters are nested dicts (`nnx.to_pure_dict` of the model's
params); a parameter's *path* is its keys joined by "/", e.g. "stack/blocks/3/attn/q_proj".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Literal

from encdec_adapt.errors import ConfigError

SCHEDULES = ("constant", "rsqrt", "cosine", "linear")
OPTIMIZERS = ("adamw", "adafactor", "sgd")


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What turns gradients into parameter updates.

    Attributes:
      name: "adamw", "adafactor" or "sgd".
      learning_rate: peak learning rate (reached at the end of warmup).
      schedule: "constant", "rsqrt" (lr * sqrt(warmup / step) after warmup, as T5),
        "cosine" or "linear" (decay from the peak to `end_lr_fraction * peak` at `decay_steps`).
      warmup_steps: linear warmup from 0.
      decay_steps: last step of cosine / linear decay (usually the number of training steps).
      end_lr_fraction: final learning rate of cosine / linear as a fraction of the peak.
      b1, b2, eps: Adam moments (b1 is Adafactor's momentum, None = none).
      weight_decay: decoupled weight decay (AdamW) on matrices (ndim >= 2) only.
      clip_norm: clip gradients to this global norm (None: off); counted over trainable params.
      grad_accum_steps: split each batch in this many micro-batches and sum their gradients
        (the update is the one of the whole batch; memory is the one of a micro-batch).
      freeze: regular expressions; parameters whose path matches any of them get zero updates
        and no optimizer state (e.g. ("^embedder/",) or everything but cross-attention).
      train_only: if not empty, the complement: only parameters matching one of these train.
      unfreeze_at_step: frozen parameters (freeze / train_only) train from this optimizer step
        on, with a fresh copy of the optimizer (the T5Gemma unbalanced recipe: cross-attention
        alone for K steps, then everything); None: frozen for the whole run.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    end_lr_fraction: float = 0.0
    b1: float | None = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float | None = None
    grad_accum_steps: int = 1
    freeze: tuple[str, ...] = ()
    train_only: tuple[str, ...] = ()
    unfreeze_at_step: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "train_only", tuple(self.train_only))
        problems = []
        if self.name not in OPTIMIZERS:
            problems.append(f"name={self.name!r} (expected one of {OPTIMIZERS})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} (expected one of {SCHEDULES})")
        for field in ("learning_rate", "b2", "eps", "weight_decay", "end_lr_fraction"):
            if not isinstance(getattr(self, field), int | float):
                problems.append(f"{field}={getattr(self, field)!r} is not a number")
        for field in ("warmup_steps", "decay_steps", "grad_accum_steps"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{field}={value!r} is not an int >= 0")
        if self.unfreeze_at_step is not None and (
            not isinstance(self.unfreeze_at_step, int) or self.unfreeze_at_step < 1
        ):
            problems.append(
                f"unfreeze_at_step={self.unfreeze_at_step!r} is not None or an int >= 1"
            )
        if self.grad_accum_steps == 0:
            problems.append("grad_accum_steps must be >= 1")
        if self.schedule in ("cosine", "linear") and self.decay_steps <= self.warmup_steps:
            problems.append(
                f"schedule={self.schedule!r} needs decay_steps ({self.decay_steps}) > "
                f"warmup_steps ({self.warmup_steps})"
            )
        for pattern in self.freeze + self.train_only:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"bad regular expression {pattern!r}: {e}")
        if problems:
            raise ConfigError("Invalid OptimizerConfig: " + "; ".join(problems))


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the (0-based) optimizer step."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps

    def warm(step):
        return peak * jnp.minimum(1.0, (step + 1) / warmup) if warmup else peak

    if cfg.schedule == "constant":
        return lambda step: warm(jnp.asarray(step, jnp.float32))
    if cfg.schedule == "rsqrt":

        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            return warm(step) * jnp.sqrt(max(warmup, 1) / jnp.maximum(step + 1, max(warmup, 1)))

        return rsqrt
    end = peak * cfg.end_lr_fraction
    span = cfg.decay_steps - warmup

    def decay(step):
        step = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((step - warmup) / span, 0.0, 1.0)
        if cfg.schedule == "cosine":
            shape = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            shape = 1.0 - frac
        return jnp.where(step < warmup, warm(step), end + (peak - end) * shape)

    return decay


def param_path(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_mask(
    params: Any, *, train_only: Sequence[str] = (), freeze: Sequence[str] = ()
) -> Any:
    """A tree of bools like `params`: True where the parameter is trained.

    Paths are `param_path` names such as `decoder/stack/blocks/3/cross_attn/q`; a regex matches
    anywhere in the path (`re.search`). A parameter trains when it matches one of `train_only`
    (every parameter when empty or None) and none of `freeze`. Every regex must compile and
    match at least one path, so that a typo fails loudly instead of silently training (or
    freezing) everything. Raises ValueError naming the regex.
    """
    train_only, freeze = tuple(train_only or ()), tuple(freeze)
    names = [param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    compiled = {}
    for pattern in train_only + freeze:
        try:
            compiled[pattern] = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"freezing regex {pattern!r} is invalid: {e}") from e
        if names and not any(compiled[pattern].search(name) for name in names):
            raise ConfigError(f"freezing regex {pattern!r} matches no parameter (e.g. {names[0]})")

    def one(path, _):
        name = param_path(path)
        if train_only and not any(compiled[p].search(name) for p in train_only):
            return False
        return not any(compiled[p].search(name) for p in freeze)

    return jax.tree_util.tree_map_with_path(one, params)


def frozen_fraction(mask: Any, params: Any) -> float:
    """Share of parameter elements (not tensors) that `mask` freezes."""
    sizes = jax.tree.map(lambda m, p: (int(np.prod(np.shape(p))), bool(m)), mask, params)
    leaves = jax.tree.leaves(sizes, is_leaf=lambda x: isinstance(x, tuple))
    total = sum(n for n, _ in leaves)
    return sum(n for n, t in leaves if not t) / max(total, 1)


def after_steps(
    inner: optax.GradientTransformation, num_steps: int
) -> optax.GradientTransformation:
    """`inner` from step `num_steps` on; zero updates (and untouched inner state) before."""

    def init_fn(params):
        return {"count": jnp.zeros((), jnp.int32), "inner": inner.init(params)}

    def update_fn(updates, state, params=None):
        def frozen(_):
            return jax.tree.map(jnp.zeros_like, updates), state["inner"]

        def active(_):
            return inner.update(updates, state["inner"], params)

        new_updates, inner_state = jax.lax.cond(state["count"] >= num_steps, active, frozen, None)
        count = jnp.minimum(state["count"] + 1, jnp.iinfo(jnp.int32).max)
        return new_updates, {"count": count, "inner": inner_state}

    return optax.GradientTransformation(init_fn, update_fn)


def freeze(
    optimizer: optax.GradientTransformation, mask: Any, *, until_step: int | None = None
) -> optax.GradientTransformation:
    """Wraps `optimizer` so that parameters where `mask` is False get exactly zero updates.

    `multi_transform` gives `optimizer` (and its clipping norm) only the trainable leaves, so
    permanently frozen parameters hold no optimizer state and weight decay never touches them.
    With `until_step=K` they are frozen for the first K updates only, then trained by a fresh
    copy of `optimizer` (its moments and schedules start at step K): the T5Gemma unbalanced
    recipe (cross-attention alone for K steps, then everything).
    """
    labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
    frozen = optax.set_to_zero() if until_step is None else after_steps(optimizer, until_step)
    return optax.multi_transform({"train": optimizer, "frozen": frozen}, labels)


def _base(cfg: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    lr = make_schedule(cfg)
    if cfg.name == "adamw":
        decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
        return optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    if cfg.name == "adafactor":
        return optax.adafactor(
            lr, momentum=cfg.b1, weight_decay_rate=cfg.weight_decay or None, eps=cfg.eps
        )
    return optax.sgd(lr, momentum=cfg.b1)


def make_optimizer(cfg: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """Clipping + the base optimizer on trainable params; frozen params get exact zero updates.

    Args:
      params: the (possibly abstract) params tree, used for the masks only.
    """
    inner = _base(cfg, params)
    if cfg.clip_norm is not None:
        inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), inner)
    mask = trainable_mask(params, train_only=cfg.train_only, freeze=cfg.freeze)
    if all(jax.tree.leaves(mask)):
        return inner
    if not any(jax.tree.leaves(mask)):
        raise ConfigError(
            f"OptimizerConfig freezes every parameter (freeze={cfg.freeze}, "
            f"train_only={cfg.train_only})"
        )
    return freeze(inner, mask, until_step=cfg.unfreeze_at_step)


def state_reads_params(tx: optax.GradientTransformation, params: Any) -> bool:
    """Whether `tx`'s new state depends on the parameters' values (not only their shapes).

    Adam's and SGD's moments do not; Adafactor's momentum accumulates updates scaled by the
    parameters' size, so it does. Read from the traced update: the equations the new state
    needs, followed back to the inputs (nested calls count as reading all their inputs)."""
    opt_state = jax.eval_shape(tx.init, params)
    closed = jax.make_jaxpr(lambda p, o, g: tx.update(g, o, p)[1])(params, opt_state, params)
    jaxpr = closed.jaxpr
    needed = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    for eqn in reversed(jaxpr.eqns):
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    n = len(jax.tree.leaves(params))
    return any(v in needed for v in jaxpr.invars[:n])
