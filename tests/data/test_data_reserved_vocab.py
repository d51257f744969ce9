"""Tasks on a real model's vocabulary: sentinels and UL2 mode tokens on its reserved pieces.

A tiny SentencePiece model laid out like Gemma 3's (pad 0, eos 1, bos 2, unk 3, <mask> 4,
[multimodal] 5, <unused0>.. from id 6, and more <unusedN> CONTROL pieces at the top of the
vocabulary) stands in for the real 262,144-piece tokenizer: no download.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import inspect
import io
import textwrap

import numpy as np
import pytest
import sentencepiece as spm
import seqio
from sentencepiece import sentencepiece_model_pb2

from encdec_adapt.data import registry, reserved_vocab
from encdec_adapt.data import span_corruption as sc
from encdec_adapt.data.feature_converters import EncDecConverter
from encdec_adapt.errors import ConfigError
from encdec_adapt.tasks import embedded

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
LOW_UNUSED, TOP_UNUSED = 5, 110  # <unused0..4> at ids 6..10; 110 more at the top


def _gemma_like_model(path, top_unused=TOP_UNUSED, top_type=Piece.CONTROL) -> str:
    lines = [ln for ln in inspect.getsource(textwrap).splitlines() if ln.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=500,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        control_symbols=["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(LOW_UNUSED)],
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(out.getvalue())
    for i in range(LOW_UNUSED, LOW_UNUSED + top_unused):
        proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=top_type)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return str(path)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return _gemma_like_model(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def expected(model_file):
    """The reserved ids, read from the proto itself (not through the code under test)."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    n = len(proto.pieces)
    return {
        "size": n,
        "modes": [ids["<unused0>"], ids["<unused1>"], ids["<unused2>"]],
        "sentinels": [ids[f"<unused{LOW_UNUSED + TOP_UNUSED - 1 - i}>"] for i in range(100)],
    }


@pytest.fixture(scope="module")
def tasks(model_file):
    names = embedded.register_corpus_tasks(model_file, "tinygemma")
    yield names
    for name in names:
        seqio.TaskRegistry.remove(name)
    seqio.MixtureRegistry.remove("tinygemma_pretraining")


def test_reserved_ids_are_gemma_unused_pieces(model_file, expected):
    v = reserved_vocab.ReservedPiecesVocabulary(model_file)
    assert v.vocab_size == expected["size"]  # no row added
    assert v.extra_ids == 100
    assert list(v.sentinel_ids) == expected["sentinels"] == [expected["size"] - 1 - i
                                                              for i in range(100)]  # fmt: skip
    assert v.mode_token_ids == dict(zip(("[NLU]", "[NLG]", "[S2S]"), expected["modes"]))
    assert expected["modes"] == [6, 7, 8]  # where Gemma 3 has <unused0..2>
    assert [sc.mode_token_ids(v, t) for t in ("[NLU]", "[NLG]", "[S2S]")] == [[6], [7], [8]]
    # text never encodes to a reserved id, even text that spells one
    ids = v.encode("<unused0> [NLU] <extra_id_0> <mask> plain words")
    assert not set(ids) & (set(expected["sentinels"]) | set(expected["modes"]))
    # decoding names them; ordinary text round-trips around them
    words = v.encode("the text")
    assert v.decode([7, *words, expected["sentinels"][0], expected["sentinels"][3]]) == (
        "[NLG]the text<extra_id_0><extra_id_3>"
    )
    assert v.decode([*words, 1, 6]) == "the text"  # stops at EOS


def test_registered_tasks_use_the_reserved_ids_and_decode_back(tasks, expected):
    assert "tinygemma_ul2" in tasks and "tinygemma_code_search_subtokens" in tasks
    lengths = {"inputs": 64, "targets": 32}
    sentinels, modes = set(expected["sentinels"]), set(expected["modes"])
    v = seqio.get_mixture_or_task("tinygemma_ul2").output_features["targets"].vocabulary
    seen_modes, seen_sentinels = set(), set()
    for ex in registry.get_dataset("tinygemma_ul2", lengths, seed=0).take(40):
        inputs, targets = ex["inputs"].numpy(), ex["targets"].numpy()
        assert inputs[0] in modes and len(inputs) <= 64 and len(targets) <= 32
        seen_modes.add(int(inputs[0]))
        text = v.decode(inputs.tolist())
        assert text.startswith(("[NLU]", "[NLG]", "[S2S]"))
        is_s = int(inputs[0]) == expected["modes"][2]
        used = (set(inputs[1:].tolist()) | set(targets.tolist())) & sentinels
        seen_sentinels |= used
        if not is_s:
            # span corruption: sentinel 0, 1, ... are the top ids, in order, and undo exactly
            assert targets[0] == expected["sentinels"][0]
            assert "<extra_id_0>" in text and v.decode(targets.tolist()).startswith("<extra_id_0>")
            original = sc.uncorrupt(inputs[1:], targets, expected["size"], 100)
            assert not set(original.tolist()) & (sentinels | modes)
        else:
            assert not used
    assert seen_modes == modes and seen_sentinels <= sentinels and seen_sentinels


def test_prefix_lm_kd_and_code_search_tasks_on_the_vocabulary(tasks, model_file):
    sp = spm.SentencePieceProcessor(model_file=model_file)
    lengths = {"inputs": 48, "targets": 24}
    ds = registry.get_dataset(
        "tinygemma_prefix_lm_kd", lengths, converter=EncDecConverter(pack=False, teacher=True),
        batch_size=2, seed=0,
    )  # fmt: skip
    batch = next(ds.as_numpy_iterator())
    # the teacher reads [<bos>] + prefix + targets of the same vocabulary
    assert (batch["teacher_input_tokens"][:, 0] == sp.bos_id()).all()
    row = next(registry.get_dataset("tinygemma_code_search", {"query": 32, "positive": 64})
               .as_numpy_iterator())  # fmt: skip
    q = sp.decode([int(i) for i in row["query"] if i != 1])
    assert q.startswith(embedded.QUERY_PROMPT)


def test_a_vocabulary_without_reserved_top_pieces_is_refused(tmp_path):
    path = _gemma_like_model(tmp_path / "t.model", top_unused=50)
    v = reserved_vocab.ReservedPiecesVocabulary(path)
    with pytest.raises(ConfigError, match=r"top 100 ids .* but id \d+ is"):
        v.sentinel_ids  # noqa: B018
    normal = _gemma_like_model(tmp_path / "n.model", top_type=Piece.USER_DEFINED)
    with pytest.raises(ConfigError, match="reserved <unusedN>"):
        reserved_vocab.ReservedPiecesVocabulary(normal).sentinel_ids  # noqa: B018
    np.testing.assert_equal(sc.num_sentinels(v), 100)
