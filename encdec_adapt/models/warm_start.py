"""Warm-starting an EncoderDecoder from decoder-only checkpoints (T5Gemma).

Warm starts work on parameter trees (the nested dicts of `params_io.model_params` or
`params_io.load`) and never build the full model, so 9B-scale trees are handled by reference:

  balanced    (2B-2B, 9B-9B): encoder and decoder both from one decoder-only checkpoint; every
              decoder layer's cross-attention (and its two norms) copied from that layer's
              self-attention (and the pre/post attention norms).
  unbalanced  (9B-2B): encoder from the large checkpoint, decoder from the small one; the
              cross-attention is random (its K/V read the encoder width) and its norms zero, and
              a run trains it alone first (`OptimizerConfig(train_only=(CROSS_ATTENTION,),
              unfreeze_at_step=K)`: `optim.trainable_mask` and `optim.freeze`).

The encoder's subtree has the layout of a `DecoderOnly` tree, so an encoder warm start is a copy
(the source's `lm_head`, if untied, is dropped); the decoder's is too, plus the cross-attention.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.errors import ConfigError
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly, make_attention
from encdec_adapt.storage import params_io
from encdec_adapt.storage.params_io import CheckpointError

PyTree = Any

#: Regex of the decoder's cross-attention parameters and their norms (the part an unbalanced
#: warm start initialises at random).
CROSS_ATTENTION = r"^decoder/stack/blocks/\d+/(cross_attn|pre_cross_norm|post_cross_norm)/"

#: Config fields that may differ between a source checkpoint and the stack it warm-starts.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "dropout_rate")


def abstract_params(factory) -> PyTree:
    """The params tree (of jax.ShapeDtypeStruct) of the module `factory` builds, unallocated."""
    return params_io.model_params(nnx.eval_shape(factory))


# Cached: tracing the initialisers of a 9B model takes seconds. Callers must not mutate the trees.
@functools.lru_cache(maxsize=16)
def decoder_only_shapes(cfg: GemmaConfig) -> PyTree:
    """Abstract params of `DecoderOnly(cfg)` (the layout of a warm-start source)."""
    return abstract_params(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=16)
def encdec_shapes(cfg: EncoderDecoderConfig) -> PyTree:
    """Abstract params of `EncoderDecoder(cfg)`."""
    return abstract_params(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0)))


def check_source(cfg: GemmaConfig, params: PyTree, source: str) -> None:
    """Raises CheckpointError naming the first parameter of `params` (a decoder-only tree) whose
    name or shape does not fit a decoder-only model of `cfg`, with both shapes."""
    params_io.check_compatible(decoder_only_shapes(cfg), params, source)


def _comparable(cfg: GemmaConfig) -> dict:
    """cfg.to_dict() with the attention pattern spelled out per layer: a preset's 6-layer cycle
    and an importer's 18 explicit layers (import-gguf) describe the same model."""
    d = cfg.to_dict()
    d["attention_pattern"] = [str(t) for t in cfg.layer_types]
    return d


def check_source_config(cfg: GemmaConfig, source_config: dict, source: str) -> None:
    """Raises CheckpointError when a checkpoint's model.json config differs from `cfg` in any
    field other than dtypes and dropout (same shapes but e.g. another soft-cap or window)."""
    want, got = _comparable(cfg), _comparable(GemmaConfig.from_dict(source_config))
    diff = [k for k in want if k not in _RUNTIME_FIELDS and want[k] != got[k]]
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"{source}: config field {k!r} is {got[k]!r}, the preset has {want[k]!r} "
            f"({len(diff)} fields differ: {diff})"
        )


def random_cross_attention(cfg: EncoderDecoderConfig, seed: int) -> dict[int, dict]:
    """Freshly initialised cross-attention of every decoder layer: {layer: {"cross_attn": ...,
    "pre_cross_norm": ..., "post_cross_norm": ...}}, built one layer at a time (cheap at 9B)."""
    dec = cfg.decoder
    out = {}
    for i in range(dec.num_layers):
        rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), i))
        attn = make_attention(dec, None, rngs, kv_input_dim=cfg.encoder.embed_dim)
        zeros = {"scale": jnp.zeros((dec.embed_dim,), dec.weight_dtype)}
        out[i] = {
            "cross_attn": params_io.model_params(attn),
            "pre_cross_norm": zeros,
            "post_cross_norm": dict(zeros),
        }
    return out


def _copied_cross_attention(block: dict) -> dict:
    """Cross-attention of one layer initialised from its self-attention (balanced warm start)."""
    return {
        "cross_attn": dict(block["attn"]),
        "pre_cross_norm": dict(block["pre_attn_norm"]),
        "post_cross_norm": dict(block["post_attn_norm"]),
    }


def warm_start(
    cfg: EncoderDecoderConfig,
    encoder_source: PyTree,
    decoder_source: PyTree | None = None,
    *,
    cross_attention: str = "auto",
    zero_cross_output: bool = False,
    seed: int = 0,
    sources: tuple[str, str] = ("encoder source", "decoder source"),
) -> PyTree:
    """EncoderDecoder params from decoder-only params trees.

    Args:
      cfg: the encoder-decoder to build (e.g. `config.load_encdec_preset("t5gemma_9b_2b")`).
      encoder_source: a `DecoderOnly` params tree of architecture `cfg.encoder`.
      decoder_source: a `DecoderOnly` params tree of architecture `cfg.decoder`; None (balanced):
        `encoder_source` again.
      cross_attention: "copy" (from each layer's self-attention; needs equal encoder and decoder
        widths), "random" (fresh init, zero norms), or "auto": "copy" when the decoder comes
        from the encoder's checkpoint and the widths match, else "random".
      zero_cross_output: zero the cross-attention output projections, so that the adapted
        decoder starts out computing exactly what the decoder-only source did.
      seed: seed of the random cross-attention.
      sources: names of the two sources in error messages (e.g. checkpoint paths).
    Returns:
      The nested params dict of `EncoderDecoder(cfg)`, leaves cast to its param dtypes.
    Raises:
      CheckpointError: a source does not fit its stack (first mismatching parameter, both shapes).
    """
    balanced_source = decoder_source is None or decoder_source is encoder_source
    if decoder_source is None:
        decoder_source, sources = encoder_source, (sources[0], sources[0])
    check_source(cfg.encoder, encoder_source, sources[0])
    check_source(cfg.decoder, decoder_source, sources[1])
    if cross_attention == "auto":
        same_width = cfg.encoder.embed_dim == cfg.decoder.embed_dim
        cross_attention = "copy" if balanced_source and same_width else "random"
    if cross_attention not in ("copy", "random"):
        raise ConfigError(f"cross_attention={cross_attention!r}: expected auto, copy or random")
    if cross_attention == "copy" and cfg.encoder.embed_dim != cfg.decoder.embed_dim:
        raise ConfigError(
            f"cross_attention='copy' needs equal widths, got encoder {cfg.encoder.embed_dim} and "
            f"decoder {cfg.decoder.embed_dim}: use 'random' for unbalanced pairs"
        )

    encoder = {"embedder": encoder_source["embedder"], "stack": encoder_source["stack"]}
    decoder: dict = {"stack": {"final_norm": decoder_source["stack"]["final_norm"], "blocks": {}}}
    if not cfg.tie_encoder_decoder_embeddings:
        decoder["embedder"] = decoder_source["embedder"]
    if not cfg.decoder.tie_embeddings:
        decoder["lm_head"] = decoder_source["lm_head"]
    if not cfg.merged_attention and cross_attention == "random":
        fresh = random_cross_attention(cfg, seed)
    for i, block in decoder_source["stack"]["blocks"].items():
        block = dict(block)
        if not cfg.merged_attention:
            cross = _copied_cross_attention(block) if cross_attention == "copy" else fresh[i]
            if zero_cross_output:
                o = cross["cross_attn"]["o"]
                cross["cross_attn"] = {**cross["cross_attn"], "o": jnp.zeros(o.shape, o.dtype)}
            block.update(cross)
        decoder["stack"]["blocks"][i] = block

    params = {"encoder": encoder, "decoder": decoder}
    target = encdec_shapes(cfg)
    params_io.check_compatible(target, params, "warm start")  # a bug here, not in the sources
    return jax.tree.map(_cast_like, target, params)


def _cast_like(target: jax.ShapeDtypeStruct, x) -> jax.Array:
    return x if getattr(x, "dtype", None) == target.dtype else jnp.asarray(x, target.dtype)


def load_source(path: str, cfg: GemmaConfig) -> PyTree:
    """Reads a decoder-only params checkpoint (`import-hf` output) for a stack of `cfg`, checking
    its model type, its parameter names and shapes (first mismatch named) and its config."""
    model_type, config = params_io.read_model_json(path)
    if model_type != "decoder_only":
        raise CheckpointError(
            f"{path}: holds a {model_type!r} model; warm starts read decoder_only checkpoints"
        )
    params = params_io.load(path, decoder_only_shapes(cfg))
    check_source_config(cfg, config, path)
    return params


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Where an EncoderDecoder's initial parameters come from (bind in gin, call with a config).

    Attributes:
      encoder_checkpoint: decoder-only params checkpoint for the encoder (and, when
        `decoder_checkpoint` is None, the decoder too: balanced).
      decoder_checkpoint: decoder-only params checkpoint for the decoder (unbalanced pairs).
      cross_attention: "auto", "copy" or "random" (see `warm_start`).
      zero_cross_output: zero the cross-attention output projections.
      seed: seed of a random cross-attention.
    """

    encoder_checkpoint: str = gin.REQUIRED
    decoder_checkpoint: str | None = None
    cross_attention: str = "auto"
    zero_cross_output: bool = False
    seed: int = 0

    def __call__(self, cfg: EncoderDecoderConfig) -> PyTree:
        # One source read once for a balanced pair; two reads when the stacks differ.
        same = self.decoder_checkpoint in (None, self.encoder_checkpoint) and cfg.balanced
        separate = not same and self.decoder_checkpoint is not None
        if not same and not separate:
            raise ConfigError(
                "WarmStart: an unbalanced EncoderDecoderConfig needs a decoder_checkpoint "
                f"(encoder width {cfg.encoder.embed_dim}, decoder width {cfg.decoder.embed_dim})"
            )
        enc = load_source(self.encoder_checkpoint, cfg.encoder)
        dec = load_source(self.decoder_checkpoint, cfg.decoder) if separate else None
        return warm_start(
            cfg,
            enc,
            dec,
            cross_attention=self.cross_attention,
            zero_cross_output=self.zero_cross_output,
            seed=self.seed,
            sources=(self.encoder_checkpoint, self.decoder_checkpoint or self.encoder_checkpoint),
        )
