"""encdec_adapt: adapt decoder-only Gemma models into encoder-decoders and embedding towers.

The names here need neither TensorFlow nor torch; the data pipeline lives in
`encdec_adapt.data` / `encdec_adapt.tasks` (seqio, TensorFlow) and conversions in
`encdec_adapt.convert`.
"""

from encdec_adapt.evaluation.encode import MTEBEncoder, TextEncoder
from encdec_adapt.evaluation.retrieval_metrics import RetrievalSplit, retrieval_metric_fn
from encdec_adapt.models.contrastive import (
    ContrastiveConfig,
    contrastive_loss,
    sharded_contrastive_loss,
)
from encdec_adapt.models.decoding import DecodeConfig, Decoded, decode
from encdec_adapt.models.embedding import ClassifierModel, DualEncoderModel
from encdec_adapt.models.warm_start import CROSS_ATTENTION, WarmStart, warm_start
from encdec_adapt.nn.classifier import Classifier
from encdec_adapt.nn.config import (
    AttentionType,
    ClassifierConfig,
    EncoderDecoderConfig,
    GemmaConfig,
    load_encdec_preset,
    load_preset,
)
from encdec_adapt.nn.dual_encoder import DualEncoder, DualEncoderConfig, warm_start_dual_encoder
from encdec_adapt.nn.encdec import Encoder, EncoderDecoder
from encdec_adapt.nn.transformer import DecodeCache, DecoderOnly, init_cache
from encdec_adapt.parallel.sharding import MeshRules, create_sharded, use_mesh
from encdec_adapt.runtime.optim import freeze, frozen_fraction, trainable_mask

__all__ = [
    "CROSS_ATTENTION",
    "AttentionType",
    "Classifier",
    "ClassifierConfig",
    "ClassifierModel",
    "ContrastiveConfig",
    "DecodeCache",
    "DecodeConfig",
    "Decoded",
    "DecoderOnly",
    "DualEncoder",
    "DualEncoderConfig",
    "DualEncoderModel",
    "Encoder",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "GemmaConfig",
    "MTEBEncoder",
    "MeshRules",
    "RetrievalSplit",
    "TextEncoder",
    "WarmStart",
    "contrastive_loss",
    "create_sharded",
    "decode",
    "freeze",
    "frozen_fraction",
    "init_cache",
    "load_encdec_preset",
    "load_preset",
    "retrieval_metric_fn",
    "sharded_contrastive_loss",
    "trainable_mask",
    "use_mesh",
    "warm_start",
    "warm_start_dual_encoder",
]
