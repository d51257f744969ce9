"""Model configuration: one frozen dataclass per Gemma-style stack.

The values of the published presets live in `models/*.gin` (the one place they are written);
`load_preset` parses such a file and returns the config it defines.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Sequence

import gin
import jax.numpy as jnp

from encdec_adapt.errors import ConfigError, MissingFileError


class AttentionType(enum.StrEnum):
    GLOBAL = "global"
    LOCAL = "local"  # sliding window


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of one Gemma 2 / Gemma 3 transformer stack.

    Attributes:
      family: "gemma2" or "gemma3" (selects the HF config class on export).
      vocab_size: rows of the embedding table.
      num_layers: number of transformer blocks.
      embed_dim: model width d_model.
      hidden_dim: feed-forward width (per GeGLU branch).
      num_heads / num_kv_heads: query heads and key/value heads (grouped-query attention).
      head_dim: width of one attention head.
      query_pre_attn_scalar: queries are scaled by this ** -0.5.
      attention_pattern: attention type per layer, repeated cyclically over `num_layers`
        (Gemma 2: local, global; Gemma 3: five local then one global).
      sliding_window: window of the local layers, in tokens: a query at position q sees keys with
        q - k < window (causal) or |q - k| < window (bidirectional).
      rope_base_global / rope_base_local: RoPE wavelength base of global / local layers.
      rope_scale_global: linear RoPE scaling factor of the global layers (Gemma 3 4B+: 8).
      attn_logits_soft_cap / final_logit_soft_cap: tanh soft-caps (None: off).
      use_qk_norm: RMSNorm on queries and keys per head before RoPE (Gemma 3).
      tie_embeddings: logits through the input embedding (all Gemma checkpoints).
      rms_norm_eps: epsilon inside the RMSNorm square root.
      dropout_rate: dropout after attention and feed-forward sub-blocks (training only).
      dtype: compute dtype of activations; param_dtype: storage dtype of parameters.
      attention_impl: how attention runs: "auto" (default), "xla" (materialised logits),
        "blockwise" (flash-style, O(T + S) memory) or "cudnn"; the rule is in `nn.blockwise`.
        Not an architecture choice: parameters and checkpoints do not depend on it.
    """

    family: str = "gemma2"
    vocab_size: int = 256_000
    num_layers: int = 26
    embed_dim: int = 2304
    hidden_dim: int = 9216
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0
    attention_pattern: tuple[AttentionType, ...] = (AttentionType.LOCAL, AttentionType.GLOBAL)
    sliding_window: int | None = 4096
    rope_base_global: float = 10_000.0
    rope_base_local: float = 10_000.0
    rope_scale_global: float = 1.0
    attn_logits_soft_cap: float | None = 50.0
    final_logit_soft_cap: float | None = 30.0
    use_qk_norm: bool = False
    tie_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    dropout_rate: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"

    def __post_init__(self):
        # gin and JSON give lists and strings; normalise so configs compare and hash by value.
        pattern = tuple(AttentionType(t) for t in self.attention_pattern)
        object.__setattr__(self, "attention_pattern", pattern)
        problems = []
        if self.family not in ("gemma2", "gemma3"):
            problems.append(f"family={self.family!r} (expected 'gemma2' or 'gemma3')")
        if self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not pattern:
            problems.append("attention_pattern is empty")
        if AttentionType.LOCAL in pattern and not self.sliding_window:
            problems.append("local layers in attention_pattern need a sliding_window")
        if self.attention_impl not in ("auto", "xla", "blockwise", "cudnn"):
            problems.append(
                f"attention_impl={self.attention_impl!r} (expected auto, xla, blockwise or cudnn)"
            )
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                problems.append(f"{name}={getattr(self, name)!r} is not a dtype")
        if problems:
            raise ConfigError("Invalid GemmaConfig: " + "; ".join(problems))

    @property
    def layer_types(self) -> tuple[AttentionType, ...]:
        """The attention type of every layer, length `num_layers`."""
        p = self.attention_pattern
        return tuple(p[i % len(p)] for i in range(self.num_layers))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attention_pattern"] = [str(t) for t in self.attention_pattern]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GemmaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown GemmaConfig fields: {unknown}")
        return cls(**d)


# The gin files ship inside the package (as t5x ships its configs): presets resolve after any
# install, from any working directory.
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PRESETS: Sequence[str] = (
    "gemma2_2b",
    "gemma2_9b",
    "gemma2_27b",
    "gemma3_270m",
    "gemma3_1b",
    "gemma3_4b",
    "gemma_tiny",
)


def load_preset(name: str) -> GemmaConfig:
    """Parses `models/{name}.gin` (or `name` itself, a path ending in .gin) and returns its
    `MODEL_CONFIG`, leaving the global gin config as it was."""
    path = name if name.endswith(".gin") else os.path.join(CONFIGS_DIR, "models", f"{name}.gin")
    if not os.path.exists(path):
        raise MissingFileError(f"No model preset {name!r}: {path} does not exist")
    with gin.config_scope(None), gin.unlock_config():
        saved = gin.config._CONFIG.copy()  # gin has no public snapshot API
        try:
            gin.parse_config_file(path)
            return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
        finally:
            gin.config._CONFIG.clear()
            gin.config._CONFIG.update(saved)


# --- Encoder-decoder (T5Gemma) and encoder-only classifier configs. --------------------------


#: EncoderDecoderConfig.encoder_window values: T5Gemma's and T5Gemma 2's bidirectional window.
ENCODER_WINDOWS = ("inclusive", "split")


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
    """Architecture of a T5Gemma-style encoder-decoder built from two Gemma stacks.

    Attributes:
      encoder: the encoder stack (bidirectional; its own embedding table).
      decoder: the decoder stack (causal, cross-attention in every layer; input and output
        embeddings tied when `decoder.tie_embeddings`).
      tie_encoder_decoder_embeddings: T5Gemma 2 variant: one embedding table for encoder input,
        decoder input and decoder output (needs equal vocab_size and embed_dim).
      merged_attention: T5Gemma 2 variant: the decoder's self-attention also attends to the
        encoder outputs through the same projections, one softmax over both (needs equal
        embed_dim); there is no separate cross-attention sub-block.
      encoder_causal: ablation switch: the encoder's self-attention is causal (local layers:
        the causal window q - k < window) instead of bidirectional. T5Gemma reports that a
        causal encoder costs quality; `experiments/reproduce.py` measures it. No HF equivalent.
      encoder_window: how the bidirectional encoder's local layers read `encoder.sliding_window`
        W: "inclusive" (T5Gemma) sees keys with |q - k| <= W; "split" (T5Gemma 2) sees W keys
        around the query, (W + 1) // 2 at or before it and W // 2 after it. Both as transformers.
    """

    encoder: GemmaConfig = dataclasses.field(default_factory=GemmaConfig)
    decoder: GemmaConfig = dataclasses.field(default_factory=GemmaConfig)
    tie_encoder_decoder_embeddings: bool = False
    merged_attention: bool = False
    encoder_causal: bool = False
    encoder_window: str = "inclusive"

    def __post_init__(self):
        for name in ("encoder", "decoder"):
            if not isinstance(getattr(self, name), GemmaConfig):
                raise ConfigError(
                    f"EncoderDecoderConfig.{name} must be a GemmaConfig, "
                    f"got {type(getattr(self, name)).__name__}"
                )
        enc, dec = self.encoder, self.decoder
        problems = []
        if self.tie_encoder_decoder_embeddings and (
            (enc.vocab_size, enc.embed_dim) != (dec.vocab_size, dec.embed_dim)
        ):
            problems.append(
                "tie_encoder_decoder_embeddings needs equal (vocab_size, embed_dim), got encoder "
                f"{(enc.vocab_size, enc.embed_dim)} and decoder {(dec.vocab_size, dec.embed_dim)}"
            )
        if self.tie_encoder_decoder_embeddings and not dec.tie_embeddings:
            problems.append("tie_encoder_decoder_embeddings needs decoder.tie_embeddings")
        if self.merged_attention and enc.embed_dim != dec.embed_dim:
            problems.append(
                f"merged_attention needs equal embed_dim, got encoder {enc.embed_dim} and "
                f"decoder {dec.embed_dim}"
            )
        if self.encoder_window not in ENCODER_WINDOWS:
            problems.append(
                f"encoder_window={self.encoder_window!r} (expected one of {ENCODER_WINDOWS})"
            )
        if problems:
            raise ConfigError("Invalid EncoderDecoderConfig: " + "; ".join(problems))

    @property
    def balanced(self) -> bool:
        """True when encoder and decoder have the same architecture (up to dtypes and dropout)."""
        ignore = ("dtype", "param_dtype", "dropout_rate")
        enc, dec = self.encoder.to_dict(), self.decoder.to_dict()
        return all(enc[k] == dec[k] for k in enc if k not in ignore)

    def replace(self, **changes) -> EncoderDecoderConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "encoder": self.encoder.to_dict(),
            "decoder": self.decoder.to_dict(),
            "tie_encoder_decoder_embeddings": self.tie_encoder_decoder_embeddings,
            "merged_attention": self.merged_attention,
            "encoder_causal": self.encoder_causal,
            "encoder_window": self.encoder_window,
        }

    @classmethod
    def from_dict(cls, d: dict) -> EncoderDecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown EncoderDecoderConfig fields: {unknown}")
        d = dict(d)
        for name in ("encoder", "decoder"):
            if isinstance(d.get(name), dict):
                d[name] = GemmaConfig.from_dict(d[name])
        return cls(**d)


class Pooling(enum.StrEnum):
    MEAN = "mean"  # mean over non-padding tokens (the best in Gemma Encoder's ablations)
    FIRST = "first"  # the first non-padding token
    LAST = "last"  # the last non-padding token (as HF T5GemmaForSequenceClassification)


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """An encoder-only sequence classifier: bidirectional Gemma encoder, pooling, linear head.

    Attributes:
      encoder: the encoder stack (same layout as an EncoderDecoder's encoder).
      num_classes: width of the output logits.
      pooling: how token states become one vector per row ("mean", "first", "last").
      dropout_rate: dropout on the pooled vector before the head (training only).
    """

    encoder: GemmaConfig = dataclasses.field(default_factory=GemmaConfig)
    num_classes: int = 2
    pooling: Pooling = Pooling.MEAN
    dropout_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.num_classes < 1:
            raise ConfigError(f"Invalid ClassifierConfig: num_classes={self.num_classes} < 1")

    def to_dict(self) -> dict:
        return {
            "encoder": self.encoder.to_dict(),
            "num_classes": self.num_classes,
            "pooling": str(self.pooling),
            "dropout_rate": self.dropout_rate,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        d = dict(d)
        if isinstance(d.get("encoder"), dict):
            d["encoder"] = GemmaConfig.from_dict(d["encoder"])
        return cls(**d)


ENCDEC_PRESETS: Sequence[str] = (
    "t5gemma_2b_2b",
    "t5gemma_9b_9b",
    "t5gemma_9b_2b",
    "t5gemma_270m_270m",
    "t5gemma_1b_1b",
    "t5gemma2_270m_270m",
    "t5gemma_tiny",
    "t5gemma_tiny_unbalanced",
)


def add_gin_search_path(*gin_files: str, extra: Sequence[str] = ()) -> None:
    """Lets gin resolve `models/....gin` (the shipped configs) from any working directory, and
    a gin file's includes from its own folder. The working directory comes first, so a local
    file wins over a shipped one of the same name."""
    folders = [os.path.dirname(os.path.abspath(f)) for f in gin_files if os.path.exists(f)]
    for root in [os.getcwd(), CONFIGS_DIR, *folders, *extra]:
        if root not in gin.config._LOCATION_PREFIXES:  # gin has no public query for search paths
            gin.add_config_file_search_path(root)


def load_encdec_preset(name: str) -> EncoderDecoderConfig:
    """Parses `models/{name}.gin` (including Gemma presets) and returns its MODEL_CONFIG."""
    add_gin_search_path()
    cfg = load_preset(name)
    if not isinstance(cfg, EncoderDecoderConfig):
        raise ConfigError(
            f"Preset {name!r} defines a {type(cfg).__name__}, not an EncoderDecoderConfig"
        )
    return cfg


class _GinSearchNoise(logging.Filter):
    """Drops gin's 'Path not found' ERROR records: gin logs one for every search location it
    tries before the one that holds the file (the working directory, then the shipped configs),
    so a preset that loads fine would print errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
            and str(record.msg).startswith("Path not found")
        )


# gin's resource reader logs through the root logger.
logging.getLogger().addFilter(_GinSearchNoise())
# Presets include each other as 'models/NAME.gin': resolvable from any working directory.
add_gin_search_path()
