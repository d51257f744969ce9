"""Default tasks on the embedded standard-library corpus (built on first use, no download).

Pretraining (source `stdlib_prose`, field `text`, the embedded 4096-id vocabulary):
  stdlib_lm                plain next-token prediction (decoder-only LM; documents cut to fit)
  stdlib_span_corruption   T5 span corruption (density 0.15, mean span 3)
  stdlib_prefix_lm         PrefixLM, random split
  stdlib_prefix_lm_kd      PrefixLM keeping `full` / `split` for a decoder-only KD teacher
  stdlib_ul2               UL2 mixture of denoisers (UL2Config, gin-bindable)
Contrastive (source `stdlib_code_search`): docstring summary line -> function source
  stdlib_code_search               in-batch negatives only
  stdlib_code_search_hard_negatives  + 3 hard negatives (other functions of the same module)
  stdlib_code_search_subtokens       queries and code with identifiers split into words and
                                     ASCII lower-cased (data.identifiers: readFile -> read file)
  Each carries retrieval_metrics.retrieval_metric_fn: the periodic eval of a dual encoder
  reports nDCG@10, Recall@1/10/100 and MRR@10 among the eval batches' documents.
Classification (source `stdlib_code_search`): inputs = summary + " | code: " + a function,
  stdlib_code_match        label 1 for its own function, 0 for a hard negative of the same module
  stdlib_code_match_other  label 0 for a function of another example (usually another module)
  stdlib_doc_topic         docstring summary -> its package, one of classification.TOPICS (8)
Evaluation (with seqio metric functions): see encdec_adapt.tasks.metric_tasks
Mixtures:
  stdlib_pretraining       span corruption + PrefixLM, equal rates

The same tasks on any SentencePiece vocabulary (a real model's): `register_corpus_tasks(path,
prefix)`, e.g. the Gemma 3 tokenizer that `import-gguf` writes as `gemma_ul2`, ... (registered at
import when $ENCDEC_ADAPT_GEMMA_TOKENIZER names it). Sentinels and UL2 mode tokens are then the
vocabulary's reserved `<unusedN>` pieces (data/reserved_vocab.py).
"""

import functools
import os

import seqio

from encdec_adapt.data import (
    classification,
    identifiers,
    registry,
    reserved_vocab,
    span_corruption,
    text,
)
from encdec_adapt.tasks import metric_tasks
from encdec_adapt.tasks.contrastive import register_contrastive_task

QUERY_PROMPT = "task: code retrieval | query: "
DOCUMENT_PROMPT = "title: none | text: "

# task name suffix -> objective
PRETRAINING = {
    "span_corruption": "span_corruption",
    "prefix_lm": "prefix_lm",
    "prefix_lm_kd": "prefix_lm_full",
    "ul2": "ul2",
}
# A Gemma tokenizer.model: the same tasks as `gemma_*` (register_corpus_tasks).
GEMMA_TOKENIZER_ENV = "ENCDEC_ADAPT_GEMMA_TOKENIZER"


def lm_chunks(ds, sequence_length, output_features):
    """Plain LM: tokenized documents cut into pieces that fit `targets` with their EOS."""
    del output_features
    return span_corruption.chunk(ds, sequence_length["targets"] - 1)


def register_corpus_tasks(
    vocabulary: seqio.Vocabulary | str, prefix: str, overwrite: bool = True
) -> list[str]:
    """Registers the embedded-corpus tasks on `vocabulary` as `{prefix}_lm`,
    `{prefix}_span_corruption`, `{prefix}_prefix_lm`, `{prefix}_prefix_lm_kd`, `{prefix}_ul2`,
    `{prefix}_code_search`, `{prefix}_code_search_hard_negatives`,
    `{prefix}_code_search_subtokens`, the classification tasks and `{prefix}_pretraining`;
    returns the task names.

    `vocabulary`: a seqio vocabulary, or the path of a SentencePiece model such as the
    `tokenizer.model` that `import-gguf` writes, used through `ReservedPiecesVocabulary`: its
    sentinels and UL2 mode tokens are the model's reserved `<unusedN>` pieces (Gemma 3: sentinels
    262143..262044, [NLU] / [NLG] / [S2S] = 6 / 7 / 8; see data/reserved_vocab.py), so no
    embedding row is added.
    """
    if isinstance(vocabulary, str):
        vocabulary = reserved_vocab.ReservedPiecesVocabulary(vocabulary)
    names = []

    def name(suffix: str) -> str:
        names.append(f"{prefix}_{suffix}")
        return names[-1]

    lm = name("lm")
    if overwrite and lm in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(lm)
    seqio.TaskRegistry.add(
        lm,
        source=registry.data_source("stdlib_prose"),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(text.drop_empty, features=("targets",)),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            lm_chunks,
            seqio.preprocessors.append_eos,
        ],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True)},
    )
    for suffix, objective in PRETRAINING.items():
        registry.register_pretraining_task(
            name(suffix), "stdlib_prose", objective=objective, vocabulary=vocabulary,
            overwrite=overwrite,
        )  # fmt: skip
    for suffix, negatives in (("code_search", 0), ("code_search_hard_negatives", 3)):
        register_contrastive_task(
            name(suffix),
            "stdlib_code_search",
            vocabulary=vocabulary,
            num_negatives=negatives,
            query_prompt=QUERY_PROMPT,
            document_prompt=DOCUMENT_PROMPT,
            overwrite=overwrite,
        )
    register_contrastive_task(
        name("code_search_subtokens"),
        identifiers.split_identifiers_source(
            registry.data_source("stdlib_code_search"), lowercase=True
        ),
        vocabulary=vocabulary,
        query_prompt=QUERY_PROMPT,
        document_prompt=DOCUMENT_PROMPT,
        overwrite=overwrite,
    )
    registry.register_classification_task(
        name("doc_topic"), "stdlib_code_search", classification.module_topic,
        vocabulary=vocabulary, overwrite=overwrite,
    )  # fmt: skip
    for suffix, negative in (("code_match", "hard"), ("code_match_other", "other")):
        registry.register_classification_task(
            name(suffix),
            "stdlib_code_search",
            functools.partial(classification.code_match, negative=negative),
            vocabulary=vocabulary,
            overwrite=overwrite,
        )
    registry.register_mixture(
        f"{prefix}_pretraining",
        [f"{prefix}_span_corruption", f"{prefix}_prefix_lm"],
        overwrite=overwrite,
    )
    return names


def register(overwrite: bool = True) -> None:
    """The default `stdlib_*` tasks on the embedded vocabulary; with $ENCDEC_ADAPT_GEMMA_TOKENIZER
    set (a Gemma `tokenizer.model`, e.g. import-gguf's), also the `gemma_*` tasks on it."""
    register_corpus_tasks(registry.vocabulary(), "stdlib", overwrite=overwrite)
    metric_tasks.register(overwrite)  # copies of the above with metric functions
    if os.environ.get(GEMMA_TOKENIZER_ENV):
        register_corpus_tasks(os.environ[GEMMA_TOKENIZER_ENV], "gemma", overwrite=overwrite)


register()
