"""HF Gemma 2 / Gemma 3 causal LMs and gemma-library (Kaggle Flax) trees <-> this project's params.

One table of `Rule`s per model says which HF tensor feeds which parameter of ours and how its
layout changes; import and export both read the same table. Shapes are checked against the model
built from the config before anything is converted, so a bad file fails with the parameter's name
and both shapes and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import orbax.checkpoint as ocp

from encdec_adapt.errors import CheckpointError
from encdec_adapt.nn.config import AttentionType, GemmaConfig
from encdec_adapt.storage import paths
from encdec_adapt.storage.params_io import unflatten


class UnsupportedArchitecture(CheckpointError):
    """A checkpoint config that this project cannot represent."""


class Rule(NamedTuple):
    """Our flat path, the HF tensor name, and the layout change between them.

    kind: "copy" (same layout), "transpose" (HF [out, in] vs our [in, out]), "heads_in"
      (HF [heads * H, D] vs our [heads, D, H]), "heads_out" (HF [D, N * H] vs our [N, H, D]).
    """

    ours: str
    hf: str
    kind: str


def hf_shape(kind: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "copy":
        return our_shape
    if kind == "transpose":
        return our_shape[::-1]
    if kind == "heads_in":
        n, d, h = our_shape
        return (n * h, d)
    if kind == "heads_out":
        n, h, d = our_shape
        return (d, n * h)
    raise ValueError(kind)


def to_ours(kind: str, w: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "heads_in":
        n, d, h = our_shape
        return w.reshape(n, h, d).transpose(0, 2, 1)
    n, h, d = our_shape  # heads_out
    return w.T.reshape(n, h, d)


def to_hf(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "copy":
        return w
    if kind == "transpose":
        return w.T
    if kind == "heads_in":
        n, d, h = w.shape
        return w.transpose(0, 2, 1).reshape(n * h, d)
    n, h, d = w.shape  # heads_out
    return w.reshape(n * h, d).T


def block_rules(
    ours: str, hf: str, cfg: GemmaConfig, attn: str = "attn", hf_attn: str = "self_attn"
) -> list[Rule]:
    """Rules of one Gemma layer: attention, its optional QK-norm, GeGLU and the four norms."""
    rules = [
        Rule(f"{ours}/{attn}/q", f"{hf}.{hf_attn}.q_proj.weight", "heads_in"),
        Rule(f"{ours}/{attn}/k", f"{hf}.{hf_attn}.k_proj.weight", "heads_in"),
        Rule(f"{ours}/{attn}/v", f"{hf}.{hf_attn}.v_proj.weight", "heads_in"),
        Rule(f"{ours}/{attn}/o", f"{hf}.{hf_attn}.o_proj.weight", "heads_out"),
        Rule(f"{ours}/mlp/gate", f"{hf}.mlp.gate_proj.weight", "transpose"),
        Rule(f"{ours}/mlp/up", f"{hf}.mlp.up_proj.weight", "transpose"),
        Rule(f"{ours}/mlp/down", f"{hf}.mlp.down_proj.weight", "transpose"),
        Rule(f"{ours}/pre_attn_norm/scale", f"{hf}.input_layernorm.weight", "copy"),
        Rule(f"{ours}/post_attn_norm/scale", f"{hf}.post_attention_layernorm.weight", "copy"),
        Rule(f"{ours}/pre_ffw_norm/scale", f"{hf}.pre_feedforward_layernorm.weight", "copy"),
        Rule(f"{ours}/post_ffw_norm/scale", f"{hf}.post_feedforward_layernorm.weight", "copy"),
    ]
    if cfg.use_qk_norm:
        rules += [
            Rule(f"{ours}/{attn}/q_norm/scale", f"{hf}.{hf_attn}.q_norm.weight", "copy"),
            Rule(f"{ours}/{attn}/k_norm/scale", f"{hf}.{hf_attn}.k_norm.weight", "copy"),
        ]
    return rules


def decoder_only_rules(cfg: GemmaConfig) -> list[Rule]:
    rules = [
        Rule("embedder/embedding", "model.embed_tokens.weight", "copy"),
        Rule("stack/final_norm/scale", "model.norm.weight", "copy"),
    ]
    for i in range(cfg.num_layers):
        rules += block_rules(f"stack/blocks/{i}", f"model.layers.{i}", cfg)
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head", "lm_head.weight", "copy"))
    return rules


def import_tensors(
    rules: Iterable[Rule],
    tensors: dict[str, np.ndarray],
    our_shapes: dict[str, tuple[int, ...]],
    source: str,
    ignore: Iterable[str] = (),
) -> dict[str, Any]:
    """HF tensors -> our nested params dict, after checking names and shapes of all of them."""
    rules = list(rules)
    by_ours = {r.ours: r for r in rules}
    missing_rules = sorted(set(our_shapes) - set(by_ours))
    if missing_rules:  # a bug in a rule table, not in the user's file
        raise AssertionError(f"no conversion rule for {missing_rules}")
    for r in rules:
        if r.hf not in tensors:
            raise CheckpointError(f"{source}: tensor {r.hf!r} (for our {r.ours!r}) is missing")
        want = hf_shape(r.kind, tuple(our_shapes[r.ours]))
        got = tuple(tensors[r.hf].shape)
        if got != want:
            raise CheckpointError(
                f"{source}: tensor {r.hf!r} has shape {got}, the config implies {want} "
                f"(our parameter {r.ours!r})"
            )
    unknown = sorted(set(tensors) - {r.hf for r in rules} - set(ignore))
    if unknown:
        raise CheckpointError(
            f"{source}: unknown tensor {unknown[0]!r} (shape {tuple(tensors[unknown[0]].shape)}; "
            f"{len(unknown)} unknown in all): not part of the architecture in config.json"
        )
    flat = {r.ours: to_ours(r.kind, np.asarray(tensors[r.hf]), our_shapes[r.ours]) for r in rules}
    return unflatten(flat)


def export_tensors(rules: Iterable[Rule], flat_params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Our flat params -> HF tensors (float32 numpy)."""
    return {r.hf: to_hf(r.kind, np.asarray(flat_params[r.ours], np.float32)) for r in rules}


# ---- configs -------------------------------------------------------------------------------------

_HF_LAYER_TYPE = {"sliding_attention": AttentionType.LOCAL, "full_attention": AttentionType.GLOBAL}
_MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}


def _rope_from_hf(d: dict, source: str) -> tuple[float, float, float]:
    """(global base, local base, global linear scale) from new- or old-style HF rope fields."""

    def one(params: dict, what: str) -> tuple[float, float]:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "linear"):
            raise UnsupportedArchitecture(f"{source}: {what} rope_type {kind!r} is not supported")
        return float(params["rope_theta"]), float(
            params.get("factor", 1.0)
        ) if kind == "linear" else 1.0

    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:
        base_g, scale = one(rp["full_attention"], "full_attention")
        base_l, local_scale = one(rp.get("sliding_attention", rp["full_attention"]), "sliding")
        if local_scale != 1.0:
            raise UnsupportedArchitecture(f"{source}: rope scaling on sliding layers")
        return base_g, base_l, scale
    if isinstance(rp, dict) and "rope_theta" in rp:
        base, scale = one(rp, "rope_parameters")
        return base, base, scale
    # Older config.json files (as published on the hub for Gemma 2 / Gemma 3).
    base_g = float(d.get("rope_theta", 10_000.0))
    scale = 1.0
    if d.get("rope_scaling"):
        _, scale = one({"rope_theta": base_g, **d["rope_scaling"]}, "rope_scaling")
    return base_g, float(d.get("rope_local_base_freq", base_g)), scale


def config_from_hf(d: dict, source: str) -> GemmaConfig:
    """GemmaConfig of an HF Gemma2ForCausalLM / Gemma3ForCausalLM config.json dict."""
    model_type = d.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"{source}: model_type {model_type!r} (architectures {d.get('architectures')}) is "
            f"not supported here; supported: {sorted(_MODEL_TYPES)}"
        )
    family = _MODEL_TYPES[model_type]
    act = d.get("hidden_activation") or d.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedArchitecture(f"{source}: hidden_activation {act!r} (expected gelu tanh)")
    if d.get("attention_bias"):
        raise UnsupportedArchitecture(f"{source}: attention_bias=true is not supported")
    if d.get("use_bidirectional_attention"):
        raise UnsupportedArchitecture(
            f"{source}: use_bidirectional_attention=true (an embedding model) is not a causal LM"
        )
    n = d["num_hidden_layers"]
    if d.get("layer_types"):
        try:
            types = tuple(_HF_LAYER_TYPE[t] for t in d["layer_types"])
        except KeyError as e:
            raise UnsupportedArchitecture(f"{source}: layer type {e.args[0]!r}") from e
    elif family == "gemma2":
        types = tuple(AttentionType.LOCAL if i % 2 == 0 else AttentionType.GLOBAL for i in range(n))
    else:
        every = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
        types = tuple(
            AttentionType.GLOBAL if (i + 1) % every == 0 else AttentionType.LOCAL for i in range(n)
        )
    if len(types) != n:
        raise UnsupportedArchitecture(
            f"{source}: {len(types)} layer_types for num_hidden_layers={n}"
        )
    base_g, base_l, scale = _rope_from_hf(d, source)
    return GemmaConfig(
        family=family,
        vocab_size=d["vocab_size"],
        num_layers=n,
        embed_dim=d["hidden_size"],
        hidden_dim=d["intermediate_size"],
        num_heads=d["num_attention_heads"],
        num_kv_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"],
        query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
        attention_pattern=types,
        sliding_window=d.get("sliding_window"),
        rope_base_global=base_g,
        rope_base_local=base_l,
        rope_scale_global=scale,
        attn_logits_soft_cap=d.get("attn_logit_softcapping"),
        final_logit_soft_cap=d.get("final_logit_softcapping"),
        use_qk_norm=family == "gemma3",
        tie_embeddings=d.get("tie_word_embeddings", True),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
    )


def config_to_hf(cfg: GemmaConfig) -> dict:
    """The HF config.json dict of a GemmaConfig (transformers 5 field names)."""
    if cfg.rope_scale_global != 1.0:
        global_rope = {"rope_type": "linear", "factor": cfg.rope_scale_global}
    else:
        global_rope = {"rope_type": "default"}
    global_rope["rope_theta"] = cfg.rope_base_global
    local_rope = {"rope_type": "default", "rope_theta": cfg.rope_base_local}
    if cfg.family == "gemma2":
        if cfg.rope_base_local != cfg.rope_base_global or cfg.rope_scale_global != 1.0:
            raise UnsupportedArchitecture("HF Gemma 2 has a single RoPE base and no scaling")
        rope = global_rope
    else:
        rope = {"full_attention": global_rope, "sliding_attention": local_rope}
    is_g2 = cfg.family == "gemma2"
    return {
        "architectures": ["Gemma2ForCausalLM" if is_g2 else "Gemma3ForCausalLM"],
        "model_type": "gemma2" if is_g2 else "gemma3_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        # HF validates this field as an int.
        "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar)
        if float(cfg.query_pre_attn_scalar).is_integer()
        else cfg.query_pre_attn_scalar,
        "sliding_window": cfg.sliding_window,
        "layer_types": [
            "sliding_attention" if t == AttentionType.LOCAL else "full_attention"
            for t in cfg.layer_types
        ],
        "rope_parameters": rope,
        "attn_logit_softcapping": cfg.attn_logits_soft_cap,
        "final_logit_softcapping": cfg.final_logit_soft_cap,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "dtype": "float32",
    }


# ---- gemma library (Kaggle Flax / Orbax) trees ---------------------------------------------------


def nest_gemma_library(tree: dict) -> dict:
    """Kaggle checkpoints store flat keys ("transformer/layer_0/attn/q_einsum": {"w": ...});
    returns the same tree nested at every "/"."""
    out: dict = {}
    for key, value in tree.items():
        node = out
        *parents, last = str(key).split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = nest_gemma_library(value) if isinstance(value, dict) else value
    return out


def read_gemma_library(path: str) -> dict:
    """The nested params tree of a gemma-library (Kaggle Flax) Orbax checkpoint directory."""
    if not paths.isdir(path):
        raise CheckpointError(f"{path} does not exist or is not a directory")
    try:
        tree = ocp.PyTreeCheckpointer().restore(paths.absolute(path))
    except Exception as e:  # orbax raises many types for a directory it cannot read
        raise CheckpointError(f"{path} is not a readable Orbax checkpoint: {e}") from e
    return nest_gemma_library(tree)


def from_gemma_library(
    tree: dict, cfg: GemmaConfig, *, vocab_rows: str = "exact", source: str = "gemma tree"
) -> dict:
    """A gemma-library params tree ({"transformer": {"layer_0": ...}}) -> our nested params dict.

    vocab_rows: how to reconcile the embedding table with `cfg.vocab_size`:
      "exact" (rows must match), "slice" (drop the extra rows: Gemma 2 Flax checkpoints carry
      256128 rows of which HF keeps 256000), or "pad" (append zero rows).
    """
    t = tree.get("transformer", tree)

    def get(path: str) -> np.ndarray:
        node: Any = t
        for k in path.split("/"):
            if not isinstance(node, dict) or k not in node:
                raise CheckpointError(f"{source}: parameter 'transformer/{path}' is missing")
            node = node[k]
        return np.asarray(node)

    emb = get("embedder/input_embedding")
    rows = emb.shape[0]
    if rows != cfg.vocab_size:
        if vocab_rows == "slice" and rows > cfg.vocab_size:
            emb = emb[: cfg.vocab_size]
        elif vocab_rows == "pad" and rows < cfg.vocab_size:
            emb = np.concatenate([emb, np.zeros((cfg.vocab_size - rows, emb.shape[1]), emb.dtype)])
        else:
            raise CheckpointError(
                f"{source}: 'transformer/embedder/input_embedding' has {rows} rows, the config has "
                f"vocab_size={cfg.vocab_size} (vocab_rows={vocab_rows!r}; use 'slice' or 'pad')"
            )
    d, f = cfg.embed_dim, cfg.hidden_dim
    flat: dict[str, np.ndarray] = {
        "embedder/embedding": emb,
        "stack/final_norm/scale": get("final_norm/scale"),
    }
    for i in range(cfg.num_layers):
        src, dst = f"layer_{i}", f"stack/blocks/{i}"
        attn = t.get(src, {}).get("attn", {})
        if "qkv_einsum" in attn:  # num_heads == num_kv_heads
            q, k, v = get(f"{src}/attn/qkv_einsum/w")
        else:
            q = get(f"{src}/attn/q_einsum/w")
            k, v = get(f"{src}/attn/kv_einsum/w")
        gating = get(f"{src}/mlp/gating_einsum/w")
        # Checkpoints store the gating either [2, D, F] or transposed [2, F, D].
        if gating.shape[1:] == (f, d) and d != f:
            gating = gating.transpose(0, 2, 1)
        flat |= {
            f"{dst}/attn/q": q,
            f"{dst}/attn/k": k,
            f"{dst}/attn/v": v,
            f"{dst}/attn/o": get(f"{src}/attn/attn_vec_einsum/w"),
            f"{dst}/mlp/gate": gating[0],
            f"{dst}/mlp/up": gating[1],
            f"{dst}/mlp/down": get(f"{src}/mlp/linear/w"),
            f"{dst}/pre_attn_norm/scale": get(f"{src}/pre_attention_norm/scale"),
            f"{dst}/post_attn_norm/scale": get(f"{src}/post_attention_norm/scale"),
            f"{dst}/pre_ffw_norm/scale": get(f"{src}/pre_ffw_norm/scale"),
            f"{dst}/post_ffw_norm/scale": get(f"{src}/post_ffw_norm/scale"),
        }
        if cfg.use_qk_norm:
            flat[f"{dst}/attn/q_norm/scale"] = get(f"{src}/attn/_query_norm/scale")
            flat[f"{dst}/attn/k_norm/scale"] = get(f"{src}/attn/_key_norm/scale")
    return unflatten(flat)
