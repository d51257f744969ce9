"""Network code: model configs and presets, layers, attention, the Gemma stack, the
encoder-decoder, classifier and dual-encoder towers. Imports no data, training or CLI code."""

from encdec_adapt.nn.config import (
    AttentionType,
    ClassifierConfig,
    EncoderDecoderConfig,
    GemmaConfig,
    load_encdec_preset,
    load_preset,
)

__all__ = [
    "AttentionType",
    "ClassifierConfig",
    "EncoderDecoderConfig",
    "GemmaConfig",
    "load_encdec_preset",
    "load_preset",
]
