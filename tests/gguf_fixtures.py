"""Tiny Gemma GGUF files, written with gguf.GGUFWriter the way llama.cpp's converter writes them.

Weights are random (non-uniform) in HF's layout; the tokenizer is a small SentencePiece BPE model
trained here on standard-library text with Gemma's settings (identity normalisation, byte
fallback, split digits, whitespace runs and newlines as user-defined pieces), then stored as
llama.cpp stores it: user-defined pieces with spaces instead of "▁", the unknown piece marked
control, user-defined and control scores -1000.
"""

from __future__ import annotations

import inspect
import io
import json
import textwrap

import gguf
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece

# Real text: prose, code (indentation runs), digits, unicode, tabs, whitespace runs (up to 31
# spaces, Gemma's longest whitespace piece), blank lines.
TEXTS = [
    inspect.getdoc(json),
    inspect.getsource(json.dumps),
    inspect.getsource(textwrap.dedent),
    "Prices rose 12.5% in 2024: 1,234,567 units at $89.99 each (see table 3-B).",
    "Ünïcödé — naïve café, 日本語のテキスト, Ελληνικά, emoji 😀🚀, ﬁ ligature, Ω≈ç√.",
    "col1\tcol2\t\tcol3\nx  y   z    w        end\n\n\nlast line" + " " * 31 + "!",
    "    def f(x):\n        return {k: v for k, v in x.items() if v}  # comment\n",
]

VOCAB_SIZE = 420
WHITESPACE_RUNS = ["\u2581" * k for k in range(2, 32)]  # as Gemma's vocabulary has
PAD, EOS, BOS, UNK = 0, 1, 2, 3


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> bytes:
    """A serialized SentencePiece BPE ModelProto with Gemma's layout of special ids."""
    lines = [line for t in TEXTS[:3] for line in t.splitlines() if line.strip()]
    lines += [line for line in inspect.getsource(textwrap).splitlines() if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.995,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=PAD,
        eos_id=EOS,
        bos_id=BOS,
        unk_id=UNK,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["\n", "\n\n", "\n\n\n", "\t", "\t\t", *WHITESPACE_RUNS, "<b>"],
        control_symbols=["<mask>", "<start_of_turn>"],
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def llama_cpp_tokenizer(model: bytes) -> dict:
    """tokens / scores / token_type / special ids as llama.cpp's converter writes them."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        token, score, kind = p.piece, p.score, p.type
        if kind == Piece.UNKNOWN:  # special in HF's tokenizer config -> control
            kind = Piece.CONTROL
        if kind == Piece.USER_DEFINED:
            token = token.replace("\u2581", " ")
        if kind in (Piece.CONTROL, Piece.USER_DEFINED):
            score = -1000.0
        tokens.append(token)
        scores.append(score)
        types.append(int(kind))
    return {"tokens": tokens, "scores": scores, "types": types}


def gemma3_dims(vocab_size: int = VOCAB_SIZE) -> dict:
    # head_dim 256 keeps transformers' default query_pre_attn_scalar (256) equal to llama.cpp's
    # rule (head_dim); heads * head_dim and hidden are multiples of 256 for the K-quants.
    return dict(
        arch="gemma3",
        vocab=vocab_size,
        layers=7,  # layers 0-4 local, 5 global, 6 local
        d=64,
        hidden=256,
        heads=2,
        kv_heads=1,
        head_dim=256,
        window=4,
    )


def gemma2_dims(vocab_size: int = VOCAB_SIZE) -> dict:
    return dict(
        arch="gemma2",
        vocab=vocab_size,
        layers=4,
        d=64,
        hidden=256,
        heads=4,
        kv_heads=2,
        head_dim=32,
        window=4,
    )


def random_weights(dims: dict, seed: int, tied: bool = True) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> float32 weight in HF layout, norms as HF has them (w, not 1 + w)."""
    rng = np.random.default_rng(seed)
    d, f, n, kv, h = dims["d"], dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"]

    def w(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"token_embd.weight": w(dims["vocab"], d), "output_norm.weight": w(d)}
    if not tied:
        out["output.weight"] = w(dims["vocab"], d)
    for i in range(dims["layers"]):
        b = f"blk.{i}"
        out |= {
            f"{b}.attn_q.weight": w(n * h, d),
            f"{b}.attn_k.weight": w(kv * h, d),
            f"{b}.attn_v.weight": w(kv * h, d),
            f"{b}.attn_output.weight": w(d, n * h, scale=0.05),
            f"{b}.ffn_gate.weight": w(f, d),
            f"{b}.ffn_up.weight": w(f, d),
            f"{b}.ffn_down.weight": w(d, f, scale=0.05),
            f"{b}.attn_norm.weight": w(d),
            f"{b}.post_attention_norm.weight": w(d),
            f"{b}.ffn_norm.weight": w(d),
            f"{b}.post_ffw_norm.weight": w(d),
        }
        if dims["arch"] == "gemma3":
            out[f"{b}.attn_q_norm.weight"] = w(h)
            out[f"{b}.attn_k_norm.weight"] = w(h)
    return out


def random_k_quant_blocks(rows: int, cols: int, qtype: str, seed: int) -> np.ndarray:
    """Random but finite Q4_K / Q6_K data (the gguf package cannot quantise K-quants): random
    bytes, with the float16 super-block scales set to small positive values."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin (f16) then 6-bit scales and 4-bit quants
        data[:, 0:4] = rng.uniform(1e-3, 4e-3, (len(data), 2)).astype(np.float16).view(np.uint8)
    elif qtype == "Q6_K":  # ql, qh, int8 scales, then d (f16)
        data[:, 208:210] = rng.uniform(2e-5, 8e-5, (len(data), 1)).astype(np.float16).view(np.uint8)
    else:
        raise ValueError(qtype)
    return data.reshape(rows, cols // block * size)


def write_gguf(
    path: str,
    dims: dict,
    weights: dict[str, np.ndarray],
    tokenizer: dict,
    types: dict[str, str] | None = None,
    *,
    arch: str | None = None,
    metadata: dict | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Writes a GGUF file; `types` maps tensor names to a tensor type (default F32; K-quants get
    random blocks instead of the weight). Norm weights are stored as 1 + w, as llama.cpp does.
    Returns the tensor type of every tensor."""
    arch = arch or dims["arch"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny gemma")
    writer.add_context_length(64)
    writer.add_block_count(dims["layers"])
    writer.add_embedding_length(dims["d"])
    writer.add_feed_forward_length(dims["hidden"])
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_key_length(dims["head_dim"])
    writer.add_value_length(dims["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(dims["window"])
    if dims["arch"] == "gemma3":
        writer.add_rope_freq_base(1_000_000.0)
    else:
        writer.add_rope_freq_base(10_000.0)
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    for key, value in (metadata or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_scores(tokenizer["scores"])
    writer.add_token_types(tokenizer["types"])
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    written = {}
    for i, (name, w) in enumerate(weights.items()):
        kind = (types or {}).get(name, "F32")
        if name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in ("Q4_K", "Q6_K"):
            writer.add_tensor(
                name, random_k_quant_blocks(*w.shape, kind, seed + i), raw_dtype=qtype
            )
        elif kind == "F32":
            writer.add_tensor(name, w)
        elif kind == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quantize(w, qtype), raw_dtype=qtype)
        written[name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
