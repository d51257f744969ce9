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
"""

import functools

import seqio

from encdec_adapt.data import classification, identifiers, registry, span_corruption, text
from encdec_adapt.tasks import metric_tasks
from encdec_adapt.tasks.contrastive import register_contrastive_task

QUERY_PROMPT = "task: code retrieval | query: "
DOCUMENT_PROMPT = "title: none | text: "

PRETRAINING = {
    "stdlib_span_corruption": "span_corruption",
    "stdlib_prefix_lm": "prefix_lm",
    "stdlib_prefix_lm_kd": "prefix_lm_full",
    "stdlib_ul2": "ul2",
}


def lm_chunks(ds, sequence_length, output_features):
    """Plain LM: tokenized documents cut into pieces that fit `targets` with their EOS."""
    del output_features
    return span_corruption.chunk(ds, sequence_length["targets"] - 1)


def register(overwrite: bool = True) -> None:
    if overwrite and "stdlib_lm" in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove("stdlib_lm")
    seqio.TaskRegistry.add(
        "stdlib_lm",
        source=registry.data_source("stdlib_prose"),
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(text.drop_empty, features=("targets",)),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            lm_chunks,
            seqio.preprocessors.append_eos,
        ],
        output_features={"targets": seqio.Feature(registry.vocabulary(), add_eos=True)},
    )
    for name, objective in PRETRAINING.items():
        registry.register_pretraining_task(
            name, "stdlib_prose", objective=objective, overwrite=overwrite
        )
    for name, negatives in (("stdlib_code_search", 0), ("stdlib_code_search_hard_negatives", 3)):
        register_contrastive_task(
            name,
            "stdlib_code_search",
            num_negatives=negatives,
            query_prompt=QUERY_PROMPT,
            document_prompt=DOCUMENT_PROMPT,
            overwrite=overwrite,
        )
    register_contrastive_task(
        "stdlib_code_search_subtokens",
        identifiers.split_identifiers_source(
            registry.data_source("stdlib_code_search"), lowercase=True
        ),
        query_prompt=QUERY_PROMPT,
        document_prompt=DOCUMENT_PROMPT,
        overwrite=overwrite,
    )
    registry.register_classification_task(
        "stdlib_doc_topic", "stdlib_code_search", classification.module_topic, overwrite=overwrite
    )
    for name, negative in (("stdlib_code_match", "hard"), ("stdlib_code_match_other", "other")):
        registry.register_classification_task(
            name,
            "stdlib_code_search",
            functools.partial(classification.code_match, negative=negative),
            overwrite=overwrite,
        )
    registry.register_mixture(
        "stdlib_pretraining", ["stdlib_span_corruption", "stdlib_prefix_lm"], overwrite=overwrite
    )
    metric_tasks.register(overwrite)  # copies of the above with metric functions


register()
