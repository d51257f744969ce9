"""`encdec-adapt embed`: texts -> embeddings files, and the retrieval evaluation of embedding
towers on a contrastive seqio split (with BM25 and untrained-tower baselines).

    encdec-adapt embed --gin_file=models/gemma_tiny.gin --gin_file=runs/embed.gin \
        --gin.MODEL_DIR=/tmp/de --gin.INPUT_FILE=texts.txt --gin.OUTPUT_DIR=/tmp/emb
    encdec-adapt embed --gin_file=models/gemma_tiny.gin --gin_file=runs/embed.gin \
        --gin.MODEL_DIR=/tmp/de --gin.TASK=stdlib_code_search --gin.OUTPUT_DIR=/tmp/eval \
        --gin.embed.untrained_from=/ckpt/gemma_tiny

Outputs (in OUTPUT_DIR):
  from a file:  embeddings.npy [N, E] float32, embeddings.jsonl (one line per row: id, tokens,
                truncated, empty), stats.json (counts)
  from a task:  queries.npy / queries.jsonl, documents.npy / documents.jsonl, stats.json, and
                retrieval_report.md / retrieval_report.json (one row per retriever: the towers,
                the untrained towers when `untrained_from` is set, BM25 when `bm25`)

Retrieval evaluation of a contrastive split (`retrieval_split`): the corpus is the split's unique
positives, the queries are its queries, the one relevant document of a query is its own positive
(hard negatives are not used, so `stdlib_code_search` and `..._hard_negatives` give the same
split). Towers embed queries on the query side and documents on the document side, each with the
task's prompt; ranking is exact, by cosine. BM25 reads the raw texts without prompts.
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from collections.abc import Sequence

import gin
import numpy as np
import seqio
from flax import nnx

from encdec_adapt.data import contrastive, identifiers, input_pipeline, registry
from encdec_adapt.data.counters import Counters
from encdec_adapt.data.jsonl_inputs import read_jsonl, text_lines
from encdec_adapt.errors import CheckpointError, ConfigError, InputError, MissingFileError
from encdec_adapt.evaluation.bm25 import evaluate_bm25
from encdec_adapt.evaluation.encode import EncodeStats, TextEncoder
from encdec_adapt.evaluation.retrieval_metrics import METRICS, RetrievalSplit
from encdec_adapt.models.base import BaseModel
from encdec_adapt.parallel import sharding
from encdec_adapt.runtime import checkpoints, entrypoints, optim
from encdec_adapt.runtime.trainer import Trainer
from encdec_adapt.storage import outputs, params_io, paths

SIDES = ("query", "document")
METRIC_TITLES = {
    "ndcg@10": "nDCG@10",
    "recall@1": "Recall@1",
    "recall@10": "Recall@10",
    "recall@100": "Recall@100",
    "mrr@10": "MRR@10",
}


# ------------------------------------------------------------------------------------ inputs


def read_texts(path: str, text_key: str = "text", id_key: str | None = None):
    """(texts, ids) of a file: one text per line, or JSON lines (.jsonl / .json) with the text
    under `text_key` (and an id under `id_key`; default id: the line number, from 1).

    Plain text keeps empty lines as empty texts (they are embedded and counted); blank lines of
    a JSONL file are not records and are skipped. Errors name the file and line
    (`jsonl_inputs.read_jsonl`).
    """
    if not paths.isfile(path):
        raise MissingFileError(f"embed: input file {path!r} does not exist")
    if not path.endswith((".jsonl", ".json")):
        lines = [text for _, text in text_lines(path)]
        return lines, list(range(1, len(lines) + 1))
    keys = [text_key] + ([id_key] if id_key is not None else [])
    texts, ids = [], []
    for number, record in read_jsonl(path, keys, string_keys=[text_key]):
        texts.append(record[text_key])
        ids.append(record[id_key] if id_key is not None else number)
    return texts, ids


def retrieval_split(task: str, split: str = "test") -> RetrievalSplit:
    """The retrieval evaluation set of a contrastive seqio task's split (raw texts + prompts).

    The task must be registered with `register_contrastive_task` (its first
    preprocessor is `contrastive_pairs`, whose keys and prompts are read from it). Pairs with an
    empty query or positive are dropped, as in training.
    """
    provider = registry.get_task_or_mixture(task)
    if not isinstance(provider, seqio.Task):
        raise ConfigError(f"embed: {task!r} is a mixture; evaluate retrieval on one of its tasks")
    pairs_fn = next(
        (
            p
            for p in provider.preprocessors
            if isinstance(p, functools.partial) and p.func is contrastive.contrastive_pairs
        ),
        None,
    )
    if pairs_fn is None:
        raise ConfigError(
            f"embed: task {task!r} is not a contrastive task (no contrastive_pairs "
            "preprocessor; register it with registry.register_contrastive_task)"
        )
    if split not in provider.splits:
        raise ConfigError(f"embed: task {task!r} has no split {split!r} (has {provider.splits})")
    kw = pairs_fn.keywords
    ds = provider.source.get_dataset(split=split, shuffle=False)
    ds = contrastive.contrastive_pairs(
        ds,
        num_negatives=0,
        query_key=kw.get("query_key", "query"),
        positive_key=kw.get("positive_key", "positive"),
        counters=Counters(),
    )
    pairs = [(ex["query"].decode(), ex["positive"].decode()) for ex in ds.as_numpy_iterator()]
    return RetrievalSplit.from_pairs(
        f"{task}:{split}",
        pairs,
        query_prompt=kw.get("query_prompt", ""),
        document_prompt=kw.get("document_prompt", ""),
    )


# ------------------------------------------------------------------------------------ towers


def load_towers(
    model: BaseModel,
    *,
    model_dir: str | None = None,
    params_from: str | None = None,
    mesh_rules: sharding.MeshRules = sharding.MeshRules(),  # noqa: B008 - frozen
    seed: int = 0,
) -> tuple[nnx.Module, str]:
    """(towers module, where its parameters came from).

    `params_from` (wins over `model_dir`): a params checkpoint of this model, or of a model the
    towers can start from (decoder-only / encoder-decoder: a warm start, i.e. *untrained*
    towers with fresh projection / pooler from `seed`). `model_dir`: its newest training
    checkpoint.
    """
    if not isinstance(model, BaseModel) or not model.can_embed:
        raise ConfigError(
            f"embed.model must be an embedding model (@DualEncoderModel()), got {model!r}"
        )
    if params_from:
        source_type, _ = params_io.read_model_json(params_from)
        if source_type != model.model_type:
            module = model.build(nnx.Rngs(seed))
            fresh = params_io.model_params(module)
            converted = model.warm_start_params(params_io.load(params_from), source_type, fresh)
            if converted is None:
                raise CheckpointError(
                    f"embed: {params_from} holds a {source_type!r} model; "
                    f"{type(model).__name__} cannot start from it"
                )
            # Orbax gives list indices as string keys; nnx trees have ints: unflatten restores.
            converted = params_io.unflatten(params_io.flatten(converted))
            params_io.assign(module, converted, params_from)
            return module, f"{params_from} ({source_type}, warm start, untrained)"
    # The trainer gives the abstract, sharded parameter tree that checkpoints restore into.
    trainer = Trainer(model, optim.OptimizerConfig(), mesh_rules.make_mesh(), mesh_rules, seed)
    target = trainer.abstract_state().params
    if params_from:
        return trainer.module(params_io.load(params_from, target)), params_from
    if not model_dir:
        raise ConfigError("embed: give embed.model_dir (MODEL_DIR) or embed.params_from")
    try:
        params, step = checkpoints.restore_run_params(model_dir, target)
    except checkpoints.MissingCheckpointError as e:
        raise checkpoints.MissingCheckpointError(f"embed: {e}") from None
    return trainer.module(params), f"{model_dir} (step {step})"


def evaluate_towers(
    encoder: TextEncoder,
    split: RetrievalSplit,
    *,
    query_length: int | None = None,
    document_length: int | None = None,
    truncate_dim: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], dict, np.ndarray, np.ndarray]:
    """(metrics, input stats {"queries": EncodeStats, "documents": ...}, query [Q, E] and
    document [N, E] embeddings) of the towers on `split`."""
    kwargs = dict(truncate_dim=truncate_dim, batch_size=batch_size, progress=progress)
    q = encoder.encode(
        split.queries,
        prompt=split.query_prompt,
        side="query",
        max_length=query_length,
        **kwargs,
    )
    q_stats = encoder.last_stats
    d = encoder.encode(
        split.documents,
        prompt=split.document_prompt,
        side="document",
        max_length=document_length,
        **kwargs,
    )
    stats = {"queries": q_stats, "documents": encoder.last_stats}
    return split.evaluate_embeddings(q, d), stats, q, d


def retrieval_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per retriever, the METRICS as columns (4 decimals)."""
    head = "| retriever | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    lines = [head, "|---|" + "---:|" * len(METRICS)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def _stats_line(what: str, stats: EncodeStats, length: int) -> str:
    return f"{what}: {stats.texts}, cut to {length} tokens: {stats.truncated}, empty: {stats.empty}"


# ------------------------------------------------------------------------------------ outputs


def _write_rows(output_dir: str, name: str, emb: np.ndarray, ids: Sequence, stats: EncodeStats):
    """name.npy ([N, E] float32) and name.jsonl (one line per row, in row order), each written
    whole (temporary name, then rename)."""
    buffer = io.BytesIO()
    np.save(buffer, emb)
    outputs.write_file(os.path.join(output_dir, f"{name}.npy"), buffer.getvalue())
    truncated, empty = set(stats.truncated_rows), set(stats.empty_rows)
    lines = []
    for row, (id_, length) in enumerate(zip(ids, stats.lengths)):
        record = {
            "row": row,
            "id": id_,
            "tokens": length,
            "truncated": row in truncated,
            "empty": row in empty,
        }
        lines.append(json.dumps(record) + "\n")
    outputs.write_file(os.path.join(output_dir, f"{name}.jsonl"), "".join(lines))


def _write_json(path: str, value) -> None:
    outputs.write_file(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _check(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"embed.{name}={value!r} must be an int >= {low}")


@gin.configurable(module="encdec_adapt")
def embed(
    *,
    model: BaseModel = gin.REQUIRED,
    output_dir: str = gin.REQUIRED,
    input_file: str | None = None,
    text_key: str = "text",
    id_key: str | None = None,
    task: str | None = None,
    split: str = "test",
    model_dir: str | None = None,
    params_from: str | None = None,
    side: str = "query",
    prompt: str = "",
    text_transform: str | None = None,
    normalize: bool = True,
    truncate_dim: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    document_max_length: int | None = None,
    report: bool = True,
    bm25: bool = True,
    untrained_from: str | None = None,
    vocabulary_file: str | None = None,
    mesh_rules: sharding.MeshRules = sharding.MeshRules(),  # noqa: B008 - frozen
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Embeds the texts of `input_file` or of a contrastive `task` split into `output_dir`.

    Args:
      model: the embedding model (@DualEncoderModel(), as runs/dual_encoder_model.gin).
      output_dir: where the files go (created).
      input_file: one text per line, or JSON lines with `text_key` (and `id_key`).
      task / split: a contrastive seqio task: queries and documents are embedded with the
        task's prompts (`prompt` and `side` do not apply) and, with `report`, evaluated.
      model_dir / params_from: the newest training checkpoint of model_dir, or a params
        checkpoint (a decoder-only one gives untrained, warm-started towers).
      side / prompt: the tower and the prompt string of input_file texts.
      text_transform: a name in `identifiers.TEXT_TRANSFORMS` applied to input_file texts: the
        preprocessing of the task the towers were trained on (e.g. "split_identifiers_lower"
        for `stdlib_code_search_subtokens`). A task's texts come already preprocessed.
      normalize: unit-length rows (cosine = dot product).
      truncate_dim: a Matryoshka prefix of the embedding (before normalisation).
      batch_size: rows per compiled call.
      max_length: tokens per query-side text (prompt and EOS included): task queries, and
        input_file texts with side "query"; longer texts are cut and counted.
      document_max_length: the same for document-side texts (default max_length).
      report: write retrieval_report.md / .json for a task.
      bm25 / untrained_from: the report's baseline rows: BM25 on the task's texts, and towers
        warm-started from this decoder-only params checkpoint without training.
      vocabulary_file: a SentencePiece model (default: the task's vocabulary, or the embedded
        one for files).
      seed: initialises what a warm start does not copy (projection, pooler).
      progress: progress bars.

    Returns a summary dict (the report's content for a task).
    """
    for name, value in (("model", model), ("output_dir", output_dir)):
        if value is gin.REQUIRED:
            raise ConfigError(f"Missing required value: embed.{name} (e.g. --gin.OUTPUT_DIR=...)")
    if (input_file is None) == (task is None):
        raise ConfigError(
            "embed: give exactly one of embed.input_file (INPUT_FILE) and embed.task (TASK)"
        )
    if not (model_dir or params_from):
        raise ConfigError(
            "embed: give embed.model_dir (MODEL_DIR) or embed.params_from (PARAMS_FROM)"
        )
    if side not in SIDES:
        raise ConfigError(f"embed.side={side!r}; choose from {SIDES}")
    try:
        transform = identifiers.text_transform(text_transform)
    except ValueError as e:
        raise ConfigError(f"embed.text_transform: {e}") from None
    if transform is not None and task is not None:
        raise ConfigError(
            f"embed.text_transform={text_transform!r} applies to INPUT_FILE texts; the texts of "
            f"task {task!r} come already preprocessed by the task"
        )
    _check("batch_size", batch_size, 1)
    _check("max_length", max_length, 2)
    doc_length = document_max_length or max_length
    _check("document_max_length", doc_length, 2)

    if vocabulary_file is not None:
        vocab = registry.vocabulary(vocabulary_file)
    elif task is not None:
        vocab = next(iter(input_pipeline.vocabularies(task).values()))
    else:
        vocab = registry.vocabulary()
    if input_file is not None:
        outputs.check_not_input(output_dir, input_file)
        texts, ids = read_texts(input_file, text_key, id_key)
        if not texts:
            raise InputError(f"embed: input file {input_file!r} holds no texts")
    else:
        eval_split = retrieval_split(task, split)

    entrypoints.check_vocab_size(model, vocab.vocab_size, "embed's vocabulary")
    module, source = load_towers(
        model, model_dir=model_dir, params_from=params_from, mesh_rules=mesh_rules, seed=seed
    )
    encoder = TextEncoder(
        module, vocab, max_length=max_length, batch_size=batch_size, text_transform=transform
    )
    paths.makedirs(outputs.absolute(output_dir))
    opts = dict(normalize=normalize, truncate_dim=truncate_dim, progress=progress)

    if input_file is not None:
        length = max_length if side == "query" else doc_length
        emb = encoder.encode(texts, prompt=prompt, side=side, max_length=length, **opts)
        stats = encoder.last_stats
        _write_rows(output_dir, "embeddings", emb, ids, stats)
        summary = {
            "input_file": input_file,
            "params": source,
            "side": side,
            "prompt": prompt,
            "text_transform": text_transform,
            "max_length": length,
            "shape": list(emb.shape),
            **stats.counts(),
        }
        _write_json(os.path.join(output_dir, "stats.json"), summary)
        print(
            f"embeddings {emb.shape[0]} x {emb.shape[1]} -> {output_dir}/embeddings.npy; "
            f"{_stats_line('texts', stats, length)}",
            flush=True,
        )
        return summary

    t0 = time.perf_counter()
    metrics, stats, q, d = evaluate_towers(
        encoder,
        eval_split,
        query_length=max_length,
        document_length=doc_length,
        truncate_dim=truncate_dim,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    _write_rows(output_dir, "queries", q, list(range(len(q))), stats["queries"])
    _write_rows(output_dir, "documents", d, list(range(len(d))), stats["documents"])
    rows = {"towers": metrics}
    sources = {"towers": source}
    if untrained_from:
        untrained, where = load_towers(model, params_from=untrained_from, seed=seed)
        base = TextEncoder(untrained, vocab, max_length=max_length, batch_size=batch_size)
        rows["untrained towers"] = evaluate_towers(
            base,
            eval_split,
            query_length=max_length,
            document_length=doc_length,
            truncate_dim=truncate_dim,
            progress=progress,
        )[0]
        sources["untrained towers"] = where
    if bm25:
        rows["BM25"] = evaluate_bm25(eval_split)
        sources["BM25"] = "Okapi BM25 (k1 1.2, b 0.75) on the task's texts, without prompts"
    summary = {
        "split": eval_split.name,
        "queries": len(eval_split.queries),
        "documents": len(eval_split.documents),
        "query_max_length": max_length,
        "document_max_length": doc_length,
        "truncate_dim": truncate_dim,
        "inputs": {side_: s.counts() for side_, s in stats.items()},
        "embed_seconds": round(seconds, 2),
        "results": rows,
        "sources": sources,
    }
    _write_json(os.path.join(output_dir, "stats.json"), summary["inputs"])
    table = retrieval_table(rows)
    lines = [
        f"# Retrieval: {eval_split.name}",
        "",
        f"{len(eval_split.queries)} queries, {len(eval_split.documents)} documents (the split's "
        "unique positives); one relevant document per query; exact search by cosine.",
        "",
        table,
        "",
        "- " + _stats_line("queries", stats["queries"], max_length),
        "- " + _stats_line("documents", stats["documents"], doc_length),
        *(f"- {name}: {where}" for name, where in sources.items()),
    ]
    text = "\n".join(lines) + "\n"
    if report:
        _write_json(os.path.join(output_dir, "retrieval_report.json"), summary)
        outputs.write_file(os.path.join(output_dir, "retrieval_report.md"), text)
    print(text, flush=True)
    return summary
