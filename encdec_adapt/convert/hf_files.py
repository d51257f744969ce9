"""Reading and writing HF model directories: config.json plus (sharded) safetensors files."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors load as-is)
import numpy as np
from safetensors.numpy import load, load_file, save, save_file

from encdec_adapt.errors import CheckpointError
from encdec_adapt.storage import outputs, paths

CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: str) -> bool:
    """Whether `path` holds an HF model (config.json and safetensors): what `--overwrite` of
    export-hf may replace."""
    if not paths.isfile(paths.join(path, CONFIG_JSON)):
        return False
    return any(name.endswith(".safetensors") for name in paths.listdir(path))


HF_DIR = outputs.Kind("HF model directory (config.json + safetensors)", is_hf_dir)


def _weight_files(hf_dir: str, index: str) -> list[str]:
    """The safetensors files an index names, each checked to be a plain file name inside
    `hf_dir` (an index must not make the importer read elsewhere)."""
    try:
        weight_map = json.loads(paths.read_text(index))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index} is not valid JSON: {e}") from e
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f'{index} is malformed: expected {{"weight_map": {{tensor name: file name}}}}'
        ) from None
    for name in names:
        if (
            not isinstance(name, str)
            or not name
            or os.path.isabs(name)
            or os.path.basename(name) != name
            or name in (".", "..")
        ):
            raise CheckpointError(
                f"{index}: weight_map names the file {name!r}; only plain file names inside "
                f"{hf_dir} are read"
            )
    return names


def read_config(hf_dir: str) -> dict[str, Any]:
    path = paths.join(hf_dir, CONFIG_JSON)
    if not paths.isfile(path):
        raise CheckpointError(f"{path} does not exist: {hf_dir} is not an HF model directory")
    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of the directory by HF name, from one file or a sharded index.

    Tensors keep their stored dtype (bfloat16 too), so a large checkpoint is not doubled in
    host memory; params checkpoints are cast to the model's param_dtype when restored.
    """
    index = paths.join(hf_dir, INDEX_FILE)
    if paths.isfile(index):
        files = _weight_files(hf_dir, index)
    elif paths.isfile(paths.join(hf_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: no weights to import"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = paths.join(hf_dir, name)
        if not paths.isfile(path):
            raise CheckpointError(f"{path} is listed in {INDEX_FILE} but does not exist")
        try:
            # A remote file is read whole into memory (safetensors maps local files only).
            tensors.update(
                load_file(path) if paths.local_path(path) else load(paths.read_bytes(path))
            )
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return tensors


def write(
    hf_dir: str, config: dict[str, Any], tensors: dict[str, np.ndarray], *, overwrite: bool = False
) -> None:
    """Writes config.json and one model.safetensors as the directory `hf_dir`, built under a
    temporary name and swapped in whole (`overwrite` replaces only an HF model directory)."""
    with outputs.new_directory(hf_dir, overwrite=overwrite, kind=HF_DIR) as tmp:
        arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        target = paths.join(tmp, SINGLE_FILE)
        if paths.local_path(target):
            save_file(arrays, target, metadata={"format": "pt"})
        else:  # built in memory, then uploaded as one object
            with paths.open_file(target, "wb") as f:
                f.write(save(arrays, metadata={"format": "pt"}))
        with paths.open_file(paths.join(tmp, CONFIG_JSON), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
