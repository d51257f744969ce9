"""Registering seqio tasks in one call, looking them up with helpful errors, and loading batches.

    from encdec_adapt.data import registry
    registry.register_pretraining_task("my_ul2", "my_corpus:1.0.0", objective="ul2",
                                      vocabulary=registry.vocabulary("/path/tokenizer.model"))
    batches = registry.get_dataset("my_ul2", {"inputs": 512, "targets": 128}, batch_size=8,
                                   converter=EncDecConverter(pack=True), seed=0)

A source is a `seqio.DataSource`, the name of an embedded dataset (`stdlib_prose`,
`stdlib_code_search`) or any TFDS name (`c4/en:3.1.0`, read from `tfds_data_dir`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from encdec_adapt import errors
from encdec_adapt.data import contrastive, corpus, prefix_lm, span_corruption, text, ul2
from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import vocab as vocab_lib

OBJECTIVES = ("span_corruption", "prefix_lm", "prefix_lm_full", "ul2")


UnknownTaskError = errors.UnknownTaskError  # an unknown name; lists the closest registered ones


def vocabulary(path: str | None = None, extra_ids: int = 0) -> seqio.Vocabulary:
    """The embedded vocabulary (path None) or a SentencePiece model such as Gemma's."""
    if path is None:
        return vocab_lib.embedded_vocabulary()
    return vocab_lib.sentencepiece_vocabulary(path, extra_ids=extra_ids)


def data_source(source: str | seqio.DataSource, tfds_data_dir: str | None = None):
    """A seqio.DataSource from a source object, an embedded dataset name or a TFDS name."""
    if isinstance(source, seqio.DataSource):
        return source
    if source in corpus.BUILDERS:
        return seqio.FunctionDataSource(
            functools.partial(corpus.load, source), splits=tuple(corpus.SPLIT_BUCKETS)
        )
    return seqio.TfdsDataSource(tfds_name=source, tfds_data_dir=tfds_data_dir)


def _add(registry, name: str, overwrite: bool, make):
    if name in registry.names():
        if not overwrite:
            raise ValueError(f"{name!r} is already registered; pass overwrite=True to replace it")
        registry.remove(name)
    return make()


def _add_task(
    name, source, tfds_data_dir, preprocessors, features, overwrite, metric_fns=None
) -> seqio.Task:
    """Registers a seqio Task over `data_source(source, tfds_data_dir)` (see `_add`)."""
    return _add(
        seqio.TaskRegistry,
        name,
        overwrite,
        lambda: seqio.TaskRegistry.add(
            name,
            source=data_source(source, tfds_data_dir),
            preprocessors=preprocessors,
            output_features=features,
            metric_fns=list(metric_fns or ()),
        ),
    )


def register_pretraining_task(
    name: str,
    source: str | seqio.DataSource,
    objective: str = "ul2",
    vocabulary: seqio.Vocabulary | None = None,
    text_key: str = "text",
    objective_kwargs: Mapping | None = None,
    counters: counters_lib.Counters | None = None,
    tfds_data_dir: str | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers `name`: text documents -> one of OBJECTIVES, tokenized with `vocabulary`.

    objective_kwargs go to the objective's preprocessor, e.g. {"noise_density": 0.3} for
    span_corruption, {"mode_token": "[S2S]"} for prefix_lm, {"config": UL2Config(...)} for ul2.
    """
    if objective not in OBJECTIVES:
        raise errors.ConfigError(
            f"unknown objective {objective!r} for task {name!r}; use one of {OBJECTIVES}"
        )
    vocabulary = vocabulary or vocab_lib.embedded_vocabulary()
    kwargs = dict(objective_kwargs or {}, counters=counters)
    if objective == "span_corruption":
        objective_fn = functools.partial(span_corruption.span_corruption, **kwargs)
    elif objective == "ul2":
        objective_fn = functools.partial(ul2.ul2, **kwargs)
    else:
        kwargs["full_sequence"] = objective == "prefix_lm_full"
        objective_fn = functools.partial(prefix_lm.prefix_lm, **kwargs)
    features = {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    if objective == "prefix_lm_full":
        features["full"] = seqio.Feature(vocabulary, add_eos=False, required=False)
    preprocessors = [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        functools.partial(text.drop_empty, features=("targets",), counters=counters),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        objective_fn,
        seqio.preprocessors.append_eos,
    ]
    return _add_task(name, source, tfds_data_dir, preprocessors, features, overwrite)


def register_contrastive_task(
    name: str,
    source: str | seqio.DataSource,
    vocabulary: seqio.Vocabulary | None = None,
    num_negatives: int = 0,
    query_prompt: str = "",
    document_prompt: str = "",
    query_key: str = "query",
    positive_key: str = "positive",
    negatives_key: str = "negatives",
    counters: counters_lib.Counters | None = None,
    tfds_data_dir: str | None = None,
    overwrite: bool = False,
    metric_fns: Sequence[Callable] = (),
) -> seqio.Task:
    """Registers `name`: (query, positive[, N hard negatives]) token pairs for dual encoders.

    `metric_fns`: the task's (targets, predictions) metric functions; an embedding model's
    eval calls them with the eval batches' document and query embeddings
    (`evaluation.embedding_task_metrics`). `encdec_adapt.tasks.register_contrastive_task`
    attaches `retrieval_metrics.retrieval_metric_fn` (nDCG@10, Recall@k, MRR@10) by default;
    data/ does not know evaluation.
    """
    vocabulary = vocabulary or vocab_lib.embedded_vocabulary()
    features = {
        "query": seqio.Feature(vocabulary, add_eos=True),
        "positive": seqio.Feature(vocabulary, add_eos=True),
    }
    if num_negatives:
        features["negatives"] = seqio.Feature(vocabulary, add_eos=True, rank=2)
    preprocessors = [
        functools.partial(
            contrastive.contrastive_pairs,
            num_negatives=num_negatives,
            query_prompt=query_prompt,
            document_prompt=document_prompt,
            query_key=query_key,
            positive_key=positive_key,
            negatives_key=negatives_key,
            counters=counters,
        ),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.preprocessors.append_eos,
    ]
    return _add_task(
        name, source, tfds_data_dir, preprocessors, features, overwrite, metric_fns=list(metric_fns)
    )


def register_classification_task(
    name: str,
    source: str | seqio.DataSource,
    preprocessor,
    vocabulary: seqio.Vocabulary | None = None,
    tfds_data_dir: str | None = None,
    overwrite: bool = False,
) -> seqio.Task:
    """Registers `name`: `preprocessor` gives {"inputs": text, "label": int} examples (e.g.
    `classification.code_match`); inputs are tokenized with EOS, the label passes through."""
    vocabulary = vocabulary or vocab_lib.embedded_vocabulary()
    preprocessors = [
        preprocessor,
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        seqio.preprocessors.append_eos,
    ]
    features = {"inputs": seqio.Feature(vocabulary, add_eos=True)}
    return _add_task(name, source, tfds_data_dir, preprocessors, features, overwrite)


def register_mixture(
    name: str, tasks: Sequence[str | tuple[str, float]], default_rate: float = 1.0,
    overwrite: bool = False,
) -> seqio.Mixture:  # fmt: skip
    """Registers a mixture of registered tasks (names, or (name, rate) pairs)."""
    for task in tasks:
        get_task_or_mixture(task if isinstance(task, str) else task[0])
    return _add(
        seqio.MixtureRegistry,
        name,
        overwrite,
        lambda: seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate),
    )


def registered() -> tuple[list[str], list[str]]:
    """(task names, mixture names), sorted."""
    return sorted(seqio.TaskRegistry.names()), sorted(seqio.MixtureRegistry.names())


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`; an UnknownTaskError lists the closest names."""
    tasks, mixtures = registered()
    if name in mixtures:
        return seqio.get_mixture_or_task(name)
    if name in tasks:
        return seqio.get_mixture_or_task(name)
    raise UnknownTaskError(name, tasks, mixtures)


def get_dataset(
    name: str,
    task_feature_lengths: Mapping[str, int],
    converter=None,
    split: str = "train",
    batch_size: int | None = None,
    seed: int | None = None,
    shuffle: bool = False,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Examples (or batches) of a task / mixture, converted by `converter` if given.

    Runs seqio with trim_output_features=False so that the converter's length policy sees and
    counts over-long features. A fixed `seed` gives identical examples run after run.
    """
    provider = get_task_or_mixture(name)
    ds = provider.get_dataset(
        sequence_length=dict(task_feature_lengths),
        split=split,
        shuffle=shuffle,
        seed=seed,
        num_epochs=num_epochs,
        trim_output_features=False,
        use_cached=False,
    )
    if converter is not None:
        ds = converter(ds, task_feature_lengths)
    if batch_size:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds
