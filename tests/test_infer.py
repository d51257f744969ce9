"""`infer` in predict mode: decoded predictions of a seqio task, written as JSON lines."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt import decoding, input_pipeline, params_io, sharding
from encdec_adapt.config import EncoderDecoderConfig, load_preset
from encdec_adapt.encdec import EncoderDecoder
from encdec_adapt.models import EncoderDecoderModel
from encdec_adapt.infer import infer

TINY = load_preset("gemma_tiny").replace(num_layers=2)
LENGTHS = {"inputs": 64, "targets": 16}


pytestmark = pytest.mark.usefixtures("embedded_corpus")


def data_cfg():
    return input_pipeline.DataConfig(
        task="stdlib_span_corruption",
        split="validation",
        batch_size=8,
        task_feature_lengths=LENGTHS,
        feature_converter="encdec",
        shuffle=False,
        repeat=False,
    )


def test_predict_mode_writes_decoded_predictions(tmp_path):
    cfg = EncoderDecoderConfig(encoder=TINY, decoder=TINY)
    net = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    ckpt = str(tmp_path / "ckpt")
    params_io.save(ckpt, params_io.model_params(net), "encoder_decoder", cfg.to_dict())
    out = str(tmp_path / "pred.jsonl")
    decode_cfg = decoding.DecodeConfig(max_decode_len=6)
    n = infer(
        model=EncoderDecoderModel(config=cfg),
        infer_data=data_cfg(),
        output_file=out,
        params_from=ckpt,
        mesh_rules=sharding.MeshRules(mesh_shape=(2, 4, 1)),  # rows over 8 devices
        num_batches=2,
        mode="predict",
        decode=decode_cfg,
    )
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert n == len(records) == 16
    vocab = input_pipeline.vocabularies("stdlib_span_corruption")["targets"]

    # The same predictions straight from the decoding loop on the first batch.
    batch = next(iter(input_pipeline.make_iterator(data_cfg())))
    step_fn, logits, state = decoding.encoder_decoder_start(
        net, jnp.asarray(batch["encoder_input_tokens"]), 6
    )
    direct = np.asarray(decoding.decode(step_fn, logits, state, decode_cfg).tokens)
    for record, row in zip(records[:8], direct):
        ids = [int(t) for t in row if t != 0]
        ids = ids[: ids.index(1)] if 1 in ids else ids
        assert record["prediction_ids"] == ids
        assert record["prediction"] == vocab.decode(ids)
        assert record["inputs"] and isinstance(record["score"], float)


def test_unknown_mode_and_decoding_option(tmp_path):
    with pytest.raises(ValueError, match=r"infer.mode='generate'"):
        infer(
            model=EncoderDecoderModel(config=EncoderDecoderConfig(encoder=TINY, decoder=TINY)),
            infer_data=data_cfg(),
            output_file=str(tmp_path / "x.jsonl"),
            params_from=str(tmp_path),
            mode="generate",
        )
    with pytest.raises(ValueError, match=r"method='nucleus'"):
        decoding.DecodeConfig(method="nucleus")


def test_training_inputs_count_what_they_cut():
    """The trainer's input pipeline uses the counted converters: over-long examples are cut
    (or dropped) and counted, never trimmed silently."""
    import seqio
    import tiny_seqio_task

    from encdec_adapt.data.counters import COUNTERS

    # tiny_seqio_task trims in its own preprocessor (seqio's append_eos_after_trim); this
    # variant leaves the lengths to the converter.
    task = "tiny_synthetic_lm_untrimmed"
    if task not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            task,
            source=seqio.get_mixture_or_task(tiny_seqio_task.TASK).source,
            output_features=seqio.get_mixture_or_task(tiny_seqio_task.TASK).output_features,
            preprocessors=[seqio.preprocessors.append_eos],
        )

    def run(policy):
        COUNTERS.reset()
        cfg = input_pipeline.DataConfig(
            task=task,  # documents of 5 to 30 tokens
            split="validation",
            batch_size=4,
            task_feature_lengths={"targets": 12},
            feature_converter="decoder",
            length_policy=policy,
            shuffle=False,
            repeat=False,
        )
        rows = sum(len(b["decoder_target_tokens"]) for b in input_pipeline.make_iterator(cfg))
        return rows, COUNTERS.result()

    rows, counts = run("truncate")
    assert rows == 64 and counts["truncated/targets"] > 0
    kept, counts = run("drop")
    assert counts["dropped/targets"] > 0 and kept == 64 - counts["dropped/targets"]
    with pytest.raises(ValueError, match=r"length_policy='cut'"):
        input_pipeline.DataConfig(task="x", length_policy="cut")
