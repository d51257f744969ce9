"""HF T5Gemma import / export: logits parity with transformers, adapted models served by HF."""

import json
import os

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from encdec_adapt.cli import main
from encdec_adapt.convert import t5gemma
from encdec_adapt.models import warm_start as adapt
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import params_io

# Encoder rows longer than the sliding window (3), right and left padding, and an empty-ish row.
ENC_LENGTHS = [11, 6, 2]
DEC_LEN = 7


def module_config(hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12,
        sliding_window=3,
        attn_logit_softcapping=2.0,  # small caps so the tanh is far from linear
        final_logit_softcapping=3.0,
    )


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random unbalanced T5Gemma (encoder 40 wide, 3 layers; decoder 32 wide, 2 layers)."""
    path = str(tmp_path_factory.mktemp("t5gemma"))
    cfg = transformers.T5GemmaConfig(
        encoder=module_config(40, 3), decoder=module_config(32, 2), attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = hf_fixtures.randomize_(transformers.T5GemmaForConditionalGeneration(cfg), seed=0)
    model.save_pretrained(path)
    return path, model


def batch():
    rng = np.random.default_rng(0)
    t = max(ENC_LENGTHS)
    enc = rng.integers(3, 96, size=(len(ENC_LENGTHS), t))
    mask = (np.arange(t)[None, :] < np.asarray(ENC_LENGTHS)[:, None]).astype(np.int64)
    mask[1] = mask[1][::-1]  # row 1 left-padded
    dec = rng.integers(3, 96, size=(len(ENC_LENGTHS), DEC_LEN))
    return (enc * mask), mask, dec


def hf_logits(model, enc, mask, dec) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(enc),
            attention_mask=torch.from_numpy(mask),
            decoder_input_ids=torch.from_numpy(dec),
            decoder_attention_mask=torch.ones(dec.shape, dtype=torch.long),
        )
    return out.logits.float().numpy()


def our_logits(model, enc, dec) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, e, d: m(e, d))(model, jnp.asarray(enc), jnp.asarray(dec)))


def load_ours(ckpt: str) -> EncoderDecoder:
    model_type, config = params_io.read_model_json(ckpt)
    assert model_type == t5gemma.ENCODER_DECODER
    model = EncoderDecoder(EncoderDecoderConfig.from_dict(config), rngs=nnx.Rngs(1))
    params_io.load_into(model, ckpt)
    return model


def test_import_logits_parity(hf_model, tmp_path):
    hf_dir, torch_model = hf_model
    ckpt = str(tmp_path / "ckpt")
    assert main.main(["import-hf", "--input", hf_dir, "--output", ckpt]) == 0
    model = load_ours(ckpt)
    cfg = model.config
    assert (cfg.encoder.embed_dim, cfg.decoder.embed_dim, cfg.encoder.num_layers) == (40, 32, 3)
    enc, mask, dec = batch()
    theirs = hf_logits(torch_model, enc, mask, dec)
    ours = our_logits(model, enc, dec)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1.0  # not vacuous: the capped logits spread over several units
    # Step-by-step decoding from the imported model reproduces HF's teacher-forced logits too.
    cross = model.cross_inputs(model.encode(jnp.asarray(enc)))
    cache = model.init_cache(len(ENC_LENGTHS), DEC_LEN)
    step = nnx.jit(lambda m, t, c, k: m.decode(t, c, cache=k))
    for t in range(DEC_LEN):
        logits, cache = step(model, jnp.asarray(dec[:, t : t + 1]), cross, cache)
        np.testing.assert_allclose(logits[:, 0], theirs[:, t], atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    hf_dir, _ = hf_model
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert main.main(["import-hf", "--input", hf_dir, "--output", ckpt]) == 0
    assert main.main(["export-hf", "--input", ckpt, "--output", out]) == 0
    reloaded = transformers.T5GemmaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    enc, mask, dec = batch()
    np.testing.assert_allclose(
        hf_logits(reloaded, enc, mask, dec), our_logits(load_ours(ckpt), enc, dec), atol=1e-4
    )
    original, exported = (
        load_file(os.path.join(hf_dir, "model.safetensors")),
        load_file(os.path.join(out, "model.safetensors")),
    )
    assert set(exported) == set(original) - {"lm_head.out_proj.weight"}
    for name, w in exported.items():
        np.testing.assert_array_equal(w, original[name], err_msg=name)


def test_adapted_model_is_served_by_transformers(tmp_path):
    """Warm-start a tiny pair from a decoder-only model, export it, and run it in transformers."""
    tiny = GemmaConfig(
        vocab_size=96,
        num_layers=2,
        embed_dim=32,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12.0,
        sliding_window=3,
        attn_logits_soft_cap=2.0,
        final_logit_soft_cap=3.0,
    )
    src = params_io.model_params(DecoderOnly(tiny, rngs=nnx.Rngs(0)))
    src = jax.tree.map(lambda x: x + 0.1, src)  # non-zero norm scales
    cfg = EncoderDecoderConfig(encoder=tiny, decoder=tiny)
    params = adapt.warm_start(cfg, src)
    ckpt, out = str(tmp_path / "adapted"), str(tmp_path / "hf")
    params_io.save(ckpt, params, t5gemma.ENCODER_DECODER, cfg.to_dict())
    assert main.main(["export-hf", "--input", ckpt, "--output", out]) == 0
    hf = transformers.T5GemmaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    enc, mask, dec = batch()
    np.testing.assert_allclose(
        hf_logits(hf, enc, mask, dec), our_logits(load_ours(ckpt), enc, dec), atol=1e-4
    )


def test_t5gemma2_variant_has_no_t5gemma_export(tmp_path, capsys):
    tiny = GemmaConfig(vocab_size=96, num_layers=1, embed_dim=16, hidden_dim=32, num_heads=2,
                       num_kv_heads=1, head_dim=8, sliding_window=4)  # fmt: skip
    cfg = EncoderDecoderConfig(encoder=tiny, decoder=tiny, merged_attention=True)
    params = params_io.model_params(EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    ckpt = str(tmp_path / "ckpt")
    params_io.save(ckpt, params, t5gemma.ENCODER_DECODER, cfg.to_dict())
    assert main.main(["export-hf", "--input", ckpt, "--output", str(tmp_path / "hf")]) == 2
    assert "merged attention" in capsys.readouterr().err


def test_wrong_cross_attention_shape_names_tensor_and_shapes(hf_model, tmp_path, capsys):
    hf_dir, _ = hf_model
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    name = "model.decoder.layers.1.cross_attn.k_proj.weight"
    tensors[name] = tensors[name][:, :32].copy()  # as if K/V read the decoder width
    save_file(tensors, os.path.join(bad, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(config, f)
    assert main.main(["import-hf", "--input", bad, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert name in err and "(16, 32)" in err and "(16, 40)" in err
