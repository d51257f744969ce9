"""`infer`: predictions and scores of a seqio task or a JSONL file of raw texts, written as JSON
lines, for encoder-decoders and decoder-only models; bad inputs and options fail clearly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.cli import main
from encdec_adapt.data import input_pipeline
from encdec_adapt.data.jsonl_inputs import JsonlInputs
from encdec_adapt.models import decoding
from encdec_adapt.models.generative import DecoderOnlyModel, EncoderDecoderModel
from encdec_adapt.nn.config import EncoderDecoderConfig, load_preset
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime.infer import infer
from encdec_adapt.storage import params_io

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


# The reference decodes are compiled as one program each: an eager prefill compiles every op at
# its shape, seconds per call on CPU.
@nnx.jit(static_argnames="cfg")
def direct_encdec_decode(net, encoder_tokens, cfg):
    """`decoding.decode` of an EncoderDecoder: [B, S] encoder tokens -> [B, cfg.max_decode_len]."""
    step_fn, logits, state = decoding.encoder_decoder_start(net, encoder_tokens, cfg.max_decode_len)
    return decoding.decode(step_fn, logits, state, cfg).tokens


@nnx.jit(static_argnames="cfg")
def direct_decode(net, prompts, lengths, cfg):
    """`decoding.decode` of a DecoderOnly from right-padded [B, P] prompts of `lengths` [B]."""
    step_fn, logits, state = decoding.decoder_only_start(net, prompts, lengths, cfg.max_decode_len)
    return decoding.decode(step_fn, logits, state, cfg).tokens


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
    direct = np.asarray(
        direct_encdec_decode(net, jnp.asarray(batch["encoder_input_tokens"]), decode_cfg)
    )
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


# ---- JSONL inputs ------------------------------------------------------------------------------

JSONL_LENGTHS = {"inputs": 12, "targets": 6}
TEXTS = [
    "Return the absolute value of the argument.",
    "",  # empty: decoded from just EOS, flagged
    "Open file and return a stream. Raise OSError upon failure. " * 3,  # over-long: truncated
    "Sort the list in place.",
    "Create a new dictionary.",
    "Return True if all elements of the iterable are true.",
    "Convert a number or string to an integer.",
    "Print the values to a stream.",
    "Return the length of an object.",
    "Return a reverse iterator.",
]
TARGETS = ["abs", "", "open", "sort", "dict", "all", "int", "print", "len", "reversed"]


@pytest.fixture(scope="module")
def encdec_ckpt(tmp_path_factory):
    cfg = EncoderDecoderConfig(encoder=TINY, decoder=TINY)
    net = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    path = str(tmp_path_factory.mktemp("encdec") / "ckpt")
    params_io.save(path, params_io.model_params(net), "encoder_decoder", cfg.to_dict())
    return cfg, net, path


@pytest.fixture(scope="module")
def decoder_ckpt(tmp_path_factory):
    net = DecoderOnly(TINY, rngs=nnx.Rngs(1))
    path = str(tmp_path_factory.mktemp("decoder") / "ckpt")
    params_io.save(path, params_io.model_params(net), "decoder_only", TINY.to_dict())
    return net, path


def write_jsonl(path, targets=False) -> list[int]:
    """TEXTS (and TARGETS) as JSON lines with a blank line after the first; returns the line
    number of each example."""
    lines, numbers = [], []
    for i, text in enumerate(TEXTS):
        lines.append(json.dumps({"inputs": text} | ({"targets": TARGETS[i]} if targets else {})))
        numbers.append(len(lines))
        if i == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return numbers


def expected_ids(text: str, length: int) -> list[int]:
    """The tokens a text is fed as: its ids then EOS (1), cut to the first `length` tokens (an
    over-long text loses its EOS, as in training)."""
    vocab = input_pipeline.vocabularies("stdlib_span_corruption")["inputs"]
    return [*list(vocab.encode(text)), 1][:length]


def padded(rows: list[list[int]], length: int) -> jnp.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return jnp.asarray(out)


def until_eos(row) -> list[int]:
    ids = [int(t) for t in row if t != 0]
    return ids[: ids.index(1)] if 1 in ids else ids


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_predict_encoder_decoder(tmp_path, encdec_ckpt, capsys):
    cfg, net, ckpt = encdec_ckpt
    numbers = write_jsonl(tmp_path / "in.jsonl")
    out = tmp_path / "pred.jsonl"
    decode_cfg = decoding.DecodeConfig(max_decode_len=5)
    n = infer(
        model=EncoderDecoderModel(config=cfg),
        infer_data=JsonlInputs(
            path=str(tmp_path / "in.jsonl"), batch_size=8, task_feature_lengths=JSONL_LENGTHS
        ),
        output_file=str(out),
        params_from=ckpt,
        mode="predict",
        decode=decode_cfg,
    )
    records = read(out)
    # 10 examples in 2 batches of 8: the 6 rows padding the last batch are not written
    assert n == len(records) == 10
    assert [r["line"] for r in records] == numbers == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert [r["inputs"] for r in records] == TEXTS
    assert [r["truncated"] for r in records] == [[], [], ["inputs"]] + [[]] * 7
    assert [r["empty_input"] for r in records] == [False, True] + [False] * 8
    err = capsys.readouterr().out
    assert "1 inputs truncated to 12 tokens" in err and "1 empty inputs" in err

    encoder_rows = [expected_ids(t, JSONL_LENGTHS["inputs"]) for t in TEXTS]
    assert encoder_rows[1] == [1]  # the empty input is just EOS
    direct = np.asarray(direct_encdec_decode(net, padded(encoder_rows, 12), decode_cfg))
    vocab = input_pipeline.vocabularies("stdlib_span_corruption")["targets"]
    for record, row in zip(records, direct):
        assert record["prediction_ids"] == until_eos(row)
        assert record["prediction"] == vocab.decode(until_eos(row))


def test_jsonl_score_encoder_decoder(tmp_path, encdec_ckpt):
    cfg, net, ckpt = encdec_ckpt
    write_jsonl(tmp_path / "in.jsonl", targets=True)
    data = JsonlInputs(
        path=str(tmp_path / "in.jsonl"),
        target_key="targets",
        batch_size=8,
        task_feature_lengths=JSONL_LENGTHS,
    )
    out = tmp_path / "scores.jsonl"
    model = EncoderDecoderModel(config=cfg)
    assert infer(model=model, infer_data=data, output_file=str(out), params_from=ckpt) == 10
    records = read(out)
    assert [r["targets"] for r in records] == TARGETS

    targets = [expected_ids(t, JSONL_LENGTHS["targets"]) for t in TARGETS]
    dec_targets = padded(targets, 6)
    batch = {
        "encoder_input_tokens": padded([expected_ids(t, 12) for t in TEXTS], 12),
        "decoder_target_tokens": dec_targets,
        "decoder_input_tokens": jnp.pad(dec_targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_loss_weights": (dec_targets > 0).astype(jnp.int32),
    }
    direct = np.asarray(model.score_batch(net, batch))
    np.testing.assert_allclose([r["log_likelihood"] for r in records], direct, rtol=1e-5)
    assert [r["tokens"] for r in records] == [len(t) for t in targets]

    with pytest.raises(ValueError, match=r"target_key=None, but infer.mode='score'"):
        infer(
            model=model,
            infer_data=JsonlInputs(path=str(tmp_path / "in.jsonl"), batch_size=8),
            output_file=str(out),
            params_from=ckpt,
        )


@pytest.mark.slow
def test_decoder_only_predict_equals_decode(tmp_path, decoder_ckpt):
    """Decoder-only generation through `infer` (JSONL prompts and a prefix-LM seqio task) gives
    what `decoding.decode` gives on the same prompts."""
    net, ckpt = decoder_ckpt
    model = DecoderOnlyModel(config=TINY)
    decode_cfg = decoding.DecodeConfig(max_decode_len=5)
    write_jsonl(tmp_path / "prompts.jsonl")
    out = tmp_path / "jsonl.jsonl"
    data = JsonlInputs(
        path=str(tmp_path / "prompts.jsonl"),
        batch_size=8,
        task_feature_lengths=JSONL_LENGTHS,
        feature_converter="decoder",
    )
    infer(
        model=model,
        infer_data=data,
        output_file=str(out),
        params_from=ckpt,
        mode="predict",
        decode=decode_cfg,
    )
    prompts = [expected_ids(t, JSONL_LENGTHS["inputs"]) for t in TEXTS]
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    direct = np.asarray(direct_decode(net, padded(prompts, 18), lengths, decode_cfg))
    records = read(out)
    assert [r["inputs"] for r in records] == TEXTS
    for record, row in zip(records, direct):
        assert record["prediction_ids"] == until_eos(row)

    # A prefix-LM task: the prompt is each example's inputs (the positions before the targets).
    task_data = input_pipeline.DataConfig(
        task="stdlib_prefix_lm",
        split="validation",
        batch_size=8,
        task_feature_lengths={"inputs": 24, "targets": 8},
        feature_converter="prefix_lm",
        shuffle=False,
        repeat=False,
    )
    out = tmp_path / "task.jsonl"
    infer(
        model=model,
        infer_data=task_data,
        output_file=str(out),
        params_from=ckpt,
        mode="predict",
        decode=decode_cfg,
        num_batches=1,
    )
    batch = next(iter(input_pipeline.make_iterator(task_data)))
    first_target = np.argmax(batch["decoder_loss_weights"] > 0, axis=1)
    assert np.all(first_target > 0)
    tokens = jnp.asarray(batch["decoder_target_tokens"])
    direct = np.asarray(
        direct_decode(net, tokens, jnp.asarray(first_target, jnp.int32), decode_cfg)
    )
    vocab = input_pipeline.vocabularies("stdlib_prefix_lm")["inputs"]
    records = read(out)
    assert len(records) == 8
    for record, row, prompt, n in zip(
        records, direct, batch["decoder_target_tokens"], first_target
    ):
        assert record["prediction_ids"] == until_eos(row)
        prompt_ids = [int(t) for t in prompt[:n] if t not in (0, 1)]
        assert record["inputs"] == vocab.decode(prompt_ids)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"inputs": "a"}\n{"inputs": "b"\n', r"in\.jsonl:2: not valid JSON"),
        ('{"inputs": "a"}\n\n{"text": "b"}\n', r"in\.jsonl:3: no key 'inputs' \(keys: \['text'\]"),
        ("[1, 2]\n", r"in\.jsonl:1: expected a JSON object, got list"),
        ('{"inputs": 3}\n', r"in\.jsonl:1: 'inputs' must be a string, got int"),
        ("\n\n", r"in\.jsonl: the file has no examples"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"Invalid JSONL input .*" + message):
        input_pipeline.make_iterator(JsonlInputs(path=str(path)))


def test_bad_jsonl_config():
    with pytest.raises(ValueError, match=r"Invalid JsonlInputs: path='/no/such.jsonl': no such"):
        JsonlInputs(path="/no/such.jsonl")
    with pytest.raises(ValueError, match=r"feature_converter='t5'"):
        JsonlInputs(path=__file__, feature_converter="t5")


# ---- the command line: bad decoding options and bad files fail before any compute -------------

from encdec_adapt.nn.config import CONFIGS_DIR as REPO  # noqa: E402

ENCDEC_GIN = f"--gin_file={REPO}/models/t5gemma_tiny.gin"
JSONL_GIN = f"--gin_file={REPO}/runs/infer_jsonl.gin"


@pytest.fixture
def clean_gin():
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


def cli(capsys, tmp_path, *extra):
    argv = [
        ENCDEC_GIN,
        JSONL_GIN,
        "--gin.MODEL_DIR=None",
        f"--gin.infer.params_from={tmp_path}/ckpt",
        f"--gin.INPUT_FILE={tmp_path}/in.jsonl",
        f"--gin.OUTPUT={tmp_path}/out.jsonl",
        *extra,
    ]
    code = main.main(["infer", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "binding, message",
    [
        (
            "DecodeConfig.method=nucleus",
            "method='nucleus' (choose from ('greedy', 'sample', 'beam'))",
        ),
        ("DecodeConfig.top_p=1.5", "top_p=1.5 (must be in (0, 1])"),
        ("DecodeConfig.beam_size=0", "beam_size=0 (must be >= 1)"),
        ("DecodeConfig.top_k=x", "top_k='x' (must be an int)"),
    ],
)
def test_cli_bad_decoding_option(tmp_path, capsys, clean_gin, binding, message):
    write_jsonl(tmp_path / "in.jsonl")
    code, err = cli(capsys, tmp_path, f"--gin.{binding}")
    assert code == 2
    assert f"encdec-adapt infer: Invalid DecodeConfig: {message}" in err
    assert "set at --gin:" in err and binding.split("=")[0] in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_unknown_decoding_option_and_bad_file(tmp_path, capsys, clean_gin):
    write_jsonl(tmp_path / "in.jsonl")
    code, err = cli(capsys, tmp_path, "--gin.DecodeConfig.nucleus_p=0.9")
    assert code == 2 and "nucleus_p" in err
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{REPO}/runs/infer_jsonl.gin'\n\nDecodeConfig.beam_size = -1\n")
    import gin

    gin.clear_config()
    argv = [ENCDEC_GIN, f"--gin_file={bad}", "--gin.MODEL_DIR=None"]
    argv += [f"--gin.INPUT_FILE={tmp_path}/in.jsonl", f"--gin.OUTPUT={tmp_path}/out.jsonl"]
    code = main.main(["infer", *argv])
    err = capsys.readouterr().err
    assert code == 2 and f"set at {bad}:3: DecodeConfig.beam_size = -1" in err

    gin.clear_config()
    (tmp_path / "in.jsonl").write_text('{"inputs": "a"}\n{"inputs": "b",}\n')
    code, err = cli(capsys, tmp_path)
    assert code == 2
    assert f"Invalid JSONL input {tmp_path}/in.jsonl:2: not valid JSON" in err
    assert not (tmp_path / "out.jsonl").exists()
