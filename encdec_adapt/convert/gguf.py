"""`import-gguf`: a llama.cpp GGUF file of a Gemma 2 / Gemma 3 causal LM -> params checkpoint.

A GGUF file holds the architecture as metadata under llama.cpp's key names (`gemma3.block_count`,
...), the tokenizer as metadata (tokenizer.ggml.*), and the weights in HF's [out, in] layout under
llama.cpp's tensor names, possibly quantised. This module reads them with the `gguf` package,
dequantises to float32, renames the tensors to HF's names and converts them with the same rule
table as `import-hf` (convert/gemma.py). Everything is checked (architecture, tensor types, names,
shapes, vocabulary size) before anything is dequantised or written.

What llama.cpp's converter changed, undone here (as transformers' GGUF loader does):
  - Gemma RMSNorm weights are stored as 1 + w (llama.cpp's norm multiplies by the weight as is):
    1 is subtracted from every `*norm.weight` tensor, QK-norm included;
  - q/k rows are NOT permuted for Gemma (llama.cpp runs Gemma with NeoX-style RoPE, as HF does).
Values the file does not state are llama.cpp's (llama-model.cpp: the runtime that defines what a
GGUF file means): Gemma 3 has five sliding-window layers then one global layer and RoPE base
10000 on the sliding layers; Gemma 2 alternates sliding / global; queries are scaled by
head_dim ** -0.5, except for the 27B models (46 layers Gemma 2, 62 layers Gemma 3):
(embedding_length // head_count) ** -0.5. transformers' GGUF loader leaves that scalar at its
config default (256), which agrees for every released size but the 27B ones.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from encdec_adapt.convert import gemma, gguf_tokenizer
from encdec_adapt.convert.hf import DECODER_ONLY, abstract_shapes
from encdec_adapt.errors import CheckpointError, ConfigError, InputError, MissingFileError
from encdec_adapt.nn.config import AttentionType, GemmaConfig
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import outputs, params_io

GGUF_VERSION = "0.19.0"  # the `gguf` package version tested (setup.py pins it)
ARCHITECTURES = ("gemma2", "gemma3")
# Tensor types read (those of the published Gemma GGUF files, e.g. Q4_K_M: F32 norms, Q8_0,
# Q5_0, Q4_K, Q6_K weights), plus the float types.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_K", "Q6_K")

# llama.cpp's tensor names -> HF's (gguf's tensor_mapping.py, Gemma 2 / Gemma 3).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_HF_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_HF_TO_GGUF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
# llama.cpp's model-size detection (by layer count) for the attention scale of the 27B models.
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}
_GEMMA3_GLOBAL_EVERY = 6
_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA2_SOFT_CAPS = (50.0, 30.0)  # llama.cpp's defaults when the keys are absent
_REQUIRED = object()


def _gguf_module():
    """The `gguf` package (an optional dependency: `pip install encdec_adapt[real]`)."""
    try:
        import gguf
    except ImportError as e:
        raise ConfigError(
            f"import-gguf needs the `gguf` package: pip install gguf=={GGUF_VERSION}"
        ) from e
    return gguf


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a llama.cpp Gemma tensor name (None: not a Gemma tensor)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_name(hf: str) -> str:
    """llama.cpp tensor name of an HF Gemma tensor name (the inverse of `hf_name`)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = _HF_LAYER_TENSOR.fullmatch(hf)
    if not m or m.group(2) not in _HF_TO_GGUF_LAYER:
        raise KeyError(hf)
    return f"blk.{m.group(1)}.{_HF_TO_GGUF_LAYER[m.group(2)]}.weight"


class GGUFFile(NamedTuple):
    """A parsed GGUF file: metadata values by key, tensors (gguf ReaderTensor) by name."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` in row-major (HF) order; GGUF lists dimensions innermost first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name


def read_file(path: str) -> GGUFFile:
    """Parses the header, metadata and tensor table of `path` (tensor data stays on disk)."""
    gguf = _gguf_module()
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # the reader raises ValueError / IndexError / ... on a short file
        raise InputError(
            f"{path} ({os.path.getsize(path)} bytes) is not a readable GGUF file, truncated or "
            f"corrupt: {type(e).__name__}: {e}"
        ) from e
    return GGUFFile(path, metadata, {t.name: t for t in reader.tensors})


# ---- config --------------------------------------------------------------------------------------


def _uniform(value: Any, key: str, source: str) -> Any:
    """A per-layer array metadata value that is the same for every layer, as one value."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise InputError(f"{source}: {key} differs between layers ({value}): not supported")
        return value[0]
    return value


def _float(x: Any) -> float:
    # Metadata floats are float32: keep their shortest decimal (9.99999997e-07 -> 1e-06).
    return float(str(np.float32(x)))


def config_from_gguf(f: GGUFFile) -> GemmaConfig:
    """GemmaConfig of a Gemma 2 / Gemma 3 GGUF file (metadata plus the tensor table)."""
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(
            f"{f.path}: general.architecture {arch!r} is not supported by import-gguf "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )

    def key(name: str, default: Any = _REQUIRED) -> Any:
        full = f"{arch}.{name}"
        if full in f.metadata:
            return _uniform(f.metadata[full], full, f.path)
        if default is _REQUIRED:
            raise InputError(f"{f.path}: metadata key {full!r} is missing")
        return default

    n, d = int(key("block_count")), int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", d // heads))
    value_dim = int(key("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise InputError(
            f"{f.path}: {arch}.attention.value_length={value_dim} differs from key_length="
            f"{head_dim}: not a Gemma attention"
        )
    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{f.path}: tensor 'token_embd.weight' is missing")
    # llama.cpp: the scaling type defaults to linear, the factor to 1 (older files: scale_linear);
    # it applies to the global layers only.
    scaling = key("rope.scaling.type", "linear")
    scale = _float(key("rope.scaling.factor", key("rope.scale_linear", 1.0)) or 1.0)
    if scaling == "none":
        scale = 1.0
    elif scaling != "linear" and scale != 1.0:
        raise InputError(f"{f.path}: {arch}.rope.scaling.type {scaling!r} is not supported")
    base = _float(key("rope.freq_base", 10_000.0))
    if arch == "gemma2":
        pattern = tuple(
            AttentionType.LOCAL if i % 2 == 0 else AttentionType.GLOBAL for i in range(n)
        )
        local_base = _float(key("rope.freq_base_swa", base))
        caps = (
            _float(key("attn_logit_softcapping", _GEMMA2_SOFT_CAPS[0])),
            _float(key("final_logit_softcapping", _GEMMA2_SOFT_CAPS[1])),
        )
        window = int(key("attention.sliding_window", 4096))
    else:
        every = _GEMMA3_GLOBAL_EVERY
        pattern = tuple(
            AttentionType.LOCAL if i % every < every - 1 else AttentionType.GLOBAL for i in range(n)
        )
        local_base = _float(key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE))
        caps = (None, None)
        window = int(key("attention.sliding_window"))
    scalar = d // heads if n == _LAYERS_27B[arch] else head_dim
    return GemmaConfig(
        family=arch,
        vocab_size=f.shape("token_embd.weight")[0],
        num_layers=n,
        embed_dim=d,
        hidden_dim=int(key("feed_forward_length")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=float(scalar),
        attention_pattern=pattern,
        sliding_window=window,
        rope_base_global=base,
        rope_base_local=local_base,
        rope_scale_global=scale,
        attn_logits_soft_cap=caps[0],
        final_logit_soft_cap=caps[1],
        use_qk_norm=arch == "gemma3",
        # llama.cpp's Gemma 2 has no output tensor (an output.weight is then an unknown tensor).
        tie_embeddings=arch == "gemma2" or "output.weight" not in f.tensors,
        rms_norm_eps=_float(key("attention.layer_norm_rms_epsilon")),
    )


# ---- tensors -------------------------------------------------------------------------------------


def check_tensors(f: GGUFFile, rules: list[gemma.Rule], our_shapes: dict[str, tuple]) -> None:
    """Names, types and shapes of all tensors against the rule table, in GGUF's terms."""
    for name in f.tensors:
        if f.type_name(name) not in TENSOR_TYPES:
            raise InputError(
                f"{f.path}: tensor {name!r} has type {f.type_name(name)}, which import-gguf does "
                f"not read (supported: {', '.join(TENSOR_TYPES)})"
            )
    wanted = {gguf_name(r.hf): r for r in rules}
    unknown = sorted(set(f.tensors) - set(wanted))
    if unknown:
        raise CheckpointError(
            f"{f.path}: unknown tensor {unknown[0]!r} (shape {f.shape(unknown[0])}; "
            f"{len(unknown)} unknown in all): not part of the {f.metadata['general.architecture']}"
            " architecture its metadata describes"
        )
    for name, r in wanted.items():
        if name not in f.tensors:
            raise CheckpointError(f"{f.path}: tensor {name!r} (for our {r.ours!r}) is missing")
        want = gemma.hf_shape(r.kind, tuple(our_shapes[r.ours]))
        if f.shape(name) != want:
            raise CheckpointError(
                f"{f.path}: tensor {name!r} has shape {f.shape(name)}, the metadata implies "
                f"{want} (our parameter {r.ours!r})"
            )


def dequantize(f: GGUFFile, name: str) -> np.ndarray:
    """Tensor `name` as float32 in row-major (HF) layout, norm weights without llama.cpp's +1."""
    t = f.tensors[name]
    w = np.array(_gguf_module().dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(f.shape(name))
    if name.endswith("norm.weight"):
        w -= 1.0
    return w


def read_gguf(path: str) -> tuple[str, dict, Any, bytes]:
    """(our model_type, config dict, params, tokenizer.model bytes) of a GGUF file, checked."""
    f = read_file(path)
    cfg = config_from_gguf(f)
    shapes = abstract_shapes(lambda: DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    rules = gemma.decoder_only_rules(cfg)
    check_tensors(f, rules, shapes)
    vocab = gguf_tokenizer.vocab_size(f.metadata, path)
    if vocab != cfg.vocab_size:
        raise InputError(
            f"{path}: the tokenizer has {vocab} tokens (tokenizer.ggml.tokens) but the model's "
            f"embedding 'token_embd.weight' has {cfg.vocab_size} rows"
        )
    tokenizer = gguf_tokenizer.sentencepiece_model(f.metadata, path)
    tensors = {r.hf: dequantize(f, gguf_name(r.hf)) for r in rules}
    params = gemma.import_tensors(rules, tensors, shapes, path)
    return DECODER_ONLY, cfg.to_dict(), params, tokenizer


def import_gguf(path: str, output: str, *, overwrite: bool = False) -> str:
    """Converts a GGUF file into a params checkpoint at `output` with `tokenizer.model` inside;
    returns what was written, for the command's report line."""
    outputs.check_not_input(output, path)
    params_io.check_writable(output, overwrite)
    model_type, config, params, tokenizer = read_gguf(path)
    params_io.save(
        output,
        params,
        model_type,
        config,
        overwrite=overwrite,
        extra_files={gguf_tokenizer.TOKENIZER_MODEL: tokenizer},
    )
    return f"{model_type} ({config['family']}) checkpoint and {gguf_tokenizer.TOKENIZER_MODEL}"
