"""Params checkpoints on disk: an Orbax tree of the nested parameter dict plus `model.json`,
written under a temporary name and renamed, so an interrupted save never looks like a checkpoint."""
