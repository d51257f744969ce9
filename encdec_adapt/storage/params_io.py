"""Parameter checkpoints: an Orbax tree of arrays plus the model config, as one directory.

Layout of a params checkpoint directory:
  CKPT_DIR/model.json   {"model_type": ..., "config": {...}} (what builds the model)
  CKPT_DIR/params/      Orbax StandardCheckpointer tree, the nested dict of `nnx.to_pure_dict`

This is what `import-hf` writes and what warm starts read. Training checkpoints (optimizer state,
step, data position) are managed by the trainer's CheckpointManager and can be read here too.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from encdec_adapt import errors
from encdec_adapt.storage import outputs, paths

MODEL_JSON = "model.json"
PARAMS_DIR = "params"

PyTree = Any


# An unusable checkpoint; the message names the path, and the parameter and shapes. Defined in
# errors.py (exit code 2 on the command line), importable from here.
CheckpointError = errors.CheckpointError


def flatten(tree: PyTree) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out["/".join(str(_key(k)) for k in path)] = leaf
    return out


def _key(k) -> Any:
    """A path entry's name: dict key, sequence index or (NamedTuple) attribute."""
    return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a/b/c": leaf} -> nested dict (integer keys for list indices, as nnx uses)."""
    root: dict = {}
    for name, leaf in flat.items():
        node = root
        keys = [int(k) if k.isdigit() else k for k in name.split("/")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return root


def _shape(x) -> tuple[int, ...]:
    # Arrays, jax.ShapeDtypeStruct and Orbax metadata all have .shape; plain scalars do not.
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def check_compatible(expected: PyTree, given: PyTree, source: str) -> None:
    """Raises CheckpointError on the first parameter missing, unknown or of another shape.

    Leaves may be arrays or shape-only stand-ins (jax.ShapeDtypeStruct, Orbax metadata).
    """
    exp, got = flatten(expected), flatten(given)
    for name in exp:
        if name not in got:
            raise CheckpointError(f"{source}: parameter {name!r} is missing")
        if _shape(exp[name]) != _shape(got[name]):
            raise CheckpointError(
                f"{source}: parameter {name!r} has shape {_shape(got[name])}, "
                f"the model expects {_shape(exp[name])}"
            )
    unknown = sorted(set(got) - set(exp))
    if unknown:
        raise CheckpointError(f"{source}: unknown parameter {unknown[0]!r} ({len(unknown)} in all)")


def is_params_checkpoint(path: str) -> bool:
    """Whether `path` is a params checkpoint directory (what `--overwrite` may replace)."""
    return paths.isfile(paths.join(path, MODEL_JSON))


PARAMS_CHECKPOINT = outputs.Kind("params checkpoint", is_params_checkpoint)


def check_writable(path: str, overwrite: bool) -> None:
    """Raises CheckpointError when the output `path` exists and may not be replaced (no
    `overwrite`, or not a params checkpoint); the commands that write a params checkpoint call it
    before any slow work, so a bad --output fails fast."""
    outputs.check_target(outputs.absolute(path), overwrite, PARAMS_CHECKPOINT)


def save(
    path: str,
    params: PyTree,
    model_type: str,
    config: dict,
    *,
    overwrite=False,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Writes `params` (a nested dict of arrays) and the model description to `path`, and
    `extra_files` (name -> content, e.g. a tokenizer.model) beside them.

    The directory is written under a temporary name and swapped in at the end
    (`outputs.new_directory`): an interrupted save never leaves something that looks like a
    checkpoint, and an older checkpoint it replaces is kept until the new one is complete.
    """
    with outputs.new_directory(path, overwrite=overwrite, kind=PARAMS_CHECKPOINT) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(paths.epath_of(paths.join(tmp, PARAMS_DIR)), params)
        ckpt.wait_until_finished()
        ckpt.close()
        with paths.open_file(paths.join(tmp, MODEL_JSON), "w") as f:
            json.dump({"model_type": model_type, "config": config}, f, indent=2, sort_keys=True)
        for name, content in (extra_files or {}).items():
            with paths.open_file(paths.join(tmp, name), "wb") as f:
                f.write(content)


def read_model_json(path: str) -> tuple[str, dict]:
    """(model_type, config dict) of a params checkpoint directory."""
    file = paths.join(path, MODEL_JSON)
    if not paths.exists(file):
        raise CheckpointError(f"{file} does not exist: {path} is not a params checkpoint")
    with paths.open_file(file) as f:
        d = json.load(f)
    return d["model_type"], d["config"]


def load(path: str, target: PyTree | None = None) -> PyTree:
    """Reads the params tree of `path`.

    With `target` (a tree of arrays or jax.ShapeDtypeStruct, shardings included), the names and
    shapes are checked first and arrays are restored directly into the target's shardings.
    """
    params_dir = paths.join(paths.absolute(path), PARAMS_DIR)
    if not paths.isdir(params_dir):
        raise CheckpointError(f"{params_dir} does not exist: {path} is not a params checkpoint")
    params_dir = paths.epath_of(params_dir)
    ckpt = ocp.StandardCheckpointer()
    if target is None:
        return ckpt.restore(params_dir)
    stored = ckpt.metadata(params_dir)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_tree = getattr(stored_tree, "tree", stored_tree)
    check_compatible(target, stored_tree, path)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target,
    )
    return ckpt.restore(params_dir, abstract)


def model_params(model: nnx.Module) -> dict:
    """The nested dict of parameter arrays of `model`."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assign(model: nnx.Module, params: PyTree, source: str) -> None:
    """Sets `model`'s parameters to `params` (a nested dict of arrays), in place.

    Names and shapes are checked first; each array is cast to the dtype and placed in the
    sharding of the parameter it replaces.
    """
    state = nnx.state(model, nnx.Param)
    current = nnx.to_pure_dict(state)
    check_compatible(current, params, source)

    def cast(old, new):
        new = jax.numpy.asarray(new, old.dtype)
        sh = getattr(old, "sharding", None)
        return jax.device_put(new, sh) if sh is not None else new

    nnx.replace_by_pure_dict(state, jax.tree.map(cast, current, params))
    nnx.update(model, state)


def load_into(model: nnx.Module, path: str) -> None:
    """Restores `path` into `model` in place, keeping the model's dtypes and shardings."""
    assign(model, load(path, model_params(model)), path)
