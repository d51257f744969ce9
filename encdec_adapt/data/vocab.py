"""Vocabularies: the Gemma SentencePiece tokenizer, or the project's small embedded one.

The embedded model has 4000 SentencePiece pieces + 96 seqio extra ids = 4096 ids (gemma_tiny's
vocab_size), with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and the UL2 mode tokens as
single user-defined pieces. It is trained on the embedded corpus's train split by
`scripts/build_tokenizer.py` (single thread, fixed order: reproducible) and committed under
`encdec_adapt/data/assets/`.

Sentinels follow seqio: extra id i is `vocab_size - 1 - i`, i.e. they count down from the top.
"""

from __future__ import annotations

import os
import tempfile

import sentencepiece as spm
import seqio
from sentencepiece import sentencepiece_model_pb2

from encdec_adapt.data import corpus
from encdec_adapt.errors import MissingFileError

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED_MODEL = os.path.join(ASSETS, "stdlib_spm_4000.model")
EMBEDDED_PIECES = 4000
EXTRA_IDS = 96
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")  # UL2 R, X, S denoisers
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# Training text: lines longer than this are skipped by SentencePiece, so long lines are cut first.
_MAX_LINE_BYTES = 2048


def _quiet_sentencepiece() -> None:
    """SentencePiece logs an INFO line each time an identity-normalised model loads."""
    spm.set_min_log_level(2)


def embedded_vocabulary() -> seqio.SentencePieceVocabulary:
    """The committed 4096-id vocabulary of the embedded corpus."""
    if not os.path.exists(EMBEDDED_MODEL):
        raise MissingFileError(
            f"{EMBEDDED_MODEL} is missing: run `python scripts/build_tokenizer.py` to rebuild it"
        )
    _quiet_sentencepiece()
    return seqio.SentencePieceVocabulary(EMBEDDED_MODEL, extra_ids=EXTRA_IDS)


def sentencepiece_vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
    """A user SentencePiece model, e.g. Gemma's `tokenizer.model` (its own extra ids: 0)."""
    if not os.path.exists(path):
        raise MissingFileError(f"SentencePiece model not found: {path}")
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def sentinel_id(vocab: seqio.Vocabulary, i: int) -> int:
    """seqio's extra id i: `vocab_size - 1 - i`."""
    return vocab.vocab_size - 1 - i


def training_text() -> list[str]:
    """The lines the embedded model is trained on: train-split prose and code, in corpus order."""
    docs, functions = corpus.extract()
    texts = [t for q, t in docs if corpus.split_of(q) == "train"]
    texts += [f.code for f in functions if corpus.split_of(f.qualname) == "train"]
    lines = []
    for text in texts:
        for line in text.splitlines():
            line = line.rstrip()
            if line.strip():
                lines.append(line.encode()[:_MAX_LINE_BYTES].decode(errors="ignore"))
    return lines


def train_embedded(model_path: str = EMBEDDED_MODEL) -> str:
    """Trains the embedded SentencePiece model into `model_path` (.model); returns the path.

    Deterministic: one thread, no input sampling or shuffling, a fixed corpus order.
    """
    prefix = model_path.removesuffix(".model")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text_file = os.path.join(tmp, "corpus.txt")
        with open(text_file, "w", encoding="utf-8") as f:
            f.write("\n".join(training_text()) + "\n")
        spm.SentencePieceTrainer.train(
            input=text_file,
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=EMBEDDED_PIECES,
            character_coverage=1.0,
            byte_fallback=True,  # any byte encodes: no unk on unusual characters
            split_digits=True,
            allow_whitespace_only_pieces=True,  # runs of spaces: code indentation
            # Keep text as is: newlines (byte-fallback pieces) and indentation matter for code.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            user_defined_symbols=list(MODE_TOKENS),
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    os.remove(prefix + ".vocab")
    _strip_paths(model_path)
    return model_path


def _strip_paths(model_path: str) -> None:
    """Drops the temporary paths the trainer records, so that rebuilds are byte-identical."""
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())
