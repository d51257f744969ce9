"""`SeqioIterator`: a seqio task or mixture as numpy batches, read in per-host input shards, with
a checkpointable position that restores in constant time.

Layout of repeating (training) data. The global batch of `batch_size` rows is the concatenation
of `num_shards` input shards of `batch_size / num_shards` rows each. Shard k is its own tf.data
pipeline: the k-th of `num_shards` parts of the task's examples (seqio `ShardInfo`: whole files
when the source has at least that many, else every num_shards-th example, dropped before any
preprocessing), preprocessed, tokenized, shuffled, converted (packed) and batched with the seed
`seed + SHARD_SEED_STRIDE * k` (shard 0 keeps `seed`). Global batch i is shard 0's batch i, then
shard 1's, ... A process reads only its `num_shards / processes` shards
(`parallel.distributed.local_shards`), which are exactly its rows of the global batch, so per
host input work is O(global batch / processes).

What depends on the process count and what does not:
- The rows of global batch i (and their order) are a function of (task, split, seed, batch size,
  feature lengths, converter, num_shards, i): not of the process count or the device count.
- `DataConfig.num_shards` unset (the default) means one shard per process of the run's first
  start, so the stream of a fresh run does depend on its process count; set it (a multiple of
  every process count you will use, dividing the batch size) to get the same stream on 1, 2 or 4
  processes.
- The shard count is saved with the position: a resume keeps it, on any process count that
  divides it (re-sharding: each process takes its shards' saved states); any other count is
  refused with a CheckpointError (exit 2) that names both. A checkpoint written before input
  shards (position {"index": N}) is one shard.

Position (`get_state`, a JSON dict): {"index": batches consumed, "num_shards": S, "iterators":
{"task/shard": the tf.data iterator state (data/iterator_state.py)}}. The iterator states hold
the pipelines' buffers, not their history, so a restore costs the same at step 100 and at step
100,000 (scripts/bench_resume.py). Their size is that of the buffers: the shuffle buffer, the
packing and batching buffers, and seqio's `prefetch(AUTOTUNE)`, which tf.data enlarges whenever
the consumer empties it (up to tf.data's RAM budget), so it varies along a run without following
the position. In a multi-process run every process calls `get_state` at the
same step (the checkpoint save); the states of all shards are gathered so that the checkpoint's
one JSON item (written by process 0) holds them all. A shard whose pipeline cannot be
checkpointed (a `from_generator` source) is saved as None and replayed on resume (exact, but
its time grows with the position); a warning says so once.

One-pass data (`repeat=False`: evaluation, inference) is not sharded: every process reads the
whole stream, batches it globally and keeps its rows, so every process sees the same number of
batches (a short last batch included). Its position is a batch count, restored by replay.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import numpy as np

from encdec_adapt.data.task_names import check_task_name
from encdec_adapt.errors import CheckpointError, ConfigError
from encdec_adapt.parallel import distributed

Batch = dict[str, np.ndarray]
SHARD_SEED_STRIDE = 1_000_003  # shard k's seed offset: shards never share a shuffle / noise seed
_log = logging.getLogger(__name__)


class SeqioIterator:
    """Batches of a seqio task through a feature converter; position = batches consumed.

    With `one_task_per_batch`, batch i comes from the mixture task chosen by `task_of(i)` (a pure
    function of seed and i); each task has its own seeded pipelines (seed + task index).

    `process_index` / `process_count` simulate one process of a larger job (tests); by default
    they are JAX's. A simulated process's `get_state` holds only its own shards
    (`merge_states` combines those of all processes).
    """

    def __init__(self, cfg, *, process_index: int | None = None, process_count: int | None = None):
        check_task_name(cfg.task)
        self.cfg = cfg
        self.process_index, self.process_count = distributed.process_layout(
            process_index, process_count
        )
        self._gather = process_index is None
        self.index = 0
        if cfg.one_task_per_batch:
            self.task_names, self.task_probs = _mixture_rates(cfg.task)
        else:
            self.task_names, self.task_probs = [cfg.task], None
        self.sharded = bool(cfg.repeat)
        shards = (getattr(cfg, "num_shards", None) or self.process_count) if self.sharded else 1
        self._set_layout(shards)
        self._its: dict[tuple[int, int], object] | None = None
        self._pending: dict[str, dict | None] = {}  # saved states to restore at the next build
        self._warned: set[str] = set()

    def _set_layout(self, num_shards: int) -> None:
        if self.sharded and self.cfg.batch_size % num_shards:
            raise ConfigError(
                f"DataConfig.batch_size={self.cfg.batch_size} is not divisible by "
                f"{num_shards} input shards"
            )
        if self.sharded:
            self.shards = distributed.local_shards(
                num_shards, self.process_index, self.process_count
            )
        else:
            self.shards = range(1)
            self.rows = distributed.local_rows(
                self.cfg.batch_size, self.process_index, self.process_count
            )
        self.num_shards = num_shards

    # ------------------------------------------------------------------ pipelines

    def _dataset(self, name: str, seed: int, shard: int):
        import seqio  # lazy on purpose: TensorFlow (synthetic runs never import it)

        from encdec_adapt.data import iterator_state  # lazy on purpose: TensorFlow

        cfg = self.cfg
        lengths = dict(cfg.task_feature_lengths)
        ds = seqio.get_mixture_or_task(name).get_dataset(
            lengths,
            split=cfg.split,
            use_cached=cfg.use_cached,
            shuffle=cfg.shuffle,
            seed=seed,
            shard_info=seqio.ShardInfo(shard, self.num_shards) if self.num_shards > 1 else None,
            num_epochs=None if cfg.repeat else 1,
            # the project's converters count and cut over-long features themselves
            trim_output_features=cfg.feature_converter == "prefix_lm",
        )
        ds = cfg.converter()(ds, task_feature_lengths=lengths)
        ds = ds.batch(cfg.batch_size // self.num_shards, drop_remainder=cfg.repeat)
        return ds.with_options(iterator_state.options())

    def _build(self) -> None:
        """One tf.data iterator per (task, local shard), at the position `self.index`: restored
        from its saved state, else by replaying the batches that task gave before it."""
        from encdec_adapt.data import iterator_state  # lazy on purpose: TensorFlow

        done = np.zeros(len(self.task_names), np.int64)
        if self.cfg.one_task_per_batch:
            for i in range(self.index):
                done[self.task_of(i)] += 1
        else:
            done[0] = self.index
        self._its = {}
        for t, name in enumerate(self.task_names):
            for k in self.shards:
                it = iter(self._dataset(name, self.cfg.seed + t + SHARD_SEED_STRIDE * k, k))
                blob = self._pending.get(f"{t}/{k}")
                if blob is not None:
                    try:
                        iterator_state.restore(it, blob)
                    except iterator_state.StateMismatch as e:
                        _log.warning(
                            "data position of task %s shard %d does not fit its pipeline (%s); "
                            "replaying %d batches instead",
                            name,
                            k,
                            e,
                            done[t],
                        )
                        it = iter(self._dataset(name, self.cfg.seed + t + SHARD_SEED_STRIDE * k, k))
                        blob = None
                if blob is None:
                    for _ in range(int(done[t])):
                        next(it)
                self._its[(t, k)] = it
        self._pending = {}

    def task_of(self, index: int) -> int:
        """Which mixture task gives batch `index` (one_task_per_batch)."""
        rng = np.random.default_rng([self.cfg.seed, 0x7A5C, index])
        return int(rng.choice(len(self.task_probs), p=self.task_probs))

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._its is None:
            self._build()
        t = self.task_of(self.index) if self.cfg.one_task_per_batch else 0
        parts = [next(self._its[(t, k)]) for k in self.shards]
        self.index += 1
        batch = {}
        for key in parts[0]:
            values = [np.asarray(p[key]) for p in parts]
            value = values[0] if len(values) == 1 else np.concatenate(values)
            if not self.sharded:
                value = value[self.rows]
            batch[key] = value.astype(np.int32)
        return batch

    # ------------------------------------------------------------------ position

    def _local_states(self) -> dict[str, dict | None]:
        """{"task/shard": iterator state, or None (replay)} of this process's shards."""
        from encdec_adapt.data import iterator_state  # lazy on purpose: TensorFlow

        if self._its is None:  # not started since the last set_state: its pending states
            return {
                f"{t}/{k}": self._pending.get(f"{t}/{k}")
                for t in range(len(self.task_names))
                for k in self.shards
            }
        out = {}
        for (t, k), it in self._its.items():
            key = f"{t}/{k}"
            try:
                out[key] = iterator_state.save(it)
            except iterator_state.NotCheckpointable as e:
                out[key] = None
                if key not in self._warned:
                    self._warned.add(key)
                    _log.warning(
                        "the tf.data pipeline of task %s cannot be checkpointed (%s): its data "
                        "position is saved as a batch count and a resume replays the batches",
                        self.task_names[t],
                        e,
                    )
        return out

    def get_state(self) -> dict:
        """The position as a JSON-able dict (see the module docstring). In a multi-process run
        this is a collective: every process must call it at the same step."""
        if not self.sharded:
            return {"index": self.index}
        local = self._local_states()
        if self._gather and self.process_count > 1:
            parts = distributed.allgather_bytes(json.dumps(local).encode())
            local = merge_states([{"iterators": json.loads(p)} for p in parts])["iterators"]
        return {"index": self.index, "num_shards": self.num_shards, "iterators": local}

    def set_state(self, state: dict) -> None:
        """Continues from a position `get_state` returned (possibly on another process count
        that divides its shard count: see the module docstring)."""
        self.index = int(state["index"])
        self._its = None
        self._pending = {}
        if not self.sharded:
            return
        saved = int(state.get("num_shards", 1))
        wanted = getattr(self.cfg, "num_shards", None)
        origin = (
            "a checkpoint written before per-host input shards"
            if "num_shards" not in state
            else "the checkpoint"
        )
        if wanted is not None and wanted != saved:
            raise CheckpointError(
                f"{origin} has {saved} input shards and DataConfig.num_shards={wanted}: the data "
                f"stream would change; set DataConfig.num_shards={saved} to resume"
            )
        if saved % self.process_count or self.cfg.batch_size % saved:
            counts = [n for n in range(1, saved + 1) if saved % n == 0]
            raise CheckpointError(
                f"{origin} has {saved} input shards (its data position) and this run has "
                f"{self.process_count} processes, which cannot split them evenly: resume on a "
                f"process count that divides {saved} ({', '.join(map(str, counts))})"
            )
        self._set_layout(saved)
        self._pending = dict(state.get("iterators") or {})


def merge_states(states: list[dict]) -> dict:
    """One position from the `get_state` of every process of a job (simulated processes): the
    union of their shards' iterator states, the first one's other fields."""
    merged = dict(states[0])
    iterators: dict = {}
    for s in states:
        iterators.update(s.get("iterators") or {})
    merged["iterators"] = iterators
    return merged


def _mixture_rates(name: str) -> tuple[list[str], np.ndarray]:
    """(task names, sampling probabilities) of a mixture; a task name is an error."""
    import seqio  # lazy on purpose: TensorFlow (synthetic runs never import it)

    provider = seqio.get_mixture_or_task(name)
    if not isinstance(provider, seqio.Mixture):
        raise ConfigError(
            f"Invalid DataConfig: one_task_per_batch=True needs a mixture; {name!r} is a task"
        )
    tasks = provider.tasks
    rates = np.asarray([float(provider.get_rate(t)) for t in tasks])
    if not np.all(rates >= 0) or rates.sum() <= 0:
        raise ConfigError(f"mixture {name!r} has rates {rates.tolist()}: need >= 0, not all 0")
    return [t.name for t in tasks], rates / rates.sum()
