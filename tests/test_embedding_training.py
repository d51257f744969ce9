"""Data for embedding / classifier training: one task per batch from a mixture (deterministic,
resumable), the stdlib_code_match task, and an exact resume of a dual-encoder `train` run."""

import os
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf

from encdec_adapt.data import input_pipeline

VOCAB = 64
LOW, HIGH = "tiny_low_tokens", "tiny_high_tokens"
MIXTURE = "tiny_low_high_mixture"


def _source(low, high):
    def dataset(split, shuffle_files=False, seed=None):
        del shuffle_files, seed
        rng = np.random.default_rng([low, 0 if split == "train" else 1])
        docs = [rng.integers(low, high, rng.integers(3, 10)).astype(np.int32) for _ in range(40)]
        return tf.data.Dataset.from_generator(
            lambda: ({"targets": d} for d in docs),
            output_signature={"targets": tf.TensorSpec([None], tf.int32)},
        )

    return seqio.FunctionDataSource(dataset, splits=["train", "validation"])


def _register():
    """Two tasks with disjoint token ranges (2..31 and 32..63), mixed 3 : 1."""
    vocab = seqio.PassThroughVocabulary(VOCAB, eos_id=1)
    for name, (low, high) in ((LOW, (2, 32)), (HIGH, (32, 64))):
        if name not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                name,
                source=_source(low, high),
                output_features={"targets": seqio.Feature(vocab, add_eos=True)},
                preprocessors=[seqio.preprocessors.append_eos_after_trim],
            )
    if MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(MIXTURE, [(LOW, 3.0), (HIGH, 1.0)])


def _config(**kw):
    _register()
    args = dict(
        task=MIXTURE,
        batch_size=4,
        task_feature_lengths={"targets": 12},
        one_task_per_batch=True,
        seed=3,
    )
    args.update(kw)
    return input_pipeline.DataConfig(**args)


def _source_of(batch):
    """ "low" / "high" when every token of the batch is from one task, else "mixed"."""
    tokens = batch["decoder_target_tokens"]
    tokens = tokens[tokens > 1]
    if np.all(tokens < 32):
        return "low"
    return "high" if np.all(tokens >= 32) else "mixed"


def test_one_task_per_batch_by_mixture_rates():
    it = input_pipeline.make_iterator(_config())
    sources = [_source_of(next(it)) for _ in range(60)]
    assert "mixed" not in sources
    assert 0.6 < sources.count("low") / 60 < 0.9, sources  # rate 3 : 1
    # the default mixture (one_task_per_batch=False) mixes examples within a batch
    plain = input_pipeline.make_iterator(_config(one_task_per_batch=False))
    assert "mixed" in [_source_of(next(plain)) for _ in range(20)]
    with pytest.raises(ValueError, match="one_task_per_batch=True needs a mixture"):
        input_pipeline.make_iterator(_config(task=LOW))
    with pytest.raises(ValueError, match="needs repeat=True"):
        _config(repeat=False)


def test_one_task_per_batch_is_deterministic_and_resumes_exactly():
    a = input_pipeline.make_iterator(_config())
    reference = [next(a) for _ in range(14)]
    b = input_pipeline.make_iterator(_config())
    for want in reference[:5]:
        got = next(b)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    c = input_pipeline.make_iterator(_config())
    c.set_state(b.get_state())  # a fresh iterator restored at batch 5
    for want in reference[5:]:
        got = next(c)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("task", ["stdlib_code_match", "stdlib_code_match_other"])
def test_code_match_task(embedded_corpus, task):
    cfg = input_pipeline.DataConfig(
        task=task,
        batch_size=16,
        task_feature_lengths={"inputs": 64},
        feature_converter="classification",
        split="validation",
        shuffle=False,
        repeat=False,
    )
    batches = list(input_pipeline.make_iterator(cfg))
    labels = np.concatenate([b["labels"] for b in batches])
    assert set(labels.tolist()) == {0, 1} and abs(labels.mean() - 0.5) < 0.01
    first = batches[0]
    assert first["encoder_input_tokens"].shape == (16, 64)
    vocab = input_pipeline.vocabularies(task)["inputs"]
    text = vocab.decode(first["encoder_input_tokens"][0].tolist())
    assert text.startswith("task: code match | query: ") and " | code: " in text
    # the pair of a query: its own function (1), then a hard negative (0)
    assert first["labels"][:2].tolist() == [1, 0]
    second = vocab.decode(first["encoder_input_tokens"][1].tolist())
    assert text.split(" | code: ")[0] == second.split(" | code: ")[0]


def test_doc_topic_task(embedded_corpus):
    from encdec_adapt.data import classification

    cfg = input_pipeline.DataConfig(
        task="stdlib_doc_topic",
        batch_size=32,
        task_feature_lengths={"inputs": 32},
        feature_converter="classification",
        split="validation",
        shuffle=False,
        repeat=False,
    )
    labels = np.concatenate([b["labels"] for b in input_pipeline.make_iterator(cfg)])
    assert set(labels.tolist()) == set(range(len(classification.TOPICS)))


def _dual_encoder_run(model_dir, stop_after=None, seed=0):
    """A tiny dual encoder on stdlib_code_search_hard_negatives for 4 steps (checkpoint each 2)."""
    from encdec_adapt.models.embedding import DualEncoderModel
    from encdec_adapt.nn.config import load_preset
    from encdec_adapt.nn.dual_encoder import DualEncoderConfig
    from encdec_adapt.parallel import sharding
    from encdec_adapt.runtime import checkpoints, optim, train

    tower = load_preset("gemma_tiny").replace(num_layers=1, embed_dim=32, hidden_dim=64)
    return train.train(
        model_dir=str(model_dir),
        model=DualEncoderModel(config=DualEncoderConfig(tower=tower, learn_temperature=True)),
        train_data=input_pipeline.DataConfig(
            task="stdlib_code_search_hard_negatives",
            batch_size=8,
            task_feature_lengths={"query": 16, "positive": 32},
            feature_converter="dual_encoder",
        ),
        num_steps=4,
        optimizer=optim.OptimizerConfig(learning_rate=1e-3),
        mesh_rules=sharding.MeshRules(mesh_shape=(1, -1, 1)),
        checkpoint=checkpoints.CheckpointConfig(save_interval_steps=2, async_save=False),
        log_every=1,
        tensorboard=False,
        stop_after=stop_after,
        seed=seed,
    )


@pytest.mark.slow  # three compiles of an 8-device train step: about a minute on 2 quiet cores
def test_dual_encoder_run_resumes_exactly(embedded_corpus, tmp_path):
    """Stopped after 2 steps and resumed: the step-2 checkpoint equals the uninterrupted run's
    step 2, and every leaf of the step-4 train state (params, Adam moments, learned temperature,
    step, RNG) equals the uninterrupted run's, bit for bit. The resumed invocation has another
    init seed, so a run that silently started over could not match."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train_resume import state_at, steps_on_disk

    straight = _dual_encoder_run(tmp_path / "straight")
    _dual_encoder_run(tmp_path / "resumed", stop_after=2)
    assert steps_on_disk(str(tmp_path / "resumed")) == [2]
    a, b = state_at(str(tmp_path / "straight"), 2), state_at(str(tmp_path / "resumed"), 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    resumed = _dual_encoder_run(tmp_path / "resumed", seed=7)
    assert resumed["loss"] == straight["loss"] and resumed["accuracy"] == straight["accuracy"]
    a, b = state_at(str(tmp_path / "straight"), 4), state_at(str(tmp_path / "resumed"), 4)
    assert a.keys() == b.keys() and any("log_temperature" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
