"""Text -> embeddings: the `encode` API of a DualEncoder, and an adapter for the MTEB protocol.

Texts are tokenised with a vocabulary (anything with `encode(str) -> list[int]`, e.g. a seqio
vocabulary), an EOS id is appended (so an empty text still has one token), rows are padded to one
fixed length and batches to one fixed size, so every call runs the same compiled function and a
text's embedding does not depend on what else is in its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from encdec_adapt.data.token_fit import fit_text
from encdec_adapt.errors import ConfigError
from encdec_adapt.nn.dual_encoder import DualEncoder


@dataclasses.dataclass
class EncodeStats:
    """What `encode` had to change: texts cut to max_length, and empty texts.

    The counts add up over calls in `TextEncoder.stats` and are per call in
    `TextEncoder.last_stats`, which also lists the rows: `truncated_rows` / `empty_rows` (row
    indices) and `lengths` (tokens of each row, prompt and EOS included, after the cut).
    """

    texts: int = 0
    truncated: int = 0
    empty: int = 0
    truncated_rows: list[int] = dataclasses.field(default_factory=list)
    empty_rows: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"texts": self.texts, "truncated": self.truncated, "empty": self.empty}


class TextEncoder:
    """Embeds texts with a DualEncoder.

    Args:
      model: the DualEncoder.
      vocabulary: has `encode(text) -> list[int]`.
      max_length: tokens per text after the prompt and EOS; longer texts are cut (and counted).
      batch_size: rows per compiled call (the last batch is padded).
      eos_id: appended to every text.
      text_transform: str -> str applied to every text (not the prompt) before tokenising: the
        preprocessing of the task the towers were trained on, so that raw texts reach them as
        the training texts did (e.g. `identifiers.text_transform("split_identifiers_lower")`
        for `stdlib_code_search_subtokens`).
    """

    def __init__(
        self,
        model: DualEncoder,
        vocabulary,
        *,
        max_length: int = 128,
        batch_size: int = 32,
        eos_id: int = 1,
        text_transform: Callable[[str], str] | None = None,
    ):
        if not isinstance(max_length, int) or max_length < 2:
            raise ConfigError(f"TextEncoder: max_length={max_length!r} must be an int >= 2")
        self.model, self.vocabulary = model, vocabulary
        self.text_transform = text_transform
        self.max_length, self.batch_size, self.eos_id = max_length, batch_size, eos_id
        self.stats = EncodeStats()
        self.last_stats = EncodeStats()

        @nnx.jit(static_argnames=("side",))
        def embed(model, tokens, side):
            return model(tokens, side=side, normalize=False)

        self._embed = embed

    def tokenize(self, text: str, prompt: str = "", max_length: int | None = None) -> list[int]:
        """prompt + text -> ids + [EOS], cut to the first max_length tokens (as in training; an
        empty text is just [EOS], or the prompt's ids and EOS). Counts into `stats`."""
        ids, _ = self._tokenize(text, prompt, max_length or self.max_length)
        return ids

    def _tokenize(self, text: str, prompt: str, max_length: int) -> tuple[list[int], bool]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects strings, got {type(text).__name__}: {text!r}")
        if self.text_transform is not None:
            text = self.text_transform(text)
        # ids + EOS cut to the first max_length tokens (EOS lost), exactly as the training
        # pipeline (seqio's append_eos, then the feature converter's cut) gives the towers a
        # long text: the project's one rule, `token_fit.fit_text`.
        ids, cut = fit_text(self.vocabulary, prompt + text, max_length, self.eos_id)
        self.stats.texts += 1
        self.stats.empty += not text.strip()
        self.stats.truncated += cut
        return ids, cut

    def encode(
        self,
        texts: Sequence[str],
        *,
        prompt: str = "",
        side: str = "query",
        normalize: bool = True,
        truncate_dim: int | None = None,
        batch_size: int | None = None,
        max_length: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """[N] texts -> [N, E] float32 embeddings (E = truncate_dim, a Matryoshka prefix, if set).

        Truncation to a prefix happens before normalisation, so prefixes are unit length too.
        `max_length` overrides the encoder's for this call (e.g. longer documents than queries).
        Empty (or whitespace-only) texts embed as prompt + EOS; they and the texts cut to
        max_length are counted in `last_stats` (this call) and `stats` (all calls).
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a sequence of strings, not one string")
        if side not in ("query", "document"):
            raise ConfigError(f"encode: side={side!r}; choose 'query' or 'document'")
        dim = self.model.config.embedding_dim
        if truncate_dim is not None and not 0 < truncate_dim <= dim:
            raise ConfigError(f"truncate_dim={truncate_dim} must be in [1, {dim}]")
        length = max_length or self.max_length
        if not isinstance(length, int) or length < 2:
            raise ConfigError(f"encode: max_length={length!r} must be an int >= 2")
        bs = batch_size or self.batch_size
        last = EncodeStats()
        rows = []
        for i, text in enumerate(texts):
            ids, cut = self._tokenize(text, prompt, length)
            rows.append(ids)
            last.lengths.append(len(ids))
            last.texts += 1
            if cut:
                last.truncated += 1
                last.truncated_rows.append(i)
            if not text.strip():
                last.empty += 1
                last.empty_rows.append(i)
        self.last_stats = last
        out = np.zeros((len(rows), truncate_dim or dim), np.float32)
        starts = range(0, len(rows), bs)
        for start in tqdm(starts, desc=f"encode ({side} side)", disable=not progress, unit="batch"):
            chunk = rows[start : start + bs]
            tokens = np.zeros((bs, length), np.int32)
            for i, ids in enumerate(chunk):
                tokens[i, : len(ids)] = ids
            emb = np.asarray(self._embed(self.model, tokens, side))[: len(chunk)]
            out[start : start + len(chunk)] = emb[:, : truncate_dim or dim]
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


class MTEBEncoder:
    """The encoder protocol MTEB calls: `encode(sentences, task_name=..., prompt_type=...)`.

    prompt_type "query" uses the query side and `query_prompt`; "document" / "passage" the
    document side and `document_prompt`; None encodes symmetric tasks (STS, classification) as
    queries. Prompts per task name override these (`task_prompts`).
    """

    PROMPT_TYPES = ("query", "document", "passage", None)

    def __init__(
        self,
        encoder: TextEncoder,
        *,
        query_prompt: str = "",
        document_prompt: str = "",
        task_prompts: dict[str, str] | None = None,
    ):
        self.encoder = encoder
        self.query_prompt, self.document_prompt = query_prompt, document_prompt
        self.task_prompts = dict(task_prompts or {})

    def encode(
        self,
        sentences: Sequence[str],
        *,
        task_name: str | None = None,
        prompt_type: Any = None,
        batch_size: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        # MTEB passes an enum whose value is the string.
        kind = getattr(prompt_type, "value", prompt_type)
        if kind not in self.PROMPT_TYPES:
            raise ValueError(
                f"MTEBEncoder: unknown prompt_type {prompt_type!r}; known: {self.PROMPT_TYPES}"
            )
        is_doc = kind in ("document", "passage")
        prompt = self.document_prompt if is_doc else self.query_prompt
        prompt = self.task_prompts.get(task_name, prompt)
        return self.encoder.encode(
            list(sentences),
            prompt=prompt,
            side="document" if is_doc else "query",
            batch_size=batch_size,
        )
