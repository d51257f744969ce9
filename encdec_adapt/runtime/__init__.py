"""The training runtime and the jobs built on it: the jitted train / eval steps (`trainer.py`),
the training loop (`train.py`), optimizers and freezing, Orbax training checkpoints, the metrics
writer and reader, and the gin entry points `evaluate` / `infer` (`infer.py`) and `embed`, plus
export of a run's params and checkpoint averaging."""
