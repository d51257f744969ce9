"""HF T5Gemma 2 import / export: logits parity with transformers in both directions, the round
trip, the text-only import of a checkpoint with a vision tower, bad input, adapted models."""

import json
import logging
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
from encdec_adapt.convert import t5gemma2
from encdec_adapt.models.warm_start import encdec_shapes
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.storage import params_io

VOCAB = 96
WINDOW = 4  # even: T5Gemma 2's split encoder window is asymmetric (2 keys behind, 2 ahead)
# Encoder rows longer than the window, one right-padded and one left-padded.
ENC_LENGTHS = [11, 6, 3]
DEC_LEN = 7


def text_config(layer_types: list[str], heads: int, kv_heads: int, head_dim: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=12,
        sliding_window=WINDOW,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        # transformers' T5Gemma 2 attention never applies this cap: the import must not either.
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    )


VISION = dict(
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=1,
    image_size=16,
    patch_size=4,
)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random T5Gemma 2 with a (tiny) vision tower; the decoder has its own head layout."""
    path = str(tmp_path_factory.mktemp("t5gemma2"))
    local, full = "sliding_attention", "full_attention"
    cfg = transformers.T5Gemma2Config(
        encoder=dict(
            text_config=text_config([local, full, local], 4, 2, 8),
            vision_config=VISION,
            mm_tokens_per_image=4,
        ),
        decoder=text_config([local, full], 2, 1, 16),
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.T5Gemma2ForConditionalGeneration(cfg)
    hf_fixtures.randomize_(model, seed=0)
    model.save_pretrained(path)
    return path, model


def batch(vocab: int = VOCAB):
    rng = np.random.default_rng(0)
    t = max(ENC_LENGTHS)
    enc = rng.integers(3, vocab, size=(len(ENC_LENGTHS), t))
    mask = (np.arange(t)[None, :] < np.asarray(ENC_LENGTHS)[:, None]).astype(np.int64)
    mask[1] = mask[1][::-1]  # row 1 left-padded
    dec = rng.integers(3, vocab, size=(len(ENC_LENGTHS), DEC_LEN))
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
    assert model_type == t5gemma2.ENCODER_DECODER
    cfg = EncoderDecoderConfig.from_dict(config)
    # An abstract model filled from the checkpoint: an eager init compiles every shape.
    model = nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(1)))
    params_io.load_into(model, ckpt)
    return model


def load_hf(path: str):
    return transformers.T5Gemma2ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def test_import_logits_parity(hf_model, tmp_path, caplog):
    hf_dir, torch_model = hf_model
    ckpt = str(tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING):
        assert main.main(["import-hf", "--input", hf_dir, "--output", ckpt]) == 0
    # The vision tower and projector are dropped, with one warning that counts them.
    vision = [k for k in torch_model.state_dict() if ".vision_tower." in k or ".multi_modal_" in k]
    assert len(vision) > 10
    assert f"dropped {len(vision)} vision tensors" in caplog.text
    model = load_ours(ckpt)
    cfg = model.config
    assert cfg.merged_attention and cfg.tie_encoder_decoder_embeddings
    assert (cfg.encoder_window, cfg.encoder.num_layers, cfg.decoder.num_heads) == ("split", 3, 2)
    assert cfg.encoder.attn_logits_soft_cap is None
    enc, mask, dec = batch()
    theirs = hf_logits(torch_model, enc, mask, dec)
    ours = our_logits(model, enc, dec)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1.0  # not vacuous: the capped logits spread over several units
    # Step-by-step decoding from the imported model reproduces HF's teacher-forced logits too.
    cross = nnx.jit(lambda m, e: m.cross_inputs(m.encode(e)))(model, jnp.asarray(enc))
    cache = model.init_cache(len(ENC_LENGTHS), DEC_LEN)
    step = nnx.jit(lambda m, t, c, k: m.decode(t, c, cache=k))
    for t in range(DEC_LEN):
        logits, cache = step(model, jnp.asarray(dec[:, t : t + 1]), cross, cache)
        np.testing.assert_allclose(logits[:, 0], theirs[:, t], atol=1e-4, rtol=0)


def our_config(encoder_window: str = "split") -> EncoderDecoderConfig:
    """A tiny T5Gemma 2 of our own: Gemma 3 stacks (QK-norm, linear RoPE scaling on global
    layers), local and global layers, a decoder with another head layout."""
    enc = GemmaConfig(
        family="gemma3",
        vocab_size=VOCAB,
        num_layers=3,
        embed_dim=32,
        hidden_dim=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        query_pre_attn_scalar=12.0,
        attention_pattern=("local", "global", "local"),
        sliding_window=WINDOW,
        rope_base_global=1_000_000.0,
        rope_base_local=10_000.0,
        rope_scale_global=2.0,
        attn_logits_soft_cap=None,
        final_logit_soft_cap=3.0,
        use_qk_norm=True,
    )
    dec = enc.replace(
        num_layers=2,
        attention_pattern=("local", "global"),
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
    )
    return EncoderDecoderConfig(
        encoder=enc,
        decoder=dec,
        tie_encoder_decoder_embeddings=True,
        merged_attention=True,
        encoder_window=encoder_window,
    )


def random_params(cfg: EncoderDecoderConfig, seed: int = 0) -> dict:
    """Random normal params (std 0.2, norm scales included) in the layout of `cfg`, drawn with
    numpy: an eager init of the model would compile every parameter shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32), encdec_shapes(cfg)
    )


EOI = 90  # an in-vocabulary end-of-image id for the tests (transformers' default is 256000)


@pytest.fixture(scope="module")
def our_export(tmp_path_factory):
    """Our random tiny T5Gemma 2 as a params checkpoint and its export-hf directory."""
    root = tmp_path_factory.mktemp("ours")
    ckpt, out = str(root / "ckpt"), str(root / "hf")
    cfg = our_config()
    params_io.save(ckpt, random_params(cfg), t5gemma2.ENCODER_DECODER, cfg.to_dict())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(t5gemma2, "EOI_TOKEN_INDEX", EOI)
        assert main.main(["export-hf", "--input", ckpt, "--output", out]) == 0
    return ckpt, out


def test_export_loads_in_transformers_with_same_logits(our_export):
    ckpt, out = our_export
    enc, mask, dec = batch()
    # The end-of-image id, which transformers embeds with `eoi_embedding`, in both inputs.
    enc[0, 3], dec[2, 4] = EOI, EOI
    reloaded = load_hf(out)
    assert reloaded.config.encoder.eoi_token_index == EOI
    theirs, ours = hf_logits(reloaded, enc, mask, dec), our_logits(load_ours(ckpt), enc, dec)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1.0


def test_round_trip_is_exact(our_export, tmp_path):
    ckpt, out = our_export
    back = str(tmp_path / "back")
    assert main.main(["import-hf", "--input", out, "--output", back]) == 0
    assert params_io.read_model_json(back) == params_io.read_model_json(ckpt)
    want, got = params_io.flatten(params_io.load(ckpt)), params_io.flatten(params_io.load(back))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(w), err_msg=name)


def test_in_memory_tensor_names_import_too(hf_model, tmp_path):
    """transformers names the encoder's text stack `model.encoder.text_model.*` in memory and
    saves it without `text_model.`; a file in the in-memory form imports the same."""
    hf_dir, _ = hf_model
    text_stack = ("model.encoder.embed_tokens", "model.encoder.layers", "model.encoder.norm")

    def in_memory_names(tensors):
        for k in [k for k in tensors if k.startswith(text_stack)]:
            tensors[k.replace("model.encoder.", "model.encoder.text_model.", 1)] = tensors.pop(k)
        assert "model.encoder.text_model.layers.0.self_attn.q_proj.weight" in tensors

    alt = copy_hf_dir(hf_dir, str(tmp_path / "alt"), edit_tensors=in_memory_names)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main.main(["import-hf", "--input", hf_dir, "--output", a]) == 0
    assert main.main(["import-hf", "--input", alt, "--output", b]) == 0
    want, got = params_io.flatten(params_io.load(a)), params_io.flatten(params_io.load(b))
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(w), err_msg=name)


def copy_hf_dir(src: str, dst: str, edit_tensors=None, edit_config=None) -> str:
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if edit_config:
        edit_config(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_wrong_shape_names_tensor_and_shapes(hf_model, tmp_path, capsys):
    hf_dir, _ = hf_model
    name = "model.decoder.layers.1.self_attn.k_proj.weight"  # [1 kv head * 16, 32]

    def truncate(tensors):
        tensors[name] = tensors[name][:, :24].copy()

    bad = copy_hf_dir(hf_dir, str(tmp_path / "bad"), edit_tensors=truncate)
    out = str(tmp_path / "o")
    assert main.main(["import-hf", "--input", bad, "--output", out]) == 2
    err = capsys.readouterr().err
    assert name in err and "(16, 24)" in err and "(16, 32)" in err
    assert not os.path.exists(out)


def test_in_vocabulary_end_of_image_embedding_is_reported(hf_model, tmp_path, caplog):
    """An end-of-image id inside the vocabulary whose `eoi_embedding` differs from its scaled
    row: the text import embeds it as the row, and says so."""
    hf_dir, _ = hf_model

    def eoi_in_vocab(config):
        config["encoder"]["eoi_token_index"] = config["eoi_token_index"] = EOI

    alt = copy_hf_dir(hf_dir, str(tmp_path / "eoi"), edit_config=eoi_in_vocab)
    with caplog.at_level(logging.WARNING):
        assert main.main(["import-hf", "--input", alt, "--output", str(tmp_path / "o")]) == 0
    assert f"end-of-image embedding of token {EOI}" in caplog.text


def test_untied_embeddings_are_refused(hf_model, tmp_path, capsys):
    hf_dir, _ = hf_model

    def untie(config):
        config["tie_word_embeddings"] = False

    bad = copy_hf_dir(hf_dir, str(tmp_path / "untied"), edit_config=untie)
    out = str(tmp_path / "o")
    assert main.main(["import-hf", "--input", bad, "--output", out]) == 2
    assert "tie_word_embeddings=false" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_export_refuses_what_transformers_would_compute_differently(tmp_path, capsys):
    cfg = our_config()
    cfg = cfg.replace(decoder=cfg.decoder.replace(attn_logits_soft_cap=50.0))
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    params_io.save(ckpt, random_params(cfg), t5gemma2.ENCODER_DECODER, cfg.to_dict())
    assert main.main(["export-hf", "--input", ckpt, "--output", out]) == 2
    err = capsys.readouterr().err
    assert t5gemma2.HF_ARCHITECTURE in err and "soft-cap" in err
    assert not os.path.exists(os.path.join(out, "config.json"))


def gin_preset(path: str, name: str, gemma: dict, **switches) -> str:
    """A models/-style preset file: an EncoderDecoderConfig of two copies of `gemma`."""
    lines = ["import encdec_adapt.nn"]
    lines += [f"{name}/GemmaConfig.{k} = {v!r}" for k, v in gemma.items()]
    lines += [
        f"{name}/EncoderDecoderConfig.{s} = @{name}/GemmaConfig()" for s in ("encoder", "decoder")
    ]
    lines += [f"{name}/EncoderDecoderConfig.{k} = {v!r}" for k, v in switches.items()]
    lines.append(f"MODEL_CONFIG = @{name}/EncoderDecoderConfig()")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def gemma3_lm(tmp_path_factory):
    """A random tiny HF Gemma 3 causal LM imported as a decoder-only params checkpoint."""
    root = tmp_path_factory.mktemp("gemma3")
    hf_fixtures.save_gemma(str(root / "hf"), "gemma3", seed=1)
    lm = str(root / "lm")
    assert main.main(["import-hf", "--input", str(root / "hf"), "--output", lm]) == 0
    return lm


@pytest.mark.parametrize("window", ["split", "inclusive"])
def test_adapted_gemma3_is_served_by_transformers(gemma3_lm, tmp_path, window):
    """`adapt` a tiny Gemma 3 (imported from HF) with the T5Gemma 2 switches, export it, and run
    it in transformers. An inclusive encoder window W is exported as the split window 2W + 1."""
    lm = gemma3_lm
    _, gemma = params_io.read_model_json(lm)
    preset = gin_preset(
        str(tmp_path / "t5g2_tiny.gin"),
        "t5g2_tiny",
        gemma,
        tie_encoder_decoder_embeddings=True,
        merged_attention=True,
        encoder_window=window,
    )
    adapted, out = str(tmp_path / "adapted"), str(tmp_path / "hf")
    argv = ["adapt", "--preset", preset, "--encoder", lm, "--output", adapted]
    assert main.main(argv) == 0
    assert main.main(["export-hf", "--input", adapted, "--output", out]) == 0
    hf = load_hf(out)
    want = gemma["sliding_window"] if window == "split" else 2 * gemma["sliding_window"] + 1
    assert hf.config.encoder.text_config.sliding_window == want
    enc, mask, dec = batch(vocab=gemma["vocab_size"])
    theirs, ours = hf_logits(hf, enc, mask, dec), our_logits(load_ours(adapted), enc, dec)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.ptp(theirs) > 1.0
