"""Per-host input shards and the O(1) data position of `SeqioIterator` (data/seqio_iterator.py).

Processes are simulated (`process_index` / `process_count`): the rows a process yields are what
it would feed in a real multi-process run (tests/test_multiprocess.py trains with real ones).
The test task's documents are runs of one token, `doc_id + 2`, so every packed row says which
examples it holds; a counter in its first preprocessor counts the examples each pipeline
tokenizes (reads past the shard split).
"""

import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from encdec_adapt.data import input_pipeline
from encdec_adapt.data.counters import Counters
from encdec_adapt.data.seqio_iterator import SeqioIterator, merge_states
from encdec_adapt.errors import CheckpointError, ConfigError

TASK, OTHER, MIXTURE = "shards_ids", "shards_ids_high", "shards_ids_mixture"
DOCS, VOCAB, HIGH = 400, 1024, 600
COUNTS = Counters()


def _source(offset):
    def dataset(split, shuffle_files=False, seed=None):
        del split, shuffle_files, seed

        def doc(i):
            length = 3 + (i * 7) % 10  # 3..12 tokens: rows pack and pad unevenly
            return {"targets": tf.fill([length], tf.cast(i, tf.int32) + offset + 2)}

        return tf.data.Dataset.range(DOCS).map(doc)

    return seqio.FunctionDataSource(dataset, splits=["train"])


def _count(ds):
    def count(ex):
        COUNTS.add("tokenized", 1)
        return ex

    return ds.map(count)


def _register():
    vocab = seqio.PassThroughVocabulary(VOCAB, eos_id=1)
    for name, offset in ((TASK, 0), (OTHER, HIGH)):
        if name not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                name,
                source=_source(offset),
                output_features={"targets": seqio.Feature(vocab, add_eos=True)},
                preprocessors=[_count, seqio.preprocessors.append_eos_after_trim],
                shuffle_buffer_size=16,
            )
    if MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(MIXTURE, [(TASK, 1.0), (OTHER, 1.0)])


def _config(**kw):
    _register()
    args = dict(task=TASK, batch_size=8, task_feature_lengths={"targets": 24}, pack=True, seed=5)
    args.update(kw)
    return input_pipeline.DataConfig(**args)


def _process(cfg, index, count):
    return SeqioIterator(cfg, process_index=index, process_count=count)


def _doc_ids(batch):
    tokens = batch["decoder_target_tokens"]
    return set((tokens[tokens > 1] - 2).tolist())


def _global(iterators):
    """The next global batch: every process's rows, in process order."""
    parts = [next(it) for it in iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_each_process_tokenizes_and_packs_only_its_share():
    cfg, steps = _config(num_shards=2), 60
    counts, ids, packed = [], [], []
    for p in range(2):
        COUNTS.reset()
        it = _process(cfg, p, 2)
        batches = [next(it) for _ in range(steps)]
        counts.append(COUNTS.result()["tokenized"])
        ids.append(set().union(*map(_doc_ids, batches)))
        # examples packed into this process's rows: one segment each
        packed.append(
            sum(
                len(set(row[row > 0].tolist())) for b in batches for row in b["decoder_segment_ids"]
            )
        )
        assert all(len(b["decoder_target_tokens"]) == 4 for b in batches)  # 8 rows / 2
    # ds.shard(2, k) over the source's order: shard 0 holds the even documents, shard 1 the odd
    assert ids[0] and all(i % 2 == 0 for i in ids[0])
    assert ids[1] and all(i % 2 == 1 for i in ids[1])
    for p in range(2):
        # what it tokenized is what it packed plus a read-ahead (shuffle buffer of 16, prefetch);
        # reading the whole stream it would tokenize all the global batches' examples
        assert packed[p] <= counts[p] < 0.75 * sum(packed), (counts, packed)


@pytest.mark.parametrize(
    ("shards", "counts"),
    [(2, (1, 2)), pytest.param(4, (1, 2, 4), marks=pytest.mark.slow)],  # slow: 12 pipelines
)
def test_global_batches_do_not_depend_on_the_process_count(shards, counts):
    cfg = _config(num_shards=shards)
    runs = {}
    for n in counts:
        its = [_process(cfg, p, n) for p in range(n)]
        runs[n] = [_global(its) for _ in range(4)]
    for n in counts[1:]:
        for a, b in zip(runs[1], runs[n]):
            _equal(a, b)
    weights = np.stack([b["decoder_loss_weights"] for b in runs[1]])
    assert 0 < weights.mean() < 1  # padding: the losses see non-uniform weights
    # the default: one shard per process
    default = _process(_config(), 1, 2)
    assert default.num_shards == 2 and list(default.shards) == [1]


def test_state_round_trip_is_bit_identical_and_json(caplog):
    cfg = _config(num_shards=2)
    it = SeqioIterator(cfg)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["index"] == 7 and state["num_shards"] == 2
    assert sorted(state["iterators"]) == ["0/0", "0/1"]
    expected = [next(it) for _ in range(5)]
    resumed = SeqioIterator(cfg)
    resumed.set_state(state)
    for want in expected:
        _equal(next(resumed), want)
    # a position saved before the first batch after a restore is the restored one
    again = SeqioIterator(cfg)
    again.set_state(state)
    assert again.get_state() == state
    # a damaged state is replayed (same batches) with a warning naming the shard
    damaged = json.loads(json.dumps(state))
    damaged["iterators"]["0/1"] = {".index": "not base64 of a checkpoint"}
    replayed = SeqioIterator(cfg)
    replayed.set_state(damaged)
    for want in expected:
        _equal(next(replayed), want)
    assert (
        "shard 1 does not fit its pipeline" in caplog.text and "replaying 7 batches" in caplog.text
    )


def test_two_process_position_resumes_on_one_and_four_is_refused():
    cfg = _config()  # num_shards unset: 2 shards, from the 2-process start
    procs = [_process(cfg, p, 2) for p in range(2)]
    for _ in range(6):
        _global(procs)
    state = merge_states([p.get_state() for p in procs])
    expected = [_global(procs) for _ in range(3)]
    single = SeqioIterator(cfg)
    single.set_state(state)
    assert single.num_shards == 2 and list(single.shards) == [0, 1]
    for want in expected:
        _equal(next(single), want)
    with pytest.raises(CheckpointError, match=r"has 2 input shards.* 4 processes.*\(1, 2\)"):
        _process(cfg, 0, 4).set_state(state)
    with pytest.raises(CheckpointError, match=r"DataConfig\.num_shards=4"):
        _process(_config(num_shards=4), 0, 1).set_state(state)
    # a position from before input shards is one shard: one process replays it, two refuse
    legacy = SeqioIterator(cfg)
    legacy.set_state({"index": 2})
    plain = SeqioIterator(_config(num_shards=1))
    plain.set_state({"index": 0})
    for _ in range(2):
        next(plain)
    _equal(next(legacy), next(plain))
    with pytest.raises(CheckpointError, match=r"before per-host input shards.* 2 processes"):
        _process(cfg, 0, 2).set_state({"index": 2})


def test_resume_reads_the_same_number_of_examples_at_any_position():
    """The bench's property, untimed: after a restore, the first batch tokenizes a bounded number
    of examples (buffers refilling), whatever the position; a replay tokenizes them all."""
    cfg = _config(num_shards=1)
    reads = {}
    for position in (3, 60):
        it = SeqioIterator(cfg)
        for _ in range(position):
            next(it)
        state = it.get_state()
        for name, s in (("restore", state), ("replay", {**state, "iterators": {}})):
            resumed = SeqioIterator(cfg)
            resumed.set_state(s)
            COUNTS.reset()
            next(resumed)
            reads[name, position] = COUNTS.result()["tokenized"]
    assert reads["restore", 60] <= reads["restore", 3] + 8, reads
    assert reads["replay", 60] > reads["replay", 3] + 100, reads  # the counter sees replays


@pytest.mark.slow  # 12 s of pipeline builds; the default suite has no time left for it
def test_one_task_per_batch_mixture_over_shards():
    cfg = _config(task=MIXTURE, one_task_per_batch=True, num_shards=2)
    procs = [_process(cfg, p, 2) for p in range(2)]
    batches = [_global(procs) for _ in range(12)]
    kinds = {max(_doc_ids(b)) >= HIGH for b in batches} | {
        min(_doc_ids(b)) >= HIGH for b in batches
    }
    assert kinds == {True, False}  # both tasks give batches
    for b in batches:  # every global batch from one task, on both processes
        ids = _doc_ids(b)
        assert all(i >= HIGH for i in ids) or all(i < HIGH for i in ids)
    state = merge_states([p.get_state() for p in procs])
    assert sorted(state["iterators"]) == ["0/0", "0/1", "1/0", "1/1"]
    expected = [_global(procs) for _ in range(4)]
    single = SeqioIterator(cfg)
    single.set_state(json.loads(json.dumps(state)))
    for want in expected:
        _equal(next(single), want)


def test_bad_shard_counts_are_config_errors():
    with pytest.raises(ConfigError, match="num_shards=3 must be a positive int dividing"):
        _config(num_shards=3)
    with pytest.raises(ConfigError, match="4 input shards cannot be split evenly over 3"):
        _process(_config(num_shards=4), 0, 3)


def test_one_pass_data_is_read_whole_by_every_process():
    """Evaluation data (repeat=False) is not sharded: both processes see the same number of
    batches, and their rows together are the single-process batches."""
    cfg = _config(repeat=False, shuffle=False, num_shards=2)
    single = list(SeqioIterator(cfg))
    parts = [list(_process(cfg, p, 2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)
    for i, want in enumerate(single):
        got = {k: np.concatenate([parts[0][i][k], parts[1][i][k]]) for k in want}
        _equal(got, want)
