"""The embedded corpus (TFDS builders), registered tasks, user registration and the CLI."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ast

import numpy as np
import pytest
import seqio
import tensorflow as tf

from encdec_adapt.cli import main as cli_main
from encdec_adapt.cli import tasks as cli
from encdec_adapt.data import corpus, counters, registry
from encdec_adapt.data import feature_converters as fc

LENGTHS = {"inputs": 128, "targets": 32}


pytestmark = pytest.mark.usefixtures("embedded_corpus")


def read(name, split):
    return list(corpus.load(name, split).as_numpy_iterator())


def test_code_search_splits_share_no_function_and_drop_docstrings():
    splits = {s: read("stdlib_code_search", s) for s in ("train", "validation", "test")}
    ids = {s: {ex["id"] for ex in exs} for s, exs in splits.items()}
    assert len(splits["train"]) > 5 * len(splits["test"]) > 500
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    for exs in splits.values():
        positives = {ex["positive"] for ex in exs}
        for ex in exs:
            assert ex["query"] and set(ex["negatives"]) <= positives  # same-split negatives
            assert ex["positive"] not in set(ex["negatives"])
        for ex in exs[:200]:
            (fn,) = ast.parse(ex["positive"].decode()).body
            assert ast.get_docstring(fn) is None, ex["id"]


def test_prose_train_split_holds_no_held_out_function_docstring():
    held_out = {ex["id"] for s in ("validation", "test") for ex in read("stdlib_code_search", s)}
    prose = read("stdlib_prose", "train")
    assert len(prose) > 3000 and all(ex["text"].strip() for ex in prose)
    assert not {ex["id"] for ex in prose} & held_out
    assert any(ex["id"].startswith(b"pydoc_data.topics.") for ex in prose)


def test_registered_tasks_give_packed_batches_and_seeds_decide_examples():
    def batch(seed):
        ds = registry.get_dataset(
            "stdlib_ul2", LENGTHS, fc.EncDecConverter(pack=True), batch_size=4, seed=seed
        )
        return next(ds.as_numpy_iterator())

    a, b, c = batch(0), batch(0), batch(1)
    assert a["encoder_input_tokens"].shape == (4, 128)
    assert a["decoder_target_tokens"].shape == (4, 32)
    assert (a["encoder_segment_ids"].max(axis=1) > 1).any()  # packed
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["encoder_input_tokens"], c["encoder_input_tokens"])


def test_every_default_embedded_task_yields_examples():
    for name in ("stdlib_span_corruption", "stdlib_prefix_lm", "stdlib_prefix_lm_kd",
                 "stdlib_pretraining", "stdlib_code_search_hard_negatives"):  # fmt: skip
        lengths = dict(LENGTHS, query=32, positive=128)
        ex = next(
            registry.get_dataset(name, lengths, split="validation", seed=0).as_numpy_iterator()
        )
        assert set(ex) >= ({"query", "positive"} if "code" in name else {"inputs", "targets"})


def test_unknown_task_lists_the_closest_names():
    with pytest.raises(registry.UnknownTaskError, match="stdlib_ul2") as e:
        registry.get_task_or_mixture("stdlib_ul3")
    assert "closest registered names" in str(e.value)


def test_user_task_in_one_call_drops_and_counts_empty_documents():
    own = counters.Counters()
    texts = ["A first document about parsing.", "", "   ", "Another one, longer " * 20]

    def dataset_fn(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"body": texts})

    registry.register_pretraining_task(
        "test_user_span_corruption",
        seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        objective="span_corruption",
        text_key="body",
        counters=own,
        overwrite=True,
    )
    try:
        exs = list(
            registry.get_dataset("test_user_span_corruption", LENGTHS, seed=0).as_numpy_iterator()
        )
        assert own.result()["empty_documents"] == 2
        assert len(exs) >= 2 and all(
            ex["targets"][0] >= 4000 for ex in exs
        )  # starts with a sentinel
        with pytest.raises(ValueError, match="already registered"):
            registry.register_pretraining_task("test_user_span_corruption", "stdlib_prose")
    finally:
        seqio.TaskRegistry.remove("test_user_span_corruption")


def test_cli_lists_tasks_and_shows_decoded_examples(capsys):
    assert "tasks" in cli_main.COMMANDS
    assert cli.tasks_main([]) == 0
    listing = capsys.readouterr().out
    assert "stdlib_ul2" in listing and "c4_ul2" in listing and "stdlib_pretraining" in listing
    assert cli.tasks_main(["--show", "stdlib_span_corruption", "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "<extra_id_0>" in shown and "inputs (" in shown
    assert cli_main.main(["tasks", "--show", "stdlib_span_corruptio"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("encdec-adapt tasks: unknown seqio task") and "stdlib_span_corruption" in err
    )
