"""HF `T5GemmaForConditionalGeneration` <-> this project's `EncoderDecoder` ("encoder_decoder").

T5Gemma is the Gemma 2 architecture on both sides (one RoPE base, no QK-norm), so a model with
Gemma 3 stacks or the T5Gemma 2 switches (tied encoder/decoder embeddings, T5Gemma 2's split
encoder window) has no T5Gemma export and is refused with the reason; a model with merged
attention exports as T5Gemma 2 (`convert.t5gemma2`). Tensor layouts follow `convert.gemma`'s
rule kinds; only the names differ (HF T5Gemma calls its norms pre/post_self_attn_layernorm, ...).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from encdec_adapt.convert import gemma
from encdec_adapt.convert.gemma import Rule, UnsupportedArchitecture
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.encdec import MODEL_TYPE as ENCODER_DECODER
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import params_io

HF_MODEL_TYPE = "t5gemma"
HF_ARCHITECTURE = "T5GemmaForConditionalGeneration"


_MLP = ("gate", "up", "down")
_NORMS = {
    "pre_attn_norm": "pre_self_attn_layernorm",
    "post_attn_norm": "post_self_attn_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_CROSS_NORMS = {
    "pre_cross_norm": "pre_cross_attn_layernorm",
    "post_cross_norm": "post_cross_attn_layernorm",
}


def _layer_rules(ours: str, hf: str, cross: bool) -> list[Rule]:
    attn = [("attn", "self_attn")] + ([("cross_attn", "cross_attn")] if cross else [])
    rules = [
        Rule(
            f"{ours}/{a}/{p}", f"{hf}.{h}.{p}_proj.weight", "heads_out" if p == "o" else "heads_in"
        )
        for a, h in attn
        for p in ("q", "k", "v", "o")
    ]
    rules += [Rule(f"{ours}/mlp/{p}", f"{hf}.mlp.{p}_proj.weight", "transpose") for p in _MLP]
    norms = dict(_NORMS, **(_CROSS_NORMS if cross else {}))
    rules += [Rule(f"{ours}/{o}/scale", f"{hf}.{h}.weight", "copy") for o, h in norms.items()]
    return rules


def rules(cfg: EncoderDecoderConfig) -> list[Rule]:
    """Our flat path <-> HF tensor name for every parameter of `EncoderDecoder(cfg)`."""
    out = []
    for side, stack_cfg in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        out += [
            Rule(f"{side}/embedder/embedding", f"model.{side}.embed_tokens.weight", "copy"),
            Rule(f"{side}/stack/final_norm/scale", f"model.{side}.norm.weight", "copy"),
        ]
        for i in range(stack_cfg.num_layers):
            out += _layer_rules(
                f"{side}/stack/blocks/{i}", f"model.{side}.layers.{i}", cross=side == "decoder"
            )
    if not cfg.decoder.tie_embeddings:
        out.append(Rule("decoder/lm_head", "lm_head.out_proj.weight", "copy"))
    return out


def check_exportable(cfg: EncoderDecoderConfig, source: str = "model") -> None:
    """Raises UnsupportedArchitecture when `cfg` has no T5GemmaForConditionalGeneration form."""
    problems = []
    if cfg.tie_encoder_decoder_embeddings or cfg.merged_attention:
        problems.append("T5Gemma 2 variant switches (tied embeddings / merged attention)")
    if cfg.encoder_causal:
        problems.append("the encoder is causal (encoder_causal, an ablation)")
    if cfg.encoder_window != "inclusive":
        problems.append(f"the encoder window is {cfg.encoder_window!r} (T5Gemma's is inclusive)")
    for side, c in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        if c.use_qk_norm:
            problems.append(f"{side} uses QK-norm")
        if c.rope_base_local != c.rope_base_global or c.rope_scale_global != 1.0:
            problems.append(f"{side} has per-layer-type or scaled RoPE")
    if problems:
        raise UnsupportedArchitecture(
            f"{source}: cannot be written as {HF_ARCHITECTURE} (Gemma 2 stacks only): "
            + "; ".join(problems)
        )


# ---- configs -------------------------------------------------------------------------------------


def config_from_hf(d: dict, source: str) -> EncoderDecoderConfig:
    """EncoderDecoderConfig of a T5GemmaConfig config.json dict."""
    if d.get("model_type") != HF_MODEL_TYPE:
        raise UnsupportedArchitecture(
            f"{source}: model_type {d.get('model_type')!r} is not {HF_MODEL_TYPE!r}"
        )
    if d.get("is_encoder_decoder") is False:
        raise UnsupportedArchitecture(f"{source}: is_encoder_decoder=false (encoder-only T5Gemma)")
    stacks = {}
    for side in ("encoder", "decoder"):
        module = d.get(side)
        if not isinstance(module, dict):
            raise UnsupportedArchitecture(f"{source}: config.json has no {side!r} section")
        # Each side is a Gemma 2 module config; the top-level tie flag governs lm_head.
        as_gemma2 = {**module, "model_type": "gemma2"}
        if side == "decoder":
            as_gemma2["tie_word_embeddings"] = d.get(
                "tie_word_embeddings", module.get("tie_word_embeddings", True)
            )
        cfg = gemma.config_from_hf(as_gemma2, f"{source} ({side})")
        stacks[side] = cfg.replace(dropout_rate=float(d.get("dropout_rate", 0.0)))
    cross = d["decoder"].get("cross_attention_hidden_size")
    if cross is not None and cross != stacks["encoder"].embed_dim:
        raise UnsupportedArchitecture(
            f"{source}: decoder.cross_attention_hidden_size={cross} differs from the encoder's "
            f"hidden_size={stacks['encoder'].embed_dim}"
        )
    return EncoderDecoderConfig(encoder=stacks["encoder"], decoder=stacks["decoder"])


def _module_config(cfg: GemmaConfig, *, is_decoder: bool, cross_dim: int | None) -> dict:
    d = gemma.config_to_hf(cfg)
    for key in ("architectures", "model_type", "dtype"):
        d.pop(key, None)
    d.update(
        model_type="t5_gemma_module",
        is_decoder=is_decoder,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base_global},
        dropout_rate=cfg.dropout_rate,
        attention_dropout=0.0,
    )
    if cross_dim is not None:
        d["cross_attention_hidden_size"] = cross_dim
    return d


def config_to_hf(cfg: EncoderDecoderConfig) -> dict:
    """The T5GemmaConfig config.json dict of `cfg` (transformers 5 field names)."""
    check_exportable(cfg)
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "is_encoder_decoder": True,
        "encoder": _module_config(cfg.encoder, is_decoder=False, cross_dim=None),
        "decoder": _module_config(cfg.decoder, is_decoder=True, cross_dim=cfg.encoder.embed_dim),
        "tie_word_embeddings": cfg.decoder.tie_embeddings,
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


def import_encoder_decoder(hf_config: dict, tensors: dict, source: str) -> tuple[str, dict, Any]:
    """IMPORTERS entry: (our model_type, config dict, params) of a T5Gemma directory."""
    cfg = config_from_hf(hf_config, source)
    shapes = {
        k: tuple(v.shape)
        for k, v in params_io.flatten(
            params_io.model_params(nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0))))
        ).items()
    }
    # A tied checkpoint may still carry lm_head.out_proj.weight (a copy of the embedding).
    ignore = ["lm_head.out_proj.weight"] if cfg.decoder.tie_embeddings else []
    params = gemma.import_tensors(rules(cfg), tensors, shapes, source, ignore)
    return ENCODER_DECODER, cfg.to_dict(), params


def export_encoder_decoder(config: dict, params: Any) -> tuple[dict, dict]:
    """EXPORTERS entry: (HF config dict, HF tensors) of our encoder-decoder checkpoint."""
    cfg = EncoderDecoderConfig.from_dict(config)
    hf_config = config_to_hf(cfg)
    return hf_config, gemma.export_tensors(rules(cfg), params_io.flatten(params))
