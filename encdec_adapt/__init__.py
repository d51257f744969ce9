"""encdec_adapt: adapt decoder-only Gemma models into encoder-decoders and embedding towers."""

from encdec_adapt.config import AttentionType, GemmaConfig, load_preset
from encdec_adapt.sharding import MeshRules, create_sharded, use_mesh
from encdec_adapt.transformer import DecodeCache, DecoderOnly, init_cache

__all__ = [
    "AttentionType",
    "DecodeCache",
    "DecoderOnly",
    "GemmaConfig",
    "MeshRules",
    "create_sharded",
    "init_cache",
    "load_preset",
    "use_mesh",
]
