"""Raw-text inputs for `infer` from a JSON-lines file (one object per line), as t5x users expect.

    {"inputs": "Return the absolute value", "targets": "of the argument."}

`JsonlInputs` (gin-configurable, next to `input_pipeline.DataConfig`) says where the file is,
which keys hold the texts, the lengths and the vocabulary. The whole file is read and checked
when the iterator is made, before any compute: a missing file, a line that is not a JSON object,
a missing key or a non-string value is an error naming the file and line number.

Batches have the features of the model kind (`feature_converter`):
  "encdec":  encoder_input_tokens [B, S] = inputs (+ EOS); decoder_target_tokens /
             decoder_input_tokens (targets shifted right with 0) / decoder_loss_weights [B, T]
             (zeros without targets).
  "decoder": one prefix-LM row per example, [B, S + T]: decoder_target_tokens = inputs (+ EOS)
             then targets + EOS, decoder_input_tokens shifted right with 0, loss weights on the
             targets only. Without targets the row is the prompt (`DecoderOnlyModel.predict_batch`
             continues it).
with S = task_feature_lengths["inputs"] and T = task_feature_lengths["targets"].

Nothing is cut silently: an over-long input (or target) keeps its first tokens and is flagged and
counted (`token_fit.fit_ids`: the rule of training, where the cut drops the EOS); an empty input
becomes just EOS and is flagged (decoding starts from EOS).
The last batch is padded to `batch_size` rows (same shape: no recompilation); `batch_examples`
says which rows are real, so padding rows are never written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import gin
import numpy as np

from encdec_adapt.data.task_names import vocabularies
from encdec_adapt.data.token_fit import fit_ids, fit_text
from encdec_adapt.errors import ConfigError, InputError
from encdec_adapt.parallel.distributed import local_rows
from encdec_adapt.storage import paths

KINDS = ("encdec", "decoder")


class JsonlInputError(InputError):
    """Bad JSONL input; the message names the file and line (the CLI exits 2 with it)."""


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class JsonlInputs:
    """A JSON-lines file of raw texts fed as fixed-shape batches.

    Attributes:
      path: the .jsonl file; blank lines are skipped.
      input_key: key of the input text (the prompt of a decoder-only model).
      target_key: key of the target text, needed to score (infer mode "score"); None: no
        targets (predict).
      batch_size: global batch size; the last batch is padded to it.
      task_feature_lengths: {"inputs": S, "targets": T} in tokens, EOS included.
      feature_converter: "encdec" or "decoder" (see the module docstring).
      add_eos: append EOS to the inputs (seqio's tasks here do; a prefix-LM decoder-only model
        trained on them expects it). Targets always end with EOS.
      vocabulary: a SentencePiece model file (e.g. Gemma's tokenizer.model); None: the embedded
        4096-id vocabulary. Ignored when `task` is set.
      extra_ids: sentinel ids appended to a `vocabulary` file's pieces.
      task: a registered seqio task whose "inputs" / "targets" vocabularies are used.
    """

    path: str = ""
    input_key: str = "inputs"
    target_key: str | None = None
    batch_size: int = 8
    task_feature_lengths: dict = dataclasses.field(
        default_factory=lambda: {"inputs": 512, "targets": 128}
    )
    feature_converter: str = "encdec"
    add_eos: bool = True
    vocabulary: str | None = None
    extra_ids: int = 0
    task: str | None = None

    def __post_init__(self):
        if self.path is gin.REQUIRED:
            raise ConfigError(
                "Missing required value: JsonlInputs.path=%gin.REQUIRED (set the macro that "
                "feeds it, e.g. --gin.INPUT_FILE=/path/inputs.jsonl)"
            )
        problems = []
        if not isinstance(self.path, str) or not self.path:
            problems.append(f"path={self.path!r} must be a .jsonl file")
        elif not paths.isfile(paths.check(self.path, "JsonlInputs.path")):
            problems.append(f"path={self.path!r}: no such file")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be a positive int")
        if self.feature_converter not in KINDS:
            problems.append(
                f"feature_converter={self.feature_converter!r} (expected one of {KINDS})"
            )
        lengths = self.task_feature_lengths
        if (
            not isinstance(lengths, dict)
            or set(lengths) != {"inputs", "targets"}
            or not all(isinstance(v, int) and v > 0 for v in lengths.values())
        ):
            problems.append(
                f"task_feature_lengths={lengths!r} must be "
                "{'inputs': int > 0, 'targets': int > 0}"
            )
        if self.vocabulary is not None and not os.path.isfile(str(self.vocabulary)):
            problems.append(f"vocabulary={self.vocabulary!r}: no such SentencePiece model file")
        if problems:
            raise ConfigError("Invalid JsonlInputs: " + "; ".join(problems))

    def vocabularies(self) -> dict:
        """{"inputs": vocabulary, "targets": vocabulary} (seqio vocabularies)."""
        if self.task:
            return vocabularies(self.task)
        from encdec_adapt.data import vocab as vocab_lib  # lazy on purpose: seqio, TensorFlow

        if self.vocabulary is None:
            v = vocab_lib.embedded_vocabulary()
        else:
            v = vocab_lib.sentencepiece_vocabulary(self.vocabulary, extra_ids=self.extra_ids)
        return {"inputs": v, "targets": v}


@dataclasses.dataclass
class Example:
    """One line of the file, tokenized.

    line: 1-based line number; inputs / targets: the texts as given (targets None without a
    target key); input_ids / target_ids: the tokens fed (EOS-terminated unless cut); truncated:
    names of the features that were cut; empty_input: the input text had no tokens.
    """

    line: int
    inputs: str
    targets: str | None
    input_ids: list[int]
    target_ids: list[int]
    truncated: list[str]
    empty_input: bool


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) of every line of a UTF-8 text file; a line that
    is not UTF-8 raises JsonlInputError naming the file, line and byte."""
    with paths.open_file(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JsonlInputError(
                    f"Invalid input {path}:{number}: not UTF-8 text (byte "
                    f"0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
                ) from None
            yield number, text.removesuffix("\n").removesuffix("\r")


def read_jsonl(
    path: str,
    keys: Sequence[str],
    *,
    string_keys: Sequence[str] | None = None,
    hints: dict[str, str] | None = None,
) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a JSON-lines file, in order.

    Every record must be a JSON object holding `keys`; those in `string_keys` (default: all
    of `keys`) must be strings. Anything else raises JsonlInputError naming the file and line
    ("Invalid JSONL input PATH:LINE: ..."), with `hints[key]` appended to a missing key's
    message (e.g. which setting names the key).
    """
    string_keys = keys if string_keys is None else string_keys
    hints = hints or {}
    for number, raw in text_lines(path):
        if not raw.strip():
            continue
        where = f"Invalid JSONL input {path}:{number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise JsonlInputError(
                f"{where}: not valid JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(record, dict):
            raise JsonlInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in keys:
            if key not in record:
                hint = f"; {hints[key]}" if key in hints else ""
                raise JsonlInputError(f"{where}: no key {key!r} (keys: {sorted(record)}{hint})")
            if key in string_keys and not isinstance(record[key], str):
                raise JsonlInputError(
                    f"{where}: {key!r} must be a string, got {type(record[key]).__name__}"
                )
        yield number, record


def read_examples(cfg: JsonlInputs, vocabs: dict) -> list[Example]:
    """Parses, checks and tokenizes every line of `cfg.path`; errors name the file and line."""
    lengths = cfg.task_feature_lengths
    eos_in, eos_out = vocabs["inputs"].eos_id, vocabs["targets"].eos_id
    keys = [cfg.input_key] + ([cfg.target_key] if cfg.target_key else [])
    hints = {cfg.input_key: "set JsonlInputs.input_key"}
    if cfg.target_key:
        hints[cfg.target_key] = "set JsonlInputs.target_key"
    examples = []
    for number, record in read_jsonl(cfg.path, keys, hints=hints):
        text = record[cfg.input_key]
        ids = list(vocabs["inputs"].encode(text))
        input_ids, cut_in = fit_ids(ids, lengths["inputs"], eos_in if cfg.add_eos else None)
        empty = not ids
        if empty and not cfg.add_eos:
            input_ids = [eos_in]  # decode from just EOS
        truncated = ["inputs"] if cut_in else []
        target, target_ids = None, []
        if cfg.target_key:
            target = record[cfg.target_key]
            target_ids, cut_out = fit_text(vocabs["targets"], target, lengths["targets"], eos_out)
            if cut_out:
                truncated.append("targets")
        examples.append(Example(number, text, target, input_ids, target_ids, truncated, empty))
    if not examples:
        raise JsonlInputError(f"Invalid JSONL input {cfg.path}: the file has no examples")
    return examples


def _row(ids: list[int], length: int) -> np.ndarray:
    row = np.zeros(length, np.int32)
    row[: len(ids)] = ids
    return row


def _shift_right(tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)


def features(examples: list[Example], cfg: JsonlInputs) -> dict[str, np.ndarray]:
    """The model features of `examples` padded with all-zero rows to `cfg.batch_size` rows."""
    s, t = cfg.task_feature_lengths["inputs"], cfg.task_feature_lengths["targets"]
    b = cfg.batch_size
    if cfg.feature_converter == "encdec":
        enc = np.zeros((b, s), np.int32)
        targets = np.zeros((b, t), np.int32)
        for i, ex in enumerate(examples):
            enc[i], targets[i] = _row(ex.input_ids, s), _row(ex.target_ids, t)
        return {
            "encoder_input_tokens": enc,
            "decoder_input_tokens": _shift_right(targets),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets > 0).astype(np.int32),
        }
    targets = np.zeros((b, s + t), np.int32)
    weights = np.zeros((b, s + t), np.int32)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        targets[i] = _row(ex.input_ids + ex.target_ids, s + t)
        weights[i, n : n + len(ex.target_ids)] = 1
    return {
        "decoder_input_tokens": _shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }


class JsonlIterator:
    """Batches of a JSONL file (one pass); position = batches consumed.

    Every process reads the whole file and yields its rows of each global batch, so every
    process knows every example (`batch_examples`) when writing the results.
    """

    def __init__(self, cfg: JsonlInputs):
        self.cfg = cfg
        self.vocabs = cfg.vocabularies()
        self.examples = read_examples(cfg, self.vocabs)
        self.num_batches = -(-len(self.examples) // cfg.batch_size)
        self.index = 0

    def batch_examples(self, index: int) -> list[Example]:
        """The examples of global batch `index`, in row order (the rows after them are padding)."""
        b = self.cfg.batch_size
        return self.examples[index * b : (index + 1) * b]

    def counts(self) -> dict[str, int]:
        """{"examples", "truncated/inputs", "truncated/targets", "empty_inputs"} of the file."""
        out = {"examples": len(self.examples)}
        for feature in ("inputs", "targets"):
            out[f"truncated/{feature}"] = sum(feature in ex.truncated for ex in self.examples)
        out["empty_inputs"] = sum(ex.empty_input for ex in self.examples)
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.num_batches:
            raise StopIteration
        batch = features(self.batch_examples(self.index), self.cfg)
        self.index += 1
        rows = local_rows(self.cfg.batch_size)
        return {k: v[rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])
