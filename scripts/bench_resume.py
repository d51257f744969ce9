"""Time from start to the first resumed batch of a seqio pipeline, at data position 100 and
100,000: the checkpointed tf.data iterator state against a replay of the batches.

    python scripts/bench_resume.py [--positions 100 10000 100000] [--repeats 5] [--replay-max 10000]

The task is cheap and synthetic (random documents of 5..60 tokens from a seeded source, EOS
appended, shuffled with seqio's default buffer of 1,000, packed into rows of 64 tokens, batch
8), so the positions are reached quickly; what a resume costs is the pipeline's, not the task's.
For each position the script runs one iterator there (also the cost of a replay, timed), saves
its position (`get_state`), and times a fresh `SeqioIterator` from construction through
`set_state` to its first batch (median of --repeats), once with the saved iterator state and
once replaying (the position without its iterator state: what every resume did before; timed
up to --replay-max, as it grows linearly). A fresh iterator's first batch (no position) is the
baseline. Goal: resume at the largest position <= 2x the smallest.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TASK = "bench_resume_synthetic"
BATCH, LENGTH, VOCAB = 8, 64, 1000


def register() -> None:
    import seqio
    import tensorflow as tf

    def dataset(split, shuffle_files=False, seed=None):
        del split, shuffle_files, seed

        def doc(i):
            seed = tf.stack([i, tf.constant(7, tf.int64)])
            n = tf.random.stateless_uniform([], seed, 5, 60, tf.int32)
            tokens = tf.random.stateless_uniform([n], seed + 1, 2, VOCAB, tf.int32)
            return {"targets": tokens}

        return tf.data.Dataset.range(10_000).map(doc)

    if TASK not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            TASK,
            source=seqio.FunctionDataSource(dataset, splits=["train"]),
            output_features={
                "targets": seqio.Feature(seqio.PassThroughVocabulary(VOCAB, eos_id=1))
            },
            preprocessors=[seqio.preprocessors.append_eos_after_trim],
        )


def config():
    from encdec_adapt.data import input_pipeline

    return input_pipeline.DataConfig(
        task=TASK, batch_size=BATCH, task_feature_lengths={"targets": LENGTH}, pack=True
    )


def first_batch_after(state: dict) -> tuple[float, dict]:
    """Seconds from a fresh iterator to its first batch at `state`, and that batch."""
    from encdec_adapt.data.seqio_iterator import SeqioIterator

    start = time.perf_counter()
    it = SeqioIterator(config())
    it.set_state(state)
    batch = next(it)
    return time.perf_counter() - start, batch


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--positions", type=int, nargs="+", default=[100, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--replay-max", type=int, default=10_000, help="time replays only up to this position"
    )
    args = parser.parse_args()
    import numpy as np

    from encdec_adapt.data.seqio_iterator import SeqioIterator

    register()
    fresh = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        next(SeqioIterator(config()))
        fresh.append(time.perf_counter() - start)
    it = SeqioIterator(config())
    rows = []
    done, t_run = 0, 0.0
    for position in sorted(args.positions):
        start = time.perf_counter()
        while done < position:
            next(it)
            done += 1
        t_run += time.perf_counter() - start
        state = it.get_state()
        expected = next(it)
        done += 1
        size = len(json.dumps(state))
        restore = []
        for _ in range(args.repeats):
            seconds, batch = first_batch_after(state)
            for k in expected:  # the resumed batch is the one the run would have seen
                np.testing.assert_array_equal(batch[k], expected[k], err_msg=k)
            restore.append(seconds)
        replay = None
        if position <= args.replay_max:
            seconds, batch = first_batch_after({**state, "iterators": {}})
            for k in expected:
                np.testing.assert_array_equal(batch[k], expected[k], err_msg=k)
            replay = seconds
        rows.append((position, statistics.median(restore), replay, size, t_run))
    print(f"machine: {os.cpu_count()} CPU cores; task: synthetic, packed, batch {BATCH} x {LENGTH}")
    print(f"fresh start to first batch: {statistics.median(fresh):.2f} s")
    print("| data position | resume from iterator state (s) | resume by replay (s) | "
          "state size (JSON bytes) |")  # fmt: skip
    print("|---:|---:|---:|---:|")
    for position, restore, replay, size, _ in rows:
        shown = f"{replay:.2f}" if replay is not None else "-"
        print(f"| {position:,} | {restore:.2f} | {shown} | {size:,} |")
    ratio = rows[-1][1] / rows[0][1]
    verdict = "OK (<= 2)" if ratio <= 2 else "ABOVE the goal of 2"
    print(f"resume at {rows[-1][0]:,} / resume at {rows[0][0]:,} = {ratio:.2f}x  {verdict}")
    return 0 if ratio <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
