"""Model soups: the element-wise (weighted) average of checkpoints of one architecture."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from encdec_adapt.storage import outputs, params_io


def average_params(trees: Sequence[dict], weights: Sequence[float] | None = None) -> dict:
    """Weighted mean of parameter trees with identical names and shapes (float32 accumulation,
    result in the first tree's dtypes)."""
    if not trees:
        raise ValueError("average_params needs at least one tree")
    weights = [1.0] * len(trees) if weights is None else list(weights)
    if len(weights) != len(trees) or sum(weights) <= 0:
        raise ValueError(f"{len(weights)} weights for {len(trees)} trees (sum must be > 0)")
    for i, tree in enumerate(trees[1:], start=1):
        params_io.check_compatible(trees[0], tree, f"soup ingredient {i}")
    total = sum(weights)

    def mean(*leaves):
        acc = sum(w * np.asarray(x, np.float32) for w, x in zip(weights, leaves)) / total
        return acc.astype(np.asarray(leaves[0]).dtype)

    return jax.tree.map(mean, *trees)


def soup_checkpoints(
    paths: Sequence[str], output: str, weights: Sequence[float] | None = None
) -> None:
    """Averages params checkpoints of one model type and config into `output`."""
    outputs.check_not_input(output, *paths)
    described = [params_io.read_model_json(p) for p in paths]
    for path, d in zip(paths[1:], described[1:]):
        if d != described[0]:
            raise params_io.CheckpointError(
                f"{path}: model type/config differ from {paths[0]}; only one architecture soups"
            )
    trees = [params_io.load(p) for p in paths]
    model_type, config = described[0]
    params_io.save(output, average_params(trees, weights), model_type, config)
