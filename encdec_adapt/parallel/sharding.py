"""Logical axis names -> device mesh axes, and models initialised directly into their shardings.

Every parameter carries logical axis names (`sharding_names` metadata, e.g. ("embed", "mlp")) and
activations are constrained with logical names too. `MeshRules` maps each logical name to zero or
more mesh axes; a mesh has the axes ("data", "fsdp", "tensor"). A dimension that a mesh axis does
not divide stays replicated along that axis (e.g. a single kv head on a tensor axis of 4) rather
than failing: `unsharded_params` reports such parameters so nothing is replicated silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from encdec_adapt.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# MaxText-style defaults: batch over data+fsdp, weights' embed axis over fsdp (ZeRO-3),
# heads / mlp / vocab over tensor (Megatron).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A device mesh shape and the logical-axis rules used on it.

    Attributes:
      mesh_shape: sizes of the ("data", "fsdp", "tensor") axes; -1 in one place takes the
        remaining devices (default: all devices on fsdp).
      rules: (logical name, mesh axis or tuple of mesh axes or None) pairs.
      dcn_mesh_shape: for multi-slice TPU, the per-axis slice counts over the data-center network
        (usually (num_slices, 1, 1)); None on a single slice or GPU host.
    """

    mesh_shape: tuple[int, ...] = (1, -1, 1)
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES
    dcn_mesh_shape: tuple[int, ...] | None = None

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        devices = list(devices if devices is not None else jax.devices())
        shape = list(self.mesh_shape)
        if len(shape) != len(MESH_AXES):
            raise ConfigError(f"MeshRules.mesh_shape={self.mesh_shape} needs {len(MESH_AXES)} axes")
        if shape.count(-1) > 1:
            raise ConfigError(f"MeshRules.mesh_shape={self.mesh_shape} has more than one -1")
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = len(devices) // known
        if math.prod(shape) != len(devices):
            raise ConfigError(
                f"MeshRules.mesh_shape={self.mesh_shape} needs {math.prod(shape)} devices, "
                f"{len(devices)} are available"
            )
        if self.dcn_mesh_shape is not None:
            ici = [s // d for s, d in zip(shape, self.dcn_mesh_shape)]
            grid = mesh_utils.create_hybrid_device_mesh(ici, list(self.dcn_mesh_shape), devices)
        else:
            grid = np.asarray(devices).reshape(shape)
        return Mesh(grid, MESH_AXES)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, MeshRules] | None] = contextvars.ContextVar(
    "encdec_adapt_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: MeshRules) -> Iterator[None]:
    """Activates `mesh` and `rules` for `constrain` calls traced inside the block."""
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, MeshRules] | None:
    """(mesh, rules) of the enclosing `use_mesh` block, or None outside one."""
    return _ACTIVE.get()


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: MeshRules
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec, dropping mesh axes that do not divide a dimension
    and mesh axes already used by an earlier dimension."""
    table = dict(rules.rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        candidates = (target,) if isinstance(target, str) else tuple(target)
        chosen = []
        size = 1
        for axis in candidates:
            axis_size = mesh.shape[axis]
            if axis in used or axis_size == 1 or dim % (size * axis_size):
                continue
            chosen.append(axis)
            size *= axis_size
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside `use_mesh`."""
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, rules = current
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def state_shardings(state: nnx.State, mesh: Mesh, rules: MeshRules) -> nnx.State:
    """A NamedSharding for every variable of `state` (abstract or concrete)."""

    def one(var):
        axes = getattr(var, "sharding_names", None) or (None,) * len(var.shape)
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: MeshRules) -> nnx.Module:
    """Builds `factory()` with every parameter created directly in its sharding.

    The model is first traced abstractly (no memory), then initialised by one jitted call whose
    outputs are laid out by the logical-axis rules, so no full-size copy ever exists on one host.
    """
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(factory())

    with use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_state(state: nnx.State, mesh: Mesh, rules: MeshRules) -> nnx.State:
    """Moves an existing (e.g. restored) state onto the mesh by its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def unsharded_params(
    state: nnx.State, min_size: int
) -> list[tuple[str, tuple[int, ...], PartitionSpec]]:
    """Parameters with at least `min_size` elements that are fully replicated."""
    out = []
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        sh = getattr(value, "sharding", None)
        if value.size >= min_size and isinstance(sh, NamedSharding) and sh.is_fully_replicated:
            out.append(("/".join(map(str, path)), tuple(value.shape), sh.spec))
    return out
