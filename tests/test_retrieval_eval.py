"""Retrieval metrics of embedding towers in evaluation: a contrastive task's metric function gets
the document and query embeddings of the eval batches (padding rows left out), equal to the
`embed` path's evaluation of the same texts; the trainer's periodic eval and `eval` log them;
`register_contrastive_task(retrieval_metric=False)` opts out."""

import json

import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from encdec_adapt import tasks
from encdec_adapt.data import input_pipeline
from encdec_adapt.evaluation import evaluator as evaluation
from encdec_adapt.evaluation import retrieval_metrics as rm
from encdec_adapt.evaluation.encode import TextEncoder
from encdec_adapt.models.embedding import DualEncoderModel
from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.dual_encoder import DualEncoderConfig
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim
from encdec_adapt.runtime.trainer import Trainer

TASK, NO_METRIC_TASK = "tiny_retrieval_eval", "tiny_retrieval_eval_no_metric"
QUERY_PROMPT, DOCUMENT_PROMPT = "query: ", "code: "
LENGTHS = {"query": 16, "positive": 24}
WORDS = ("read", "write", "sort", "merge", "parse", "split", "join", "count", "find", "load")


def _pairs(split: str) -> list[tuple[str, str]]:
    """11 validation pairs (row 10 shares row 3's positive), 24 training pairs; odd rows have
    documents over 24 tokens."""
    n = 11 if split == "validation" else 24
    rng = np.random.default_rng(0 if split == "validation" else 1)
    pairs = []
    for i in range(n):
        a, b = rng.choice(WORDS, 2, replace=False)
        code = f"def {a}_{b}_{i}(items): return {b}(items)"
        if i % 2:  # longer than the 24 document tokens: cut (EOS lost) as in training
            code = f'def {a}_{b}_{i}(items, key=None):\n    """{a} it."""\n    return {b}(items)'
        pairs.append((f"{a} the {b} items {i}", code))
    if split == "validation":
        pairs[10] = ("another query for the same function", pairs[3][1])
    return pairs


def _dataset(split, shuffle_files=False, seed=None):
    del shuffle_files, seed
    pairs = _pairs(split)
    return tf.data.Dataset.from_tensor_slices(
        {"query": [q for q, _ in pairs], "positive": [p for _, p in pairs]}
    )


def _register(name, **kw):
    return tasks.register_contrastive_task(
        name,
        seqio.FunctionDataSource(_dataset, splits=["train", "validation"]),
        query_prompt=QUERY_PROMPT,
        document_prompt=DOCUMENT_PROMPT,
        overwrite=True,
        **kw,
    )


def data(task=TASK, batch_size=4, split="validation", repeat=False):
    return input_pipeline.DataConfig(
        task=task,
        batch_size=batch_size,
        task_feature_lengths=dict(LENGTHS),
        split=split,
        feature_converter="dual_encoder",
        shuffle=False,
        repeat=repeat,
    )


def tiny_model():
    tower = load_preset("gemma_tiny").replace(num_layers=1, embed_dim=32, hidden_dim=64)
    return DualEncoderModel(config=DualEncoderConfig(tower=tower, projection_dims=(16,)))


@pytest.fixture(scope="module")
def setup():
    """The tasks and one single-device trainer with random towers."""
    _register(TASK)
    _register(NO_METRIC_TASK, retrieval_metric=False)
    rules = sharding.MeshRules(mesh_shape=(1, 1, 1))
    trainer = Trainer(
        tiny_model(), optim.OptimizerConfig(), rules.make_mesh(jax.devices()[:1]), rules
    )
    return trainer, trainer.init_state().params


def test_eval_batch_metrics_equal_embed_path_on_same_texts(setup):
    """11 rows in batches of 4 (the last padded): the metrics equal RetrievalSplit's evaluation
    of embeddings that `TextEncoder` (the `embed` command's encoder) computes from the raw
    texts, with the split's deduplicated documents as the corpus."""
    trainer, params = setup
    out = evaluation.run_eval(trainer, params, data(), None)
    assert set(rm.METRICS) <= set(out) and {"loss", "accuracy"} <= set(out)
    assert out["retrieval_queries"] == 11 and out["retrieval_documents"] == 10

    pairs = _pairs("validation")
    split = rm.RetrievalSplit.from_pairs("s", pairs, QUERY_PROMPT, DOCUMENT_PROMPT)
    assert len(split.documents) == 10
    vocab = input_pipeline.vocabularies(TASK)["query"]
    encoder = TextEncoder(trainer.module(params), vocab, batch_size=8)
    q = encoder.encode(split.queries, prompt=QUERY_PROMPT, side="query", max_length=16)
    d = encoder.encode(split.documents, prompt=DOCUMENT_PROMPT, side="document", max_length=24)
    assert encoder.stats.truncated > 0  # some documents are cut, the same way in both paths
    want = split.evaluate_embeddings(q, d)
    assert {k: out[k] for k in rm.METRICS} == pytest.approx(want, abs=1e-6)
    # non-trivial: random towers do not rank every positive first
    assert 0 < want["recall@1"] < 1

    rows = evaluation.embed_batches(trainer, params, data(), None)
    np.testing.assert_allclose(rows.queries, q, atol=2e-5)
    np.testing.assert_allclose(rows.documents, d[list(split.positives)], atol=2e-5)


def test_padding_rows_do_not_count(setup):
    """Batches of 4 (last one 3 rows + 1 padding row) give the metric function the same 11
    rows as one unpadded batch of 11; num_batches limits the rows (and the candidates)."""
    trainer, params = setup
    seen = []

    def record(targets, predictions):
        seen.append((np.asarray(targets), np.asarray(predictions)))
        return rm.retrieval_metric_fn(targets, predictions)

    task = seqio.get_mixture_or_task(TASK)
    padded = evaluation.embedding_task_metrics(trainer, params, data(batch_size=4), task, None)
    whole = evaluation.embedding_task_metrics(trainer, params, data(batch_size=11), task, None)
    assert padded == pytest.approx(whole, abs=1e-6)
    assert padded["retrieval_queries"] == 11

    from encdec_adapt.tasks import metric_tasks

    metric_tasks.register_with_metrics("tiny_retrieval_eval_recording", TASK, [record])
    cfg = data(task="tiny_retrieval_eval_recording", batch_size=4)
    evaluation.task_metrics(trainer, params, cfg, num_batches=None)
    targets, predictions = seen[-1]
    assert targets.shape == predictions.shape == (11, 16)
    np.testing.assert_allclose(np.linalg.norm(predictions, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(targets[3], targets[10])  # the shared positive, one document
    two = evaluation.task_metrics(trainer, params, cfg, num_batches=2)
    assert seen[-1][1].shape == (8, 16) and two["retrieval_documents"] == 8


def test_opt_out_and_default_tasks(setup, embedded_corpus):
    trainer, params = setup
    assert seqio.get_mixture_or_task(NO_METRIC_TASK).metric_fns == []
    out = evaluation.run_eval(trainer, params, data(task=NO_METRIC_TASK), None)
    assert set(out) == set(evaluation.loss_metrics(trainer, params, data(), None))
    assert not set(rm.METRICS) & set(out)
    for name in ("stdlib_code_search", "stdlib_code_search_hard_negatives"):
        assert seqio.get_mixture_or_task(name).predict_metric_fns == [rm.retrieval_metric_fn]
    assert seqio.get_mixture_or_task("stdlib_code_search_subtokens").metric_fns == [
        rm.retrieval_metric_fn
    ]
    # score metric functions do not apply to embeddings: a clear error, not a crash in decoding
    from encdec_adapt.tasks import metric_tasks

    metric_tasks.register_with_metrics(
        "tiny_retrieval_eval_scored", TASK, [lambda targets, scores: {"n": len(scores)}]
    )
    with pytest.raises(ValueError, match="has score metric functions"):
        evaluation.run_eval(trainer, params, data(task="tiny_retrieval_eval_scored"), 1)


def test_periodic_eval_and_eval_command_log_retrieval_metrics(setup, tmp_path):
    """Two training steps on 8 devices with an eval at step 2: the eval record has the retrieval
    metrics of the step-2 towers, equal to `eval` (infer.evaluate) of the saved checkpoint."""
    from encdec_adapt.runtime import checkpoints, infer
    from encdec_adapt.runtime import train as train_lib

    model, eval_data = tiny_model(), data(batch_size=8)
    train_lib.train(
        model_dir=str(tmp_path),
        model=model,
        train_data=data(batch_size=8, split="train", repeat=True),
        num_steps=2,
        optimizer=optim.OptimizerConfig(learning_rate=1e-3),
        checkpoint=checkpoints.CheckpointConfig(async_save=False),
        log_every=1,
        eval_data=eval_data,
        eval_every=2,
        eval_batches=2,
        tensorboard=False,
    )
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 2
    logged = evals[0]
    assert set(rm.METRICS) <= set(logged)
    # 8 + 3 rows (the second batch is padded); rows 3 and 10 share their positive
    assert (logged["retrieval_queries"], logged["retrieval_documents"]) == (11, 10)
    assert all(0 <= logged[m] <= 1 for m in rm.METRICS) and logged["recall@100"] == 1.0
    again = infer.evaluate(model=model, eval_data=eval_data, model_dir=str(tmp_path))
    assert {m: again[m] for m in rm.METRICS} == pytest.approx(
        {m: logged[m] for m in rm.METRICS}, abs=1e-6
    )
