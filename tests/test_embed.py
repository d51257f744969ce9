"""Retrieval evaluation (RetrievalSplit, the seqio metric, BM25) and `encdec-adapt embed`
end to end on the tiny model, bad inputs included."""

import json
import math
import os

import gin
import numpy as np
import pytest
import retrieval_reference
import seqio
import tensorflow as tf
from flax import nnx

from encdec_adapt import tasks
from encdec_adapt.cli import main
from encdec_adapt.evaluation import retrieval_metrics as rm
from encdec_adapt.evaluation.bm25 import BM25, evaluate_bm25
from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.dual_encoder import DualEncoder, DualEncoderConfig
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import params_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_GIN = "models/gemma_tiny.gin"
EMBED_GIN = "runs/embed.gin"
TASK = "tiny_code_search_for_embed"
PAIRS = [
    ("Read a file and return its text.", "def read_file(path):\n    return open(path).read()"),
    ("Add two numbers.", "def add(a, b):\n    return a + b"),
    ("Add two numbers.", "def plus(x, y):\n    return x + y"),
    ("Sort a list in place.", "def sort_items(items):\n    items.sort()"),
    ("Sum of two values.", "def add(a, b):\n    return a + b"),  # a shared positive
    ("", "def empty_query():\n    pass"),  # dropped: empty query
]


# ------------------------------------------------------------------------------ metrics


def test_split_from_pairs_dedups_documents():
    split = rm.RetrievalSplit.from_pairs("s", PAIRS[:5], query_prompt="q: ")
    assert len(split.queries) == 5 and len(split.documents) == 4
    assert split.positives == (0, 1, 2, 3, 1)
    assert split.qrels()["q4"] == {"d1": 1.0}
    with pytest.raises(ValueError, match="positive index 7 outside the 1 documents"):
        rm.RetrievalSplit("bad", ("a",), ("x",), (7,))


def test_evaluate_embeddings_against_direct_computation():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(6, 8)), rng.normal(size=(4, 8))
    positives = (0, 1, 2, 3, 1, 0)
    split = rm.RetrievalSplit("s", tuple("abcdef"), tuple("wxyz"), positives)
    got = split.evaluate_embeddings(3.0 * q, d)  # cosine: the scale of a query does not matter
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        d / np.linalg.norm(d, axis=1, keepdims=True)
    ).T
    ranks = [int(np.sum(cos[i] > cos[i, p])) for i, p in enumerate(positives)]  # 0 = first
    want = {
        "ndcg@10": np.mean([1 / math.log2(r + 2) for r in ranks]),
        "recall@1": np.mean([r < 1 for r in ranks]),
        "recall@10": 1.0,
        "recall@100": 1.0,
        "mrr@10": np.mean([1 / (r + 1) for r in ranks]),
    }
    assert got == pytest.approx(want)
    # the seqio metric: targets = positives' embeddings, predictions = queries' embeddings
    assert rm.retrieval_metric_fn(d[list(positives)], q) == pytest.approx(want)
    with pytest.raises(ValueError, match=r"targets \(6, 8\) and predictions \(5, 8\)"):
        rm.retrieval_metric_fn(d[list(positives)], q[:5])
    with pytest.raises(ValueError, match="do not fit 4 documents"):
        split.evaluate_embeddings(q, d[:3])


def test_metric_fn_is_a_valid_seqio_metric():
    def dataset(split, shuffle_files=False, seed=None):
        return tf.data.Dataset.from_tensors({"query": "x", "positive": "y"})

    task = seqio.Task(
        "embed_metric_signature",
        source=seqio.FunctionDataSource(dataset, splits=["test"]),
        output_features={},
        metric_fns=[rm.retrieval_metric_fn],
    )
    assert task.predict_metric_fns == [rm.retrieval_metric_fn]


def test_bm25_split_evaluation_equals_direct_ranking():
    split = rm.RetrievalSplit.from_pairs("s", PAIRS[:5])
    index = BM25(split.documents)
    ranked = {q: index.rank(t, split.doc_ids) for q, t in zip(split.query_ids, split.queries)}
    assert evaluate_bm25(split) == pytest.approx(rm.evaluate(split.qrels(), ranked))
    assert evaluate_bm25(split)["recall@100"] == 1.0


# ------------------------------------------------------------------------------ embed CLI


def _pairs_dataset(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(
        {"query": [q for q, _ in PAIRS], "positive": [p for _, p in PAIRS]}
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random gemma_tiny decoder-only params checkpoint, trained-tower (dual_encoder) params
    of the same architecture, and a tiny contrastive task."""

    root = tmp_path_factory.mktemp("embed")
    cfg = load_preset("gemma_tiny")
    decoder = str(root / "decoder")
    params_io.save(
        decoder, params_io.model_params(DecoderOnly(cfg, rngs=nnx.Rngs(0))), "decoder_only",
        cfg.to_dict(),
    )  # fmt: skip
    towers_cfg = DualEncoderConfig(tower=cfg)
    towers = str(root / "towers")
    params_io.save(
        towers, params_io.model_params(DualEncoder(towers_cfg, rngs=nnx.Rngs(1))),
        "dual_encoder", towers_cfg.to_dict(),
    )  # fmt: skip
    tasks.register_contrastive_task(
        TASK,
        seqio.FunctionDataSource(_pairs_dataset, splits=["test"]),
        query_prompt="query: ",
        document_prompt="code: ",
        overwrite=True,
    )
    return root, decoder, towers


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    with gin.unlock_config():
        gin.clear_config()


def read(path):
    with open(path) as f:
        return f.read()


def read_json(path):
    return json.loads(read(path))


def read_jsonl(path):
    return [json.loads(line) for line in read(path).splitlines()]


def run_embed(*bindings):
    """`encdec-adapt embed` in this process; returns its exit code."""
    argv = ["embed", f"--gin_file={MODEL_GIN}", f"--gin_file={EMBED_GIN}"]
    argv += ["--gin.embed.progress=False", "--gin.embed.batch_size=8"]
    cwd = os.getcwd()
    os.chdir(REPO)
    # The command finalizes (locks) gin; unlock_config restores the unlocked state afterwards
    # so that the next run can clear it.
    try:
        with gin.unlock_config():
            gin.clear_config()
            return main.main(argv + [f"--gin.{b}" for b in bindings])
    finally:
        os.chdir(cwd)


def test_embed_file_end_to_end(checkpoints):
    root, decoder, towers = checkpoints
    texts = root / "texts.txt"
    long_text = "def very_long_function(argument):\n" * 20
    texts.write_text(
        f"read a file\n\nadd two numbers\nread a file\n{long_text.replace(chr(10), ' ')}\n"
    )
    out = str(root / "file_out")
    assert run_embed(f"PARAMS_FROM={towers}", f"INPUT_FILE={texts}", f"OUTPUT_DIR={out}") == 0
    emb = np.load(os.path.join(out, "embeddings.npy"))
    assert emb.shape == (5, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[3])  # identical texts, identical rows
    assert not np.allclose(emb[0], emb[2])
    rows = read_jsonl(os.path.join(out, "embeddings.jsonl"))
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["empty"] for r in rows] == [False, True, False, False, False]
    assert [r["truncated"] for r in rows] == [False, False, False, False, True]
    assert rows[4]["tokens"] == 32  # QUERY_LENGTH of embed.gin, EOS included
    stats = read_json(os.path.join(out, "stats.json"))
    assert (stats["texts"], stats["empty"], stats["truncated"]) == (5, 1, 1)

    # JSONL input, the document side, a Matryoshka prefix; the untrained warm start loads too
    records = root / "texts.jsonl"
    records.write_text('{"id": "a", "body": "read a file"}\n\n{"id": "b", "body": ""}\n')
    out2 = str(root / "jsonl_out")
    bindings = [f"PARAMS_FROM={decoder}", f"INPUT_FILE={records}", f"OUTPUT_DIR={out2}"]
    bindings += ["embed.text_key=body", "embed.id_key=id", "embed.side=document"]
    assert run_embed(*bindings, "embed.truncate_dim=16") == 0
    assert np.load(os.path.join(out2, "embeddings.npy")).shape == (2, 16)
    rows = read_jsonl(os.path.join(out2, "embeddings.jsonl"))
    assert [(r["id"], r["empty"]) for r in rows] == [("a", False), ("b", True)]

    # A text transform: raw code embeds as the same code split and lower-cased by hand
    (root / "code.txt").write_text("def readFile(file_name):\n")
    (root / "code_split.txt").write_text("def read file(file name):\n")
    out3, out4 = str(root / "code_out"), str(root / "code_split_out")
    transform = "embed.text_transform='split_identifiers_lower'"
    code = [f"PARAMS_FROM={towers}", f"INPUT_FILE={root / 'code.txt'}", f"OUTPUT_DIR={out3}"]
    assert run_embed(*code, transform) == 0
    split = [f"PARAMS_FROM={towers}", f"INPUT_FILE={root / 'code_split.txt'}"]
    assert run_embed(*split, f"OUTPUT_DIR={out4}") == 0
    got, want = (np.load(os.path.join(o, "embeddings.npy")) for o in (out3, out4))
    np.testing.assert_array_equal(got, want)
    assert (
        read_json(os.path.join(out3, "stats.json"))["text_transform"] == "split_identifiers_lower"
    )


def test_embed_task_report(checkpoints):
    root, decoder, towers = checkpoints
    out = str(root / "task_out")
    bindings = [f"PARAMS_FROM={towers}", f"TASK={TASK}", f"OUTPUT_DIR={out}"]
    assert run_embed(*bindings, f"embed.untrained_from={decoder}", "DOCUMENT_LENGTH=8") == 0
    report = read_json(os.path.join(out, "retrieval_report.json"))
    assert (report["queries"], report["documents"]) == (5, 4)  # empty query dropped, dedup
    assert set(report["results"]) == {"towers", "untrained towers", "BM25"}
    assert report["inputs"]["documents"]["truncated"] == 4  # every document is over 8 tokens
    split = rm.RetrievalSplit.from_pairs("s", PAIRS[:5])
    assert report["results"]["BM25"] == pytest.approx(evaluate_bm25(split))
    # BM25 by hand. Documents (identifiers split at "_"): d0 read_file (def read file path
    # return open path read: 8 words), d1 add (def add a b return a b: 7), d2 plus (7), d3
    # sort_items (def sort items items items sort: 6). q0 "read a file ..." -> d0 first; q1
    # "add two numbers" -> only d1 has "add"; q2 (same query, positive d2) -> d1 then the
    # zero-score d0, d2, d3 in document order: rank 3; q3 "sort a list ..." -> d3 ("sort" x2,
    # 6 words) above d1 ("a" x2, 7 words), same idf: rank 1; q4 "sum of two values" matches
    # nothing, d0 d1 d2 d3 in order, positive d1: rank 2.
    want = retrieval_reference.metrics_from_ranks([1, 1, 3, 1, 2])
    assert want["recall@1"] == 0.6 and want["mrr@10"] == pytest.approx((3 + 1 / 3 + 1 / 2) / 5)
    assert report["results"]["BM25"] == pytest.approx(want, rel=1e-6)
    # the report's towers row is the evaluation of the embeddings it wrote, recomputed in numpy
    q, d = np.load(os.path.join(out, "queries.npy")), np.load(os.path.join(out, "documents.npy"))
    assert q.shape[0] == 5 and d.shape[0] == 4
    ranks = retrieval_reference.positive_ranks(q, d, [0, 1, 2, 3, 1])
    want = retrieval_reference.metrics_from_ranks(ranks)
    assert report["results"]["towers"] == pytest.approx(want, rel=1e-6)
    assert report["results"]["towers"] == pytest.approx(split.evaluate_embeddings(q, d))
    text = read(os.path.join(out, "retrieval_report.md"))
    assert "| BM25 |" in text and "documents: 4, cut to 8 tokens: 4" in text


def test_embed_bad_inputs(checkpoints, capsys):
    root, _, towers = checkpoints
    out = str(root / "bad_out")
    bad_json = root / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    assert run_embed(f"PARAMS_FROM={towers}", f"INPUT_FILE={bad_json}", f"OUTPUT_DIR={out}") == 2
    assert f"{bad_json}:2: no key 'text' (keys: ['body'])" in capsys.readouterr().err
    missing = str(root / "missing.txt")
    assert run_embed(f"PARAMS_FROM={towers}", f"INPUT_FILE={missing}", f"OUTPUT_DIR={out}") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_embed(f"PARAMS_FROM={towers}", "TASK=stdlib_lm", f"OUTPUT_DIR={out}") == 2
    assert "not a contrastive task" in capsys.readouterr().err
    both = [f"INPUT_FILE={missing}", f"TASK={TASK}"]
    assert run_embed(f"PARAMS_FROM={towers}", *both, f"OUTPUT_DIR={out}") == 2
    assert "exactly one of" in capsys.readouterr().err
    pooling = 'DualEncoderConfig.pooling="cls"'
    assert run_embed(f"PARAMS_FROM={towers}", f"TASK={TASK}", f"OUTPUT_DIR={out}", pooling) == 2
    assert "pooling='cls' is not a pooling" in capsys.readouterr().err
    texts = root / "ok.txt"
    texts.write_text("fine\n")
    lower = "embed.text_transform='lower'"
    assert (
        run_embed(f"PARAMS_FROM={towers}", f"INPUT_FILE={texts}", f"OUTPUT_DIR={out}", lower) == 2
    )
    assert "embed.text_transform: unknown text transform 'lower'" in capsys.readouterr().err
    split = "embed.text_transform='split_identifiers'"
    assert run_embed(f"PARAMS_FROM={towers}", f"TASK={TASK}", f"OUTPUT_DIR={out}", split) == 2
    assert "come already preprocessed by the task" in capsys.readouterr().err
