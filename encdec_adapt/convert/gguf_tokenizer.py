"""A SentencePiece `tokenizer.model` rebuilt from a GGUF file's tokenizer metadata.

llama.cpp stores a SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) as three parallel
arrays, tokenizer.ggml.tokens / scores / token_type, plus the special ids. Its token types use
SentencePiece's own numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
so the pieces go back into a ModelProto almost as they are. Two things llama.cpp's converter
changed are undone:
  - user-defined pieces were pre-normalised, "▁" written as a space (llama.cpp matches them on the
    raw text); SentencePiece matches them on the escaped text, so spaces become "▁" again;
  - the unknown piece was marked control (it is special in HF's tokenizer config); SentencePiece
    needs exactly one piece of type UNKNOWN.

The model is BPE: llama.cpp's SentencePiece tokenizer merges the adjacent pair whose merged piece
has the highest score, which is SentencePiece's BPE encoding. The file does not say whether a BOS
is added (tokenizer.ggml.add_bos_token): a tokenizer.model cannot either; seqio adds none.
"""

from __future__ import annotations

from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from encdec_adapt.errors import InputError

TOKENIZER_MODEL = "tokenizer.model"

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_KNOWN_TYPES = {
    Piece.NORMAL,
    Piece.UNKNOWN,
    Piece.CONTROL,
    Piece.USER_DEFINED,
    Piece.UNUSED,
    Piece.BYTE,
}
# The special ids SentencePiece records, and their metadata keys.
_SPECIAL_IDS = {
    "unk": "tokenizer.ggml.unknown_token_id",
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def _required(meta: dict[str, Any], key: str, source: str) -> Any:
    if key not in meta:
        raise InputError(f"{source}: tokenizer metadata {key!r} is missing")
    return meta[key]


def vocab_size(meta: dict[str, Any], source: str) -> int:
    """Number of tokens in the file's tokenizer vocabulary."""
    return len(_required(meta, "tokenizer.ggml.tokens", source))


def sentencepiece_model(meta: dict[str, Any], source: str) -> bytes:
    """The serialized SentencePiece ModelProto of the file's tokenizer metadata.

    Raises InputError (naming the key or token) when the metadata is not a SentencePiece
    vocabulary or is inconsistent; the result is checked by loading it with sentencepiece.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise InputError(
            f"{source}: tokenizer.ggml.model is {kind!r}; import-gguf rebuilds only SentencePiece "
            "vocabularies ('llama', as Gemma files have)"
        )
    tokens = list(_required(meta, "tokenizer.ggml.tokens", source))
    scores = list(_required(meta, "tokenizer.ggml.scores", source))
    types = list(_required(meta, "tokenizer.ggml.token_type", source))
    if not len(tokens) == len(scores) == len(types):
        raise InputError(
            f"{source}: tokenizer.ggml.tokens has {len(tokens)} entries, scores {len(scores)}, "
            f"token_type {len(types)}: they must be parallel arrays"
        )
    ids = {name: meta.get(key) for name, key in _SPECIAL_IDS.items()}
    for name, i in ids.items():
        if i is not None and not 0 <= int(i) < len(tokens):
            raise InputError(
                f"{source}: {_SPECIAL_IDS[name]}={i} is outside the vocabulary of {len(tokens)}"
            )
    unk = ids["unk"]
    if unk is None:
        unknown = [i for i, t in enumerate(types) if t == Piece.UNKNOWN]
        if len(unknown) != 1:
            raise InputError(f"{source}: tokenizer.ggml.unknown_token_id is missing")
        unk = unknown[0]

    proto = sentencepiece_model_pb2.ModelProto()
    seen: dict[str, int] = {}
    for i, (token, score, kind_id) in enumerate(zip(tokens, scores, types, strict=True)):
        kind_id = int(kind_id)
        if kind_id not in _KNOWN_TYPES:
            raise InputError(f"{source}: token {i} ({token!r}) has unknown token_type {kind_id}")
        if i == unk:
            kind_id = Piece.UNKNOWN
        elif kind_id == Piece.UNKNOWN:  # a second unknown piece: SentencePiece allows one
            kind_id = Piece.CONTROL
        if kind_id == Piece.USER_DEFINED:
            token = token.replace(" ", "\u2581")
        if token in seen:
            raise InputError(
                f"{source}: tokens {seen[token]} and {i} are both {token!r} (after SentencePiece "
                "escaping): a SentencePiece vocabulary needs distinct pieces"
            )
        seen[token] = i
        proto.pieces.add(piece=token, score=float(score), type=kind_id)

    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(int(t) == Piece.BYTE for t in types)
    spec.unk_id, spec.unk_piece = int(unk), tokens[unk]
    for name in ("bos", "eos", "pad"):
        i = ids[name]
        setattr(spec, f"{name}_id", -1 if i is None else int(i))
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[int(i)])
    norm = proto.normalizer_spec
    norm.name = "identity"  # the text is kept as is: no NFKC, no whitespace folding
    # llama.cpp's default for SentencePiece vocabularies is to add the prefix space.
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    blob = proto.SerializeToString()
    try:
        spm.SentencePieceProcessor(model_proto=blob)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad model
        raise InputError(
            f"{source}: the tokenizer metadata does not make a valid SentencePiece model: {e}"
        ) from e
    return blob
