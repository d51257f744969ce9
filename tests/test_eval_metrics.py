"""seqio metric functions in evaluation: the metric functions themselves, and the evaluator
calling a task's predict / score metric functions with the decoded targets, the greedy
predictions and the scores of the same rows that `infer` would produce."""

import numpy as np
import pytest
from flax import nnx

from encdec_adapt.data import input_pipeline, metrics
from encdec_adapt.evaluation import evaluator as evaluation
from encdec_adapt.models import generative as models
from encdec_adapt.models.decoding import DecodeConfig
from encdec_adapt.nn.config import EncoderDecoderConfig, load_preset
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import optim
from encdec_adapt.runtime.trainer import Trainer
from encdec_adapt.storage import params_io
from encdec_adapt.tasks import metric_tasks

# One layer a side (a local one) instead of t5gemma_tiny's four: these tests check the evaluator
# wiring, not attention; fewer layers compile faster.
TINY = load_preset("gemma_tiny").replace(num_layers=1)
PAIR = EncoderDecoderConfig(encoder=TINY, decoder=TINY)


def test_metric_functions():
    assert metrics.sequence_accuracy(["a b", "c"], ["a b", "d"])["sequence_accuracy"] == 50.0
    f1 = metrics.token_f1(["the cat sat", "x"], ["the cat", "y"])["token_f1"]
    np.testing.assert_allclose(f1, 100 * (0.8 + 0.0) / 2)
    ll = metrics.mean_log_likelihood(["a", "b"], [-1.0, -3.0])
    assert list(ll.values()) == [-2.0]
    with pytest.raises(ValueError):
        metrics.sequence_accuracy(["a"], ["a", "b"])


def test_task_metrics_get_decoded_targets_predictions_and_scores():
    seen = {}

    def record_predictions(targets, predictions):
        seen["predict"] = (list(targets), list(predictions))
        return {"n_predicted": len(predictions)}

    def record_scores(targets, scores):
        seen["score"] = (list(targets), list(scores))
        return {"n_scored": len(scores)}

    metric_tasks.register_with_metrics(
        "test_recording_eval", "stdlib_prefix_lm", [record_predictions, record_scores]
    )
    model = models.EncoderDecoderModel(config=PAIR)
    rules = sharding.MeshRules()
    trainer = Trainer(model, optim.OptimizerConfig(), rules.make_mesh(), rules)
    params = trainer.init_state().params
    # Fresh parameters echo the decoder input (tied embeddings dominate the residual: greedy
    # decodes are all pad, i.e. empty); large noise on the layers gives varied decodes.
    rng = np.random.default_rng(3)
    flat = params_io.flatten(params)
    params = params_io.unflatten(
        {
            k: v if "embedding" in k else v + 2.0 * rng.normal(size=v.shape).astype(v.dtype)
            for k, v in flat.items()
        }
    )
    data = input_pipeline.DataConfig(
        task="test_recording_eval",
        batch_size=3,
        task_feature_lengths={"inputs": 32, "targets": 16},
        split="validation",
        feature_converter="encdec",
        shuffle=False,
        repeat=False,
    )
    decode = DecodeConfig(method="greedy", max_decode_len=16)
    out = evaluation.run_eval(trainer, params, data, 2, decode)
    assert out["n_predicted"] == out["n_scored"] == 6
    assert {"loss", "accuracy"} <= set(out)

    # The same rows, decoded and scored independently of the evaluator (no run_batches,
    # predict_fn or score_fn): the raw pipeline batches, a greedy loop of full teacher-forced
    # forwards (no KV cache) and the log-softmax of one forward, computed in numpy.
    vocab = input_pipeline.vocabularies("stdlib_prefix_lm")["targets"]
    eos = vocab.eos_id
    module = trainer.module(params)
    forward = nnx.jit(lambda m, e, d: m(e, d))

    def until_eos(ids):
        ids = [int(t) for t in ids if t != 0]
        return ids[: ids.index(eos)] if eos in ids else ids

    targets, predictions, scores = [], [], []
    for i, batch in enumerate(input_pipeline.make_iterator(data)):
        if i == 2:
            break
        enc = np.asarray(batch["encoder_input_tokens"])
        tgt = np.asarray(batch["decoder_target_tokens"])
        w = np.asarray(batch["decoder_loss_weights"])
        logits = np.asarray(forward(module, enc, np.asarray(batch["decoder_input_tokens"])))
        logits = logits.astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        # One shape for every step (one compile): the decoder is causal, so the zeros after
        # step t do not change position t's logits. Start id 0.
        dec = np.zeros((len(enc), decode.max_decode_len + 1), np.int32)
        for t in range(decode.max_decode_len):
            dec[:, t + 1] = np.argmax(np.asarray(forward(module, enc, dec))[:, t], -1)
        for row in range(len(enc)):
            targets.append(vocab.decode(until_eos(tgt[row][w[row] > 0])))
            predictions.append(vocab.decode(until_eos(dec[row, 1:])))
            scores.append(float(np.sum(logp[row, np.arange(tgt.shape[1]), tgt[row]] * w[row])))
    assert len(targets) == 6
    assert seen["predict"] == (targets, predictions)
    assert seen["score"][0] == targets
    np.testing.assert_allclose(seen["score"][1], scores, rtol=1e-5)
    assert all(t for t in targets)  # real text, not empty decodes
    assert all(p for p in predictions)  # varied decodes, not all-pad


@pytest.mark.slow
def test_periodic_eval_in_train_logs_task_metrics(tmp_path):
    import json

    from encdec_adapt.runtime import train as train_lib

    metric_tasks.register_with_metrics(
        "test_counting_eval",
        "stdlib_prefix_lm",
        [
            lambda targets, predictions: {"n_predicted": len(predictions)},
            lambda targets, scores: {"n_scored": len(scores)},
        ],
    )

    def data(task, split, repeat):
        return input_pipeline.DataConfig(
            task=task,
            batch_size=2,
            task_feature_lengths={"inputs": 32, "targets": 16},
            split=split,
            feature_converter="encdec",
            shuffle=False,
            repeat=repeat,
        )

    train_lib.train(
        model_dir=str(tmp_path),
        model=models.EncoderDecoderModel(config=PAIR),
        train_data=data("stdlib_prefix_lm", "train", True),
        num_steps=2,
        log_every=1,
        eval_data=data("test_counting_eval", "validation", False),
        eval_every=2,
        eval_batches=1,
        eval_decode=DecodeConfig(method="greedy", max_decode_len=8),
        tensorboard=False,
    )
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["n_predicted"] == evals[0]["n_scored"] == 2
    assert np.isfinite(evals[0]["loss"])
