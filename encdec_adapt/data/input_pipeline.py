"""Checkpointable batch iterators: a seqio task / mixture (or synthetic tokens) -> numpy batches.

Every iterator is deterministic given its seed and has a position (`get_state` / `set_state`, a
small JSON-able dict) that the trainer checkpoints with the model, so a resumed run sees exactly
the batches an uninterrupted run would have seen. Each process yields only its rows of the global
batch (the `jax.process_index()`-th slice), which `Trainer.shard_batch` assembles into global
arrays.

How much of the data each process reads:
- seqio training data (`DataConfig`, repeat=True): only its input shards, so per-host input work
  is O(global batch / processes); its position is the tf.data iterator state, restored in
  constant time. What does and does not depend on the process count: data/seqio_iterator.py.
- one-pass seqio data (repeat=False: evaluation, inference) and JSONL inputs: every process reads
  the whole stream and keeps its rows (the same number of batches everywhere).
- synthetic data: every process computes the (cheap, numpy) global batch and keeps its rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import gin
import numpy as np

from encdec_adapt.data.jsonl_inputs import JsonlInputs, JsonlIterator
from encdec_adapt.data.seqio_iterator import SeqioIterator
from encdec_adapt.data.task_names import UnknownTaskError, check_task_name, vocabularies
from encdec_adapt.errors import ConfigError
from encdec_adapt.parallel.distributed import local_rows

__all__ = [  # the task-name helpers are re-exported: callers know them from here
    "DataConfig",
    "JsonlInputs",
    "SeqioIterator",
    "SyntheticConfig",
    "SyntheticLM",
    "UnknownTaskError",
    "check_task_name",
    "make_iterator",
    "vocabularies",
]

Batch = dict[str, np.ndarray]
FEATURE_CONVERTERS = (
    "decoder",
    "prefix_lm",
    "encdec",
    "encdec_kd",
    "dual_encoder",
    "classification",
)


class SyntheticLM:
    """Random token sequences for decoder-only next-token prediction (tests, benchmarks).

    Batch i is a pure function of (seed, i): rows copy a random "document" twice so the task is
    learnable (the second half repeats the first).
    """

    def __init__(self, batch_size: int, length: int, vocab_size: int, seed: int = 0):
        self.batch_size, self.length, self.vocab_size, self.seed = (
            batch_size,
            length,
            vocab_size,
            seed,
        )
        self.index = 0

    def global_batch(self, index: int) -> Batch:
        rng = np.random.default_rng([self.seed, index])
        half = (self.length + 1) // 2 + 1
        doc = rng.integers(2, self.vocab_size, (self.batch_size, half), dtype=np.int32)
        seq = np.concatenate([doc, doc], axis=1)[:, : self.length + 1]
        return {
            "decoder_input_tokens": seq[:, :-1],
            "decoder_target_tokens": seq[:, 1:],
            "decoder_loss_weights": np.ones((self.batch_size, self.length), np.int32),
        }

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.global_batch(self.index)
        self.index += 1
        rows = local_rows(self.batch_size)
        return {k: v[rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A seqio task or mixture fed as batches.

    Attributes:
      task: registered seqio task or mixture name.
      batch_size: global batch size (rows over all processes).
      task_feature_lengths: e.g. {"targets": 128} (decoder) or {"inputs": 512, "targets": 128}.
      split: dataset split.
      feature_converter: "decoder" (seqio DecoderFeatureConverter), "prefix_lm"
        (PrefixLMFeatureConverter: inputs + targets in one decoder sequence), "encdec", or
        "encdec_kd" (encdec_adapt.data's EncDecConverter(teacher=True), unpacked: adds the
        decoder-only teacher's features for PrefixLM + KD tasks such as stdlib_prefix_lm_kd),
        "dual_encoder" (query_tokens, positive_tokens[, negative_tokens]; lengths {"query",
        "positive"}), or "classification" (encoder_input_tokens [B, L], labels [B]; lengths
        {"inputs"}).
      pack: pack several examples per row (segment ids / positions features).
      length_policy: what happens to a feature longer than its length: "truncate" or "drop"
        the example; either way it is counted (`encdec_adapt.data.counters.COUNTERS`), never
        silent ("prefix_lm" uses seqio's converter, which truncates uncounted).
      shuffle: shuffle examples (seeded).
      seed: shuffle seed.
      repeat: loop over the data forever (training) or yield one epoch (evaluation).
      use_cached: read seqio's offline cache.
      one_task_per_batch: with a mixture, every batch comes from one of its tasks, chosen by the
        mixture rates with an RNG seeded by (seed, batch index) (the Gemini Embedding recipe:
        in-batch negatives from the same task). Needs repeat=True, and tasks that give the same
        features (e.g. all with or all without hard negatives): the train step is compiled for
        one batch structure.
      num_shards: input shards of repeating data (data/seqio_iterator.py): the global batch is
        num_shards pipelines' batches of batch_size / num_shards rows, each over its part of the
        examples; a process reads only its num_shards / processes of them. None (default): one
        per process of the run's first start. Set it to a multiple of every process count you
        will use (dividing batch_size) to get the same batches on any of them. Ignored by
        one-pass data (repeat=False), which every process reads whole.
    """

    task: str = ""
    batch_size: int = 8
    task_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"targets": 128})
    split: str = "train"
    feature_converter: str = "decoder"
    pack: bool = False
    length_policy: str = "truncate"
    shuffle: bool = True
    seed: int = 0
    repeat: bool = True
    use_cached: bool = False
    one_task_per_batch: bool = False
    num_shards: int | None = None

    def __post_init__(self):
        if self.task is gin.REQUIRED:
            raise ConfigError(
                "Missing required value: DataConfig.task=%gin.REQUIRED (set the macro that feeds "
                "it, e.g. --gin.TRAIN_TASK=my_task)"
            )
        problems = []
        if not isinstance(self.task, str) or not self.task:
            problems.append(f"task={self.task!r} must be a seqio task or mixture name")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be a positive int")
        if self.feature_converter not in FEATURE_CONVERTERS:
            problems.append(
                f"feature_converter={self.feature_converter!r} (expected one of "
                f"{FEATURE_CONVERTERS})"
            )
        if self.length_policy not in ("truncate", "drop"):
            problems.append(f"length_policy={self.length_policy!r} (expected 'truncate' or 'drop')")
        lengths = self.task_feature_lengths
        if not isinstance(lengths, dict) or not all(
            isinstance(v, int) and v > 0 for v in lengths.values()
        ):
            problems.append(f"task_feature_lengths={lengths!r} must map feature -> int > 0")
        if self.num_shards is not None and (
            not isinstance(self.num_shards, int)
            or self.num_shards < 1
            or (isinstance(self.batch_size, int) and self.batch_size % self.num_shards)
        ):
            problems.append(
                f"num_shards={self.num_shards!r} must be a positive int dividing "
                f"batch_size={self.batch_size!r}"
            )
        if self.one_task_per_batch and not self.repeat:
            problems.append("one_task_per_batch=True needs repeat=True (tasks run out unevenly)")
        if problems:
            raise ConfigError("Invalid DataConfig: " + "; ".join(problems))

    def converter(self):
        import seqio  # lazy on purpose: TensorFlow (synthetic runs never import it)

        from encdec_adapt.data import feature_converters as fc  # lazy on purpose: TensorFlow

        if self.feature_converter == "decoder":
            return fc.DecoderOnlyConverter(pack=self.pack, length_policy=self.length_policy)
        if self.feature_converter == "prefix_lm":
            return seqio.PrefixLMFeatureConverter(pack=self.pack)
        if self.feature_converter == "dual_encoder":
            return fc.DualEncoderConverter(length_policy=self.length_policy)
        if self.feature_converter == "classification":
            return fc.ClassificationConverter(length_policy=self.length_policy)
        if self.feature_converter == "encdec_kd":
            return fc.EncDecConverter(pack=False, teacher=True, length_policy=self.length_policy)
        return fc.EncDecConverter(pack=self.pack, length_policy=self.length_policy)


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic next-token data (`SyntheticLM`): for smoke tests and benchmarks.

    Attributes: batch_size (global), length (tokens per row), vocab_size, seed.
    """

    batch_size: int = 8
    length: int = 32
    vocab_size: int = 256
    seed: int = 0


def check_ends(cfg, num_batches: int | None, what: str = "evaluation") -> None:
    """Raises ConfigError when reading `cfg` for `num_batches` batches (None: until the data
    ends) would never end: synthetic data and repeating seqio data are endless."""
    endless = isinstance(cfg, SyntheticConfig) or (isinstance(cfg, DataConfig) and cfg.repeat)
    if num_batches is None and endless:
        name = getattr(cfg, "task", "synthetic")
        raise ConfigError(
            f"this {what} would never end: its data ({type(cfg).__name__}, task {name!r}) "
            "repeats forever and no batch count is set; set repeat=False for one pass, or a "
            "number of batches"
        )


def vocab_size(cfg) -> int | None:
    """The number of token ids the data can produce (its tokenizer's vocabulary; the largest
    over a task's features), or None when unknown."""
    if isinstance(cfg, SyntheticConfig):
        return cfg.vocab_size
    if isinstance(cfg, DataConfig):
        return max(v.vocab_size for v in vocabularies(cfg.task).values())
    if isinstance(cfg, JsonlInputs):
        return max(v.vocab_size for v in cfg.vocabularies().values())
    return None


def make_iterator(cfg: DataConfig | SyntheticConfig):
    """The checkpointable iterator of a data config."""
    if isinstance(cfg, SyntheticConfig):
        return SyntheticLM(cfg.batch_size, cfg.length, cfg.vocab_size, cfg.seed)
    if isinstance(cfg, DataConfig):
        return SeqioIterator(cfg)
    if isinstance(cfg, JsonlInputs):
        return JsonlIterator(cfg)
    raise TypeError(f"expected a DataConfig, SyntheticConfig or JsonlInputs, got {cfg!r}")
