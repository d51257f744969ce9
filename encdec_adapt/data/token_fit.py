"""Raw text -> the fixed-length token ids a model is fed: the one cutting rule of the project.

Training tasks tokenize, append EOS (`seqio.preprocessors.append_eos`) and let the feature
converter cut each feature to its length, keeping the first tokens: an over-long text loses its
EOS. Everything that feeds raw texts outside the seqio pipeline (`jsonl_inputs` for `infer`,
`evaluation.encode.TextEncoder` for `embed` and MTEB, the experiments' probes) uses `fit_ids` /
`fit_text`, so that a text reaches a model exactly as it did in training.

Pure Python: no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence


def fit_ids(ids: Sequence[int], length: int, eos_id: int | None = None) -> tuple[list[int], bool]:
    """(ids + [eos_id] cut to the first `length` tokens, whether anything was cut).

    Without `eos_id` nothing is appended. An over-long text keeps its first `length` tokens
    and loses its EOS, as the training pipeline's feature converters cut it.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"fit_ids: length={length!r} must be an int >= 1")
    out = [*ids, eos_id] if eos_id is not None else list(ids)
    cut = len(out) > length
    return out[:length], cut


def fit_text(
    vocabulary, text: str, length: int, eos_id: int | None = None
) -> tuple[list[int], bool]:
    """`fit_ids` of `vocabulary.encode(text)` (an empty text has no ids: just [EOS])."""
    ids = list(vocabulary.encode(text)) if text else []
    return fit_ids(ids, length, eos_id)
