"""Model configuration: one frozen dataclass per Gemma-style stack.

The values of the published presets live in `gin/models/*.gin` (the one place they are written);
`load_preset` parses such a file and returns the config it defines.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Sequence

import jax.numpy as jnp

import gin


class AttentionType(enum.StrEnum):
    GLOBAL = "global"
    LOCAL = "local"  # sliding window


@gin.configurable
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
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                problems.append(f"{name}={getattr(self, name)!r} is not a dtype")
        if problems:
            raise ValueError("Invalid GemmaConfig: " + "; ".join(problems))

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
            raise ValueError(f"Unknown GemmaConfig fields: {unknown}")
        return cls(**d)


GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
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
    """Parses `gin/models/{name}.gin` in a private gin scope and returns its `MODEL_CONFIG`."""
    path = os.path.join(GIN_DIR, "models", f"{name}.gin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No model preset {name!r}: {path} does not exist")
    with gin.config_scope(None), gin.unlock_config():
        saved = gin.config._CONFIG.copy()  # gin has no public snapshot API
        try:
            gin.parse_config_file(path)
            return gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
        finally:
            gin.config._CONFIG.clear()
            gin.config._CONFIG.update(saved)
