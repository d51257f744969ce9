"""A SentencePiece vocabulary whose sentinels and UL2 mode tokens are its own reserved pieces.

The embedded 4,096-id vocabulary appends seqio extra ids (sentinels) and has [NLU] / [NLG] / [S2S]
as pieces. A released model's vocabulary cannot grow: its embedding table has exactly one row per
piece (Gemma 3: 262,144). Gemma's SentencePiece models reserve pieces for this: `<unused0>`,
`<unused1>`, ... are CONTROL pieces, which SentencePiece never produces from text (so they cannot
collide with real tokens) and which the pretrained model has never been trained to emit.

In Gemma 3's vocabulary (the one `import-gguf` writes for Gemma 3 270M):
  - ids 6..104 are `<unused0>`..`<unused98>`, and ids 256001..262143 `<unused99>`..`<unused6241>`;
  - `<mask>` (id 4) and `[multimodal]` (id 5) are left alone: they have meanings of their own.

Choices (`ReservedPiecesVocabulary`):
  - sentinels: the top `num_sentinels` ids, which in Gemma 3 are all `<unused..>` pieces (100:
    262143..262044). That is exactly where seqio puts extra ids (extra id i = vocab_size - 1 - i),
    so span corruption (`span_corruption.corrupt`) and every sentinel helper work unchanged, and
    no embedding row is added;
  - UL2 mode tokens [NLU], [NLG], [S2S]: the first three `<unused..>` pieces (Gemma 3: ids 6, 7,
    8): single ids, as in UL2, apart from the sentinels.
A vocabulary without enough reserved pieces at the top (Gemma 2's 256,000 pieces end with normal
ones) is refused with a ConfigError: use seqio extra ids above the vocabulary instead
(`tasks.c4`), with an embedding table that has the rows.

Decoding writes the sentinel i as `<extra_id_i>` and the mode tokens by name, as the embedded
vocabulary does, so predictions and `tasks --show` read the same on both vocabularies.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import seqio
import tensorflow as tf

from encdec_adapt.errors import ConfigError

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
NUM_SENTINELS = 100
_RESERVED = re.compile(r"^<unused\d+>$")


class ReservedPiecesVocabulary(seqio.SentencePieceVocabulary):
    """seqio vocabulary over a SentencePiece model, with sentinels and mode tokens on reserved
    pieces (see the module docstring). `extra_ids` reports the sentinels (span corruption's
    `num_sentinels`), `vocab_size` stays the number of pieces."""

    def __init__(self, path: str, num_sentinels: int = NUM_SENTINELS, mode_tokens=MODE_TOKENS):
        # seqio loads the model lazily: the reserved ids are looked up on first use.
        super().__init__(path, extra_ids=0)
        self._num_sentinels = num_sentinels
        self._mode_tokens = tuple(mode_tokens)

    @property
    def extra_ids(self) -> int:
        return self._num_sentinels

    @functools.cached_property
    def sentinel_ids(self) -> tuple[int, ...]:
        """Sentinel i's id (vocab_size - 1 - i), checked to be a reserved piece."""
        sp, size = self.tokenizer, self.vocab_size
        ids = tuple(size - 1 - i for i in range(self._num_sentinels))
        bad = [i for i in ids if not (sp.is_control(i) and _RESERVED.match(sp.id_to_piece(i)))]
        if bad:
            raise ConfigError(
                f"{self.sentencepiece_model_file}: sentinels need the top {self._num_sentinels} "
                f"ids to be reserved <unusedN> pieces, but id {bad[0]} is "
                f"{sp.id_to_piece(bad[0])!r}; use seqio extra ids above the vocabulary instead"
            )
        return ids

    @functools.cached_property
    def mode_token_ids(self) -> dict[str, int]:
        """The UL2 mode tokens -> the lowest reserved ids, below the sentinels."""
        sp, sentinels = self.tokenizer, set(self.sentinel_ids)
        free = (
            i
            for i in range(self.vocab_size)
            if i not in sentinels and sp.is_control(i) and _RESERVED.match(sp.id_to_piece(i))
        )
        ids = [i for i, _ in zip(free, self._mode_tokens)]
        if len(ids) < len(self._mode_tokens):
            raise ConfigError(
                f"{self.sentencepiece_model_file}: {len(self._mode_tokens)} reserved <unusedN> "
                f"pieces are needed for the mode tokens {self._mode_tokens}, found {len(ids)}"
            )
        return dict(zip(self._mode_tokens, ids))

    @functools.cached_property
    def _special_text(self) -> dict[int, str]:
        names = {t: f"<extra_id_{i}>" for i, t in enumerate(self.sentinel_ids)}
        names.update({i: t for t, i in self.mode_token_ids.items()})
        return names

    def _decode(self, ids):
        # SentencePiece decodes control pieces to "": write the reserved ones by name.
        special, out, run = self._special_text, [], []
        for i in ids:
            i = int(i)
            if i in special:
                if run:
                    out.append(super()._decode(run))
                    run = []
                out.append(special[i])
            else:
                run.append(i)
        if run:
            out.append(super()._decode(run))
        return "".join(out)

    def _decode_tf(self, ids):
        return tf.numpy_function(
            lambda a: _decode_rows(self, a), [tf.convert_to_tensor(ids)], tf.string
        )

    def __eq__(self, other):
        return (
            isinstance(other, ReservedPiecesVocabulary)
            and super().__eq__(other)
            and self._num_sentinels == other._num_sentinels
            and self._mode_tokens == other._mode_tokens
        )

    __hash__ = None

    def __str__(self) -> str:
        return (
            f"ReservedPiecesVocabulary(file={self.sentencepiece_model_file}, "
            f"sentinels={self._num_sentinels}, mode_tokens={self._mode_tokens})"
        )


def _decode_rows(vocab: ReservedPiecesVocabulary, ids):
    """numpy ids [n] or [b, n] -> the decoded bytes (tf.string) of each row."""
    if ids.ndim == 1:
        return np.asarray(vocab._decode(ids.tolist()).encode(), dtype=object)
    return np.asarray([vocab._decode(row.tolist()).encode() for row in ids], dtype=object)
