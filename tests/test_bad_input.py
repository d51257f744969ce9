"""Bad input never costs work: non-UTF-8 files, token ids the model has no row for, an eval that
would never end, training data that runs out, unsafe safetensors indexes, outputs that would
destroy an input or a user's directory. Each exits 2 with one line naming the culprit (and, where
a run is involved, its checkpoints are kept); bare output file names work.
"""

import json
import os

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.cli import main
from encdec_adapt.nn.config import CONFIGS_DIR, load_encdec_preset
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import outputs, params_io

TINY = f"--gin_file={CONFIGS_DIR}/models/gemma_tiny.gin"
TINY_ENCDEC = f"--gin_file={CONFIGS_DIR}/models/t5gemma_tiny.gin"
RUN = lambda name: f"--gin_file={CONFIGS_DIR}/runs/{name}.gin"
SMALL = [
    "--gin.gemma_tiny/GemmaConfig.vocab_size=64",
    "--gin.gemma_tiny/GemmaConfig.num_layers=1",
    "--gin.gemma_tiny/GemmaConfig.embed_dim=32",
    "--gin.gemma_tiny/GemmaConfig.hidden_dim=64",
]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _fails(capsys, command, *argv, culprit=()):
    """Runs `encdec-adapt COMMAND ARGV` in process; asserts exit 2, one line, each culprit text
    in it; returns the line."""
    gin.clear_config()  # unlocks what a previous command locked
    code = main.main([command, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith(f"encdec-adapt {command}: "), err
    for text in culprit if isinstance(culprit, tuple) else (culprit,):
        assert text in lines[0], err
    return lines[0]


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"inputs": "fine"}\n\n{"inputs": "caf\xe9"}\n')
    _fails(
        capsys,
        "infer",
        TINY_ENCDEC,
        RUN("infer_jsonl"),
        "--gin.MODEL_DIR=None",
        f"--gin.INPUT_FILE={src}",
        f"--gin.OUTPUT={tmp_path}/out.jsonl",
        f"--gin.infer.params_from={tmp_path}",
        culprit=(f"{src}:3", "not UTF-8", "0xe9"),
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_non_utf8_text_for_embed_names_the_file_and_line(tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_bytes(b"one\ntwo\n\xff\xfe three\n")
    _fails(
        capsys,
        "embed",
        TINY,
        RUN("embed"),
        f"--gin.PARAMS_FROM={tmp_path}",
        f"--gin.INPUT_FILE={src}",
        f"--gin.OUTPUT_DIR={tmp_path}/emb",
        culprit=(f"{src}:3", "not UTF-8"),
    )


def test_ids_beyond_the_model_vocabulary_are_refused_before_compute(tmp_path, capsys):
    model_dir = tmp_path / "run"
    _fails(
        capsys,
        "train",
        TINY,
        RUN("synthetic"),
        *SMALL,
        "--gin.SyntheticConfig.vocab_size=100",
        f"--gin.MODEL_DIR={model_dir}",
        "--gin.TRAIN_STEPS=2",
        culprit=("train.train_data", "has 100 ids", "vocab_size) is 64"),
    )
    assert not model_dir.exists()
    # The embedded 4,096-piece tokenizer feeding a 64-row model.
    src = tmp_path / "in.jsonl"
    src.write_text('{"inputs": "hello"}\n')
    _fails(
        capsys,
        "infer",
        TINY_ENCDEC,
        RUN("infer_jsonl"),
        *SMALL,
        "--gin.MODEL_DIR=None",
        f"--gin.INPUT_FILE={src}",
        f"--gin.OUTPUT={tmp_path}/out.jsonl",
        f"--gin.infer.params_from={tmp_path}",
        culprit=("infer.infer_data", "has 4096 ids", "is 64"),
    )


def test_an_eval_that_would_never_end_is_a_config_error(tmp_path, capsys):
    model_dir = tmp_path / "run"
    _fails(
        capsys,
        "train",
        TINY,
        RUN("synthetic"),
        *SMALL,
        "--gin.SyntheticConfig.vocab_size=64",
        "--gin.train.eval_data=@eval/SyntheticConfig()",
        "--gin.eval/SyntheticConfig.vocab_size=64",
        "--gin.train.eval_every=1",
        "--gin.train.eval_batches=None",
        f"--gin.MODEL_DIR={model_dir}",
        "--gin.TRAIN_STEPS=2",
        culprit=("periodic evaluation would never end", "SyntheticConfig"),
    )
    assert not model_dir.exists()
    task_gin = tmp_path / "task.gin"
    task_gin.write_text("import tiny_seqio_task\n")
    _fails(
        capsys,
        "eval",
        TINY,
        RUN("eval"),
        f"--gin_file={task_gin}",
        *SMALL,
        f"--gin.MODEL_DIR={model_dir}",
        "--gin.EVAL_TASK=tiny_synthetic_lm",
        "--gin.eval/DataConfig.repeat=True",
        culprit=("evaluation would never end", "tiny_synthetic_lm"),
    )


def test_training_data_that_runs_out_saves_and_says_so(tmp_path, capsys):
    from encdec_adapt.runtime import checkpoints

    task_gin = tmp_path / "task.gin"
    task_gin.write_text("import tiny_seqio_task\n")
    model_dir = tmp_path / "run"
    line = _fails(
        capsys,
        "train",
        TINY,
        RUN("pretrain"),
        f"--gin_file={task_gin}",
        *SMALL,
        "--gin.TRAIN_TASK=tiny_synthetic_lm",
        "--gin.TARGET_LENGTH=16",
        "--gin.BATCH_SIZE=8",
        "--gin.train/DataConfig.repeat=False",
        f"--gin.MODEL_DIR={model_dir}",
        "--gin.TRAIN_STEPS=1000",
        culprit=("tiny_synthetic_lm", "ran out of batches at step", "repeat=True"),
    )
    step = int(line.split("at step ")[1].split(":")[0])
    assert 0 < step < 1000
    ckpt = checkpoints.Checkpointer(str(model_dir), checkpoints.CheckpointConfig(), read_only=True)
    assert ckpt.all_steps()[-1] == step
    ckpt.close()


def _hf_dir(tmp_path, index) -> str:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(d)


@pytest.mark.parametrize(
    "index, culprit",
    [
        ({"weight_map": {"a": "../outside.safetensors"}}, "'../outside.safetensors'"),
        ({"weight_map": {"a": "/etc/passwd"}}, "'/etc/passwd'"),
        ({"weight_map": 5}, "malformed"),
        ([1, 2], "malformed"),
    ],
    ids=["parent", "absolute", "not-a-map", "not-an-object"],
)
def test_safetensors_index_is_checked(tmp_path, capsys, index, culprit):
    hf = _hf_dir(tmp_path, index)
    _fails(
        capsys,
        "import-hf",
        "--input",
        hf,
        "--output",
        str(tmp_path / "out"),
        culprit=("model.safetensors.index.json", culprit),
    )
    assert not (tmp_path / "out").exists()


def test_overwrite_never_removes_a_users_directory(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    _fails(
        capsys,
        "import-hf",
        "--input",
        str(tmp_path / "missing"),
        "--output",
        str(user),
        "--overwrite",
        culprit=(str(user), "is not a params checkpoint"),
    )
    assert (user / "notes.txt").read_text() == "keep me"


def test_an_output_that_is_an_input_is_refused(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    _fails(
        capsys,
        "import-hf",
        "--input",
        str(d),
        "--output",
        str(d),
        "--overwrite",
        culprit="same as, or overlaps, the input",
    )
    src = tmp_path / "in.jsonl"
    src.write_text('{"inputs": "hello"}\n')
    _fails(
        capsys,
        "infer",
        TINY_ENCDEC,
        RUN("infer_jsonl"),
        "--gin.MODEL_DIR=None",
        f"--gin.INPUT_FILE={src}",
        f"--gin.OUTPUT={src}",
        f"--gin.infer.params_from={tmp_path}",
        culprit=("output", str(src), "overlaps"),
    )
    assert src.read_text() == '{"inputs": "hello"}\n'


def test_a_bare_output_file_name_is_written_in_the_working_directory(tmp_path, capsys, monkeypatch):
    cfg = load_encdec_preset("t5gemma_tiny")
    ckpt = str(tmp_path / "ckpt")
    net = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    params_io.save(ckpt, params_io.model_params(net), "encoder_decoder", cfg.to_dict())
    (tmp_path / "in.jsonl").write_text('{"inputs": "hello"}\n{"inputs": "world"}\n')
    monkeypatch.chdir(tmp_path)
    code = main.main(
        [
            "infer",
            TINY_ENCDEC,
            RUN("infer_jsonl"),
            "--gin.MODEL_DIR=None",
            "--gin.INPUT_FILE=in.jsonl",
            "--gin.OUTPUT=preds.jsonl",
            f"--gin.infer.params_from={ckpt}",
            "--gin.INPUT_LENGTH=8",
            "--gin.MAX_DECODE_LENGTH=3",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [r["inputs"] for r in rows] == ["hello", "world"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "in.jsonl", "preds.jsonl"]  # no temporaries


def test_replacing_a_directory_keeps_the_old_one_until_the_new_one_is_complete(tmp_path):
    """A params checkpoint replaced with overwrite: a failure while writing leaves the old one
    whole (and no temporary); a success swaps in the new one."""
    path = str(tmp_path / "ckpt")
    old = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    params_io.save(path, old, "decoder_only", {"x": 1})

    class Boom(Exception):
        pass

    with (
        pytest.raises(Boom),
        outputs.new_directory(path, overwrite=True, kind=params_io.PARAMS_CHECKPOINT) as tmp,
    ):
        (tmp_path / "marker").write_text(tmp)
        raise Boom
    assert not os.path.exists((tmp_path / "marker").read_text())
    np.testing.assert_array_equal(jax.device_get(params_io.load(path)["w"]), old["w"])
    new = {"w": old["w"] + 1}
    params_io.save(path, new, "decoder_only", {"x": 2}, overwrite=True)
    np.testing.assert_array_equal(jax.device_get(params_io.load(path)["w"]), new["w"])
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "marker"]
