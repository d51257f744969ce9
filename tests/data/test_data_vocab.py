"""The embedded SentencePiece vocabulary: ids, mode tokens, lossless text, reproducible build."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import subprocess
import sys

import pytest
import sentencepiece

from encdec_adapt.data import vocab
from encdec_adapt.data.span_corruption import mode_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_embedded_vocabulary_ids_match_gemma_tiny():
    v = vocab.embedded_vocabulary()
    assert v.vocab_size == 4096  # models/gemma_tiny.gin vocab_size
    sp = v.tokenizer
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert v.extra_ids == 96
    raw = sentencepiece.SentencePieceProcessor(model_file=vocab.EMBEDDED_MODEL)
    assert raw.get_piece_size() == 4000
    assert [mode_token_ids(v, t) for t in vocab.MODE_TOKENS] == [[4], [5], [6]]
    assert v.decode([4095]) == "<extra_id_0>" and v.decode([4000]) == "<extra_id_95>"


def test_code_and_prose_round_trip_losslessly():
    v = vocab.embedded_vocabulary()
    text = 'def f(x):\n\t"""Tabs, ünïcödé €."""\n    return  x + 1\n\n[NLG] done'
    assert v.decode(v.encode(text)) == text
    ids = v.encode("Return the number of items in a container.")
    assert 3 not in ids and len(ids) < 15  # no unknowns; common English is a few pieces


def test_gemma_style_mode_tokens_may_take_several_ids():
    v = vocab.embedded_vocabulary()
    assert len(mode_token_ids(v, "<mode:extreme>")) > 1
    assert mode_token_ids(v, None) == []


def test_missing_user_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.model"):
        vocab.sentencepiece_vocabulary(str(tmp_path / "nowhere.model"))


@pytest.mark.slow
def test_build_tokenizer_reproduces_the_committed_model(tmp_path):
    out = tmp_path / "rebuilt.model"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "build_tokenizer.py"), "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    with open(vocab.EMBEDDED_MODEL, "rb") as f:
        committed = f.read()
    assert out.read_bytes() == committed
