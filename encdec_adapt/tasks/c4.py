"""The same recipes on C4 and Wikipedia (TFDS) with the Gemma tokenizer, for real runs.

Nothing is read at import: the tokenizer is loaded and the TFDS data opened on first use. Set
`ENCDEC_ADAPT_TOKENIZER` to Gemma's `tokenizer.model` (default `./tokenizer.model`) and
`ENCDEC_ADAPT_C4_DATA_DIR` to the TFDS data dir holding prepared `c4/en` and `wikipedia` (TFDS
downloads are never triggered here), or call `register(...)` again with your own values.

Sentinels: Gemma's SentencePiece model has no seqio extra ids, so `extra_ids` (default 100) are
added above its pieces (Gemma 2: ids 256000..256099, inside the 256128 rows of the Flax
checkpoints; HF checkpoints with 256000 rows must be padded by the converter).

Tasks: c4_span_corruption, c4_prefix_lm, c4_prefix_lm_kd, c4_ul2, wikipedia_ul2;
mixture: c4_wikipedia_ul2.
"""

import os

import seqio

from encdec_adapt.data import registry

C4 = "c4/en:3.1.0"
WIKIPEDIA = "wikipedia/20230601.en:1.0.0"
TOKENIZER_ENV, DATA_DIR_ENV = "ENCDEC_ADAPT_TOKENIZER", "ENCDEC_ADAPT_C4_DATA_DIR"


def register(
    tokenizer_path: str | None = None,
    extra_ids: int = 100,
    tfds_data_dir: str | None = None,
    overwrite: bool = True,
) -> None:
    path = tokenizer_path or os.environ.get(TOKENIZER_ENV, "tokenizer.model")
    # seqio loads the model lazily: a missing file is reported when the task is first used.
    vocab = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
    data_dir = tfds_data_dir or os.environ.get(DATA_DIR_ENV)
    for name, source, objective in (
        ("c4_span_corruption", C4, "span_corruption"),
        ("c4_prefix_lm", C4, "prefix_lm"),
        ("c4_prefix_lm_kd", C4, "prefix_lm_full"),
        ("c4_ul2", C4, "ul2"),
        ("wikipedia_ul2", WIKIPEDIA, "ul2"),
    ):
        registry.register_pretraining_task(
            name, source, objective, vocabulary=vocab, tfds_data_dir=data_dir, overwrite=overwrite
        )
    registry.register_mixture("c4_wikipedia_ul2", ["c4_ul2", "wikipedia_ul2"], overwrite=overwrite)


register()
