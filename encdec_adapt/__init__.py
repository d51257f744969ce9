"""encdec_adapt: adapt decoder-only Gemma models into encoder-decoders and embedding towers.

The names here need neither TensorFlow nor torch; the data pipeline lives in
`encdec_adapt.data` / `encdec_adapt.tasks` (seqio, TensorFlow) and conversions in
`encdec_adapt.convert`.

They are imported on first use (PEP 562), so that `encdec-adapt` starts without loading JAX:
its stop-signal handling (encdec_adapt/signals.py) is in place before any heavy import.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
EXPORTS = {
    "MTEBEncoder": "encdec_adapt.evaluation.encode",
    "TextEncoder": "encdec_adapt.evaluation.encode",
    "RetrievalSplit": "encdec_adapt.evaluation.retrieval_metrics",
    "retrieval_metric_fn": "encdec_adapt.evaluation.retrieval_metrics",
    "ContrastiveConfig": "encdec_adapt.models.contrastive",
    "contrastive_loss": "encdec_adapt.models.contrastive",
    "sharded_contrastive_loss": "encdec_adapt.models.contrastive",
    "DecodeConfig": "encdec_adapt.models.decoding",
    "Decoded": "encdec_adapt.models.decoding",
    "decode": "encdec_adapt.models.decoding",
    "ClassifierModel": "encdec_adapt.models.embedding",
    "DualEncoderModel": "encdec_adapt.models.embedding",
    "CROSS_ATTENTION": "encdec_adapt.models.warm_start",
    "WarmStart": "encdec_adapt.models.warm_start",
    "warm_start": "encdec_adapt.models.warm_start",
    "Classifier": "encdec_adapt.nn.classifier",
    "AttentionType": "encdec_adapt.nn.config",
    "ClassifierConfig": "encdec_adapt.nn.config",
    "EncoderDecoderConfig": "encdec_adapt.nn.config",
    "GemmaConfig": "encdec_adapt.nn.config",
    "load_encdec_preset": "encdec_adapt.nn.config",
    "load_preset": "encdec_adapt.nn.config",
    "DualEncoder": "encdec_adapt.nn.dual_encoder",
    "DualEncoderConfig": "encdec_adapt.nn.dual_encoder",
    "warm_start_dual_encoder": "encdec_adapt.nn.dual_encoder",
    "Encoder": "encdec_adapt.nn.encdec",
    "EncoderDecoder": "encdec_adapt.nn.encdec",
    "DecodeCache": "encdec_adapt.nn.transformer",
    "DecoderOnly": "encdec_adapt.nn.transformer",
    "init_cache": "encdec_adapt.nn.transformer",
    "MeshRules": "encdec_adapt.parallel.sharding",
    "create_sharded": "encdec_adapt.parallel.sharding",
    "use_mesh": "encdec_adapt.parallel.sharding",
    "freeze": "encdec_adapt.runtime.optim",
    "frozen_fraction": "encdec_adapt.runtime.optim",
    "trainable_mask": "encdec_adapt.runtime.optim",
}

__all__ = sorted(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'encdec_adapt' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
