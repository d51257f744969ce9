"""HF `T5Gemma2ForConditionalGeneration` <-> our `EncoderDecoder` with the T5Gemma 2 switches.

T5Gemma 2 in transformers is a Gemma 3 encoder and decoder (QK-norm, a RoPE base per layer
type) with one embedding table for encoder input, decoder input and output
(`tie_word_embeddings`) and merged decoder attention (the self-attention's projections also
read the encoder states, one softmax over both). Ours: `EncoderDecoderConfig(
tie_encoder_decoder_embeddings=True, merged_attention=True, encoder_window="split")`.

What transformers computes, and so what we import and export (parity tests in
tests/test_convert_t5gemma2.py):
  - the encoder's local layers see `sliding_window` keys split around the query, not T5Gemma's
    inclusive |q - k| <= window: `encoder_window="split"`. An "inclusive" model of window W is
    exported exactly as a split window 2W + 1;
  - `attn_logit_softcapping` is never applied by T5Gemma 2's attention, so it imports as None
    and a model with an attention soft-cap is refused on export;
  - the encoder's merged-attention keys (k_norm, no RoPE) as `encdec.project_cross_kv`.

Vision: a released T5Gemma 2 encoder carries a SigLIP vision tower and its projector, and an
end-of-image embedding (`eoi_embedding`, the input embedding of token `eoi_token_index`).
`import-hf` imports the text path only and drops those tensors with one warning, because a text
finetune uses nothing else and refusing would leave no released checkpoint importable; the
end-of-image token then embeds as an ordinary token (its row of the table). `export-hf` writes a
text model: a placeholder tiny vision config whose weights transformers initialises at random
on load (it lists them), and `eoi_embedding` set to what our model feeds for that token (its
row times sqrt(d_model)), so transformers computes our logits for every token id.

Refused with the reason: untied embeddings (`tie_word_embeddings: false`), different encoder and
decoder widths or vocabularies, a stack without QK-norm, a causal encoder.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flax import nnx

from encdec_adapt.convert import gemma, t5gemma
from encdec_adapt.convert.gemma import Rule, UnsupportedArchitecture
from encdec_adapt.nn.config import AttentionType, EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.encdec import MODEL_TYPE as ENCODER_DECODER
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import params_io

HF_MODEL_TYPE = "t5gemma2"
HF_ARCHITECTURE = "T5Gemma2ForConditionalGeneration"
#: transformers' default end-of-image token id (Gemma 3's `<end_of_image>`), written on export.
EOI_TOKEN_INDEX = 256_000

#: Encoder tensors of the image path: dropped on import (see the module docstring).
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")
_EOI = {
    "encoder": "model.encoder.embed_tokens.eoi_embedding",
    "decoder": "model.decoder.embed_tokens.eoi_embedding",
}
# transformers keeps the encoder's text stack under `text_model.` in memory and saves it
# without (its conversion mapping reads both); we write the saved form and read both.
_IN_MEMORY_PREFIX, _SAVED_PREFIX = "model.encoder.text_model.", "model.encoder."
# Gemma's norm names (gemma.block_rules) -> T5Gemma 2's.
_NORM_NAMES = {
    ".input_layernorm.": ".pre_self_attn_layernorm.",
    ".post_attention_layernorm.": ".post_self_attn_layernorm.",
}
# The SigLIP config of the text-only export: the smallest valid tower (16 x 16 images of 4 x 4
# patches pooled to 4 tokens), so that a text model does not carry a 400M random vision tower.
_PLACEHOLDER_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "image_size": 16,
    "patch_size": 4,
}
_PLACEHOLDER_MM_TOKENS = 4

log = logging.getLogger(__name__)


def _rename(rule: Rule) -> Rule:
    hf = rule.hf
    for gemma_name, t5g2_name in _NORM_NAMES.items():
        hf = hf.replace(gemma_name, t5g2_name)
    return rule._replace(hf=hf)


def rules(cfg: EncoderDecoderConfig) -> list[Rule]:
    """Our flat path <-> HF tensor name (saved form) for every parameter of a tied, merged
    `EncoderDecoder(cfg)`: the decoder reads the encoder's table, so it has no embedding rule."""
    out = [Rule("encoder/embedder/embedding", "model.encoder.embed_tokens.weight", "copy")]
    for side, stack_cfg in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        out.append(Rule(f"{side}/stack/final_norm/scale", f"model.{side}.norm.weight", "copy"))
        for i in range(stack_cfg.num_layers):
            block = gemma.block_rules(
                f"{side}/stack/blocks/{i}", f"model.{side}.layers.{i}", stack_cfg
            )
            out += [_rename(r) for r in block]
    return out


def check_exportable(cfg: EncoderDecoderConfig, source: str = "model") -> None:
    """Raises UnsupportedArchitecture when `cfg` has no T5Gemma2ForConditionalGeneration form."""
    problems = []
    if not cfg.merged_attention:
        problems.append("separate cross-attention (T5Gemma 2 merges it into self-attention)")
    if not (cfg.tie_encoder_decoder_embeddings and cfg.decoder.tie_embeddings):
        problems.append(
            "untied embeddings (only one table for encoder input, decoder input and output, "
            "tie_encoder_decoder_embeddings with decoder.tie_embeddings, is supported)"
        )
    if cfg.encoder_causal:
        problems.append("the encoder is causal (encoder_causal, an ablation)")
    for side, c in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        if not c.use_qk_norm:
            problems.append(f"{side} has no QK-norm")
        if c.attn_logits_soft_cap is not None:
            problems.append(
                f"{side} has an attention logit soft-cap ({c.attn_logits_soft_cap}), which "
                "transformers' T5Gemma 2 attention does not apply"
            )
    if problems:
        raise UnsupportedArchitecture(
            f"{source}: a model with merged attention cannot be written as {HF_ARCHITECTURE}: "
            + "; ".join(problems)
        )


def export_any_encoder_decoder(config: dict, params: Any) -> tuple[dict, dict]:
    """EXPORTERS entry of every encoder-decoder checkpoint: with merged attention (only T5Gemma 2
    has it) as T5Gemma 2, otherwise as T5Gemma (`convert.t5gemma`)."""
    if EncoderDecoderConfig.from_dict(config).merged_attention:
        return export_encoder_decoder(config, params)
    return t5gemma.export_encoder_decoder(config, params)


# ---- configs -------------------------------------------------------------------------------------


def _section(d: dict, key: str, source: str) -> dict:
    value = d.get(key)
    if not isinstance(value, dict):
        raise UnsupportedArchitecture(f"{source}: config.json has no {key!r} section")
    return value


def config_from_hf(d: dict, source: str) -> EncoderDecoderConfig:
    """EncoderDecoderConfig of a T5Gemma2Config config.json dict (text path)."""
    if d.get("model_type") != HF_MODEL_TYPE:
        raise UnsupportedArchitecture(
            f"{source}: model_type {d.get('model_type')!r} is not {HF_MODEL_TYPE!r}"
        )
    if not d.get("tie_word_embeddings", True):
        raise UnsupportedArchitecture(
            f"{source}: tie_word_embeddings=false (untied T5Gemma 2 embeddings) is not supported"
        )
    modules = {
        "encoder": _section(_section(d, "encoder", source), "text_config", f"{source} (encoder)"),
        "decoder": _section(d, "decoder", source),
    }
    stacks = {}
    for side, module in modules.items():
        # Each side is a Gemma 3 text config; T5Gemma 2 attention never applies the logit cap.
        as_gemma3 = {**module, "model_type": "gemma3_text", "tie_word_embeddings": True}
        cfg = gemma.config_from_hf(as_gemma3, f"{source} ({side})")
        stacks[side] = cfg.replace(
            attn_logits_soft_cap=None, dropout_rate=float(d.get("dropout_rate", 0.0))
        )
    enc, dec = stacks["encoder"], stacks["decoder"]
    if (enc.vocab_size, enc.embed_dim) != (dec.vocab_size, dec.embed_dim):
        raise UnsupportedArchitecture(
            f"{source}: encoder (vocab_size, hidden_size) {(enc.vocab_size, enc.embed_dim)} "
            f"differs from the decoder's {(dec.vocab_size, dec.embed_dim)}"
        )
    return EncoderDecoderConfig(
        encoder=enc,
        decoder=dec,
        tie_encoder_decoder_embeddings=True,
        merged_attention=True,
        encoder_window="split",
    )


def _text_config(cfg: GemmaConfig, model_type: str, sliding_window: int | None) -> dict:
    # T5Gemma 2 stacks are Gemma 3 stacks (a RoPE base per layer type) whatever our family says.
    d = gemma.config_to_hf(cfg.replace(family="gemma3"))
    for key in ("architectures", "dtype"):
        d.pop(key, None)
    d.update(
        model_type=model_type,
        sliding_window=sliding_window,
        tie_word_embeddings=True,
        dropout_rate=cfg.dropout_rate,
        attention_dropout=0.0,
    )
    return d


def encoder_sliding_window(cfg: EncoderDecoderConfig) -> int | None:
    """The HF (split) encoder window that reproduces ours: W, or 2W + 1 for an inclusive W."""
    w = cfg.encoder.sliding_window
    if w is None or AttentionType.LOCAL not in cfg.encoder.layer_types:
        return w
    return w if cfg.encoder_window == "split" else 2 * w + 1


def config_to_hf(cfg: EncoderDecoderConfig) -> dict:
    """The T5Gemma2Config config.json dict of `cfg` (transformers 5 field names)."""
    check_exportable(cfg)
    text = _text_config(cfg.encoder, "t5gemma2_text", encoder_sliding_window(cfg))
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "is_encoder_decoder": True,
        "encoder": {
            "model_type": "t5gemma2_encoder",
            "text_config": text,
            "vision_config": dict(_PLACEHOLDER_VISION),
            "mm_tokens_per_image": _PLACEHOLDER_MM_TOKENS,
            "eoi_token_index": EOI_TOKEN_INDEX,
            "tie_word_embeddings": True,
        },
        "decoder": _text_config(cfg.decoder, "t5gemma2_decoder", cfg.decoder.sliding_window),
        "eoi_token_index": EOI_TOKEN_INDEX,
        "tie_word_embeddings": True,
        "vocab_size": cfg.decoder.vocab_size,
        "dropout_rate": cfg.decoder.dropout_rate,
        "attention_dropout": 0.0,
        "classifier_dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": "float32",
    }


# ---- tensors -------------------------------------------------------------------------------------


def _eoi_index(hf_config: dict) -> int:
    encoder = hf_config.get("encoder") or {}
    return int(encoder.get("eoi_token_index", hf_config.get("eoi_token_index", EOI_TOKEN_INDEX)))


def _dropped(tensors: dict, cfg: EncoderDecoderConfig, eoi: int) -> list[str]:
    """Names of the image-path tensors, and copies of the tied table, that import leaves out."""
    vision = [k for k in tensors if k.startswith(VISION_PREFIXES)]
    ties = ["model.decoder.embed_tokens.weight", "lm_head.out_proj.weight", *_EOI.values()]
    present = [k for k in ties if k in tensors]
    table = tensors.get("model.encoder.embed_tokens.weight")
    eoi_w = tensors.get(_EOI["encoder"])
    # The end-of-image embedding matters to text only when its id is in the vocabulary and it
    # differs from what our model feeds for that id (its row times sqrt(d_model)).
    eoi_differs = (
        eoi_w is not None
        and table is not None
        and 0 <= eoi < table.shape[0]
        and not np.array_equal(
            np.asarray(eoi_w, np.float32),
            np.asarray(table[eoi], np.float32) * np.float32(cfg.encoder.embed_dim**0.5),
        )
    )
    if vision or eoi_differs:
        log.warning(
            "T5Gemma 2: importing the text path only: dropped %d vision tensors "
            "(vision_tower, multi_modal_projector)%s",
            len(vision),
            f" and the end-of-image embedding of token {eoi} (it now embeds as its table row)"
            if eoi_differs
            else "",
        )
    return vision + present


def import_encoder_decoder(hf_config: dict, tensors: dict, source: str) -> tuple[str, dict, Any]:
    """IMPORTERS entry: (our model_type, config dict, params) of a T5Gemma 2 directory."""
    cfg = config_from_hf(hf_config, source)
    tensors = {
        (_SAVED_PREFIX + k[len(_IN_MEMORY_PREFIX) :] if k.startswith(_IN_MEMORY_PREFIX) else k): v
        for k, v in tensors.items()
    }
    shapes = {
        k: tuple(v.shape)
        for k, v in params_io.flatten(
            params_io.model_params(nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0))))
        ).items()
    }
    ignore = _dropped(tensors, cfg, _eoi_index(hf_config))
    params = gemma.import_tensors(rules(cfg), tensors, shapes, source, ignore)
    return ENCODER_DECODER, cfg.to_dict(), params


def export_encoder_decoder(config: dict, params: Any) -> tuple[dict, dict]:
    """(HF config dict, HF tensors) of our merged-attention encoder-decoder checkpoint."""
    cfg = EncoderDecoderConfig.from_dict(config)
    hf_config = config_to_hf(cfg)
    tensors = gemma.export_tensors(rules(cfg), params_io.flatten(params))
    table = tensors["model.encoder.embed_tokens.weight"]
    eoi = np.zeros(table.shape[1], np.float32)
    if table.shape[0] > EOI_TOKEN_INDEX:
        eoi = table[EOI_TOKEN_INDEX] * np.float32(cfg.encoder.embed_dim**0.5)
    tensors[_EOI["encoder"]] = eoi
    return hf_config, tensors
