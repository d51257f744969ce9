"""Reading and writing HF model directories: config.json plus (sharded) safetensors files."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors load as-is)
import numpy as np
from safetensors.numpy import load_file, save_file

from encdec_adapt.errors import CheckpointError

CONFIG_JSON = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, CONFIG_JSON)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist: {hf_dir} is not an HF model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """All tensors of the directory by HF name, from one file or a sharded index.

    Tensors keep their stored dtype (bfloat16 too), so a large checkpoint is not doubled in
    host memory; params checkpoints are cast to the model's param_dtype when restored.
    """
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: no weights to import"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is listed in {INDEX_FILE} but does not exist")
        try:
            tensors.update(load_file(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return tensors


def write(hf_dir: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Writes config.json and one model.safetensors into `hf_dir` (created if needed)."""
    os.makedirs(hf_dir, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        os.path.join(hf_dir, SINGLE_FILE),
        metadata={"format": "pt"},
    )
    with open(os.path.join(hf_dir, CONFIG_JSON), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
