"""HF Gemma 2 / Gemma 3 import and export: parity with transformers, round trips, bad input."""

import json
import os

import hf_fixtures
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from encdec_adapt.cli import main
from encdec_adapt.convert import gemma, load_hf_decoder
from encdec_adapt.nn.config import GemmaConfig
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import params_io

# Right padding; the longest rows are longer than the sliding window (4).
LENGTHS = [13, 7, 3]


def our_logits(model: DecoderOnly, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits, _ = model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask))
    return np.asarray(logits)


def assert_close_on_tokens(ours, theirs, mask, atol=1e-4):
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=atol, rtol=0)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def hf_model(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model = hf_fixtures.save_gemma(path, request.param)
    return request.param, path, model


def test_import_cli_logits_parity(hf_model, tmp_path):
    family, hf_dir, torch_model = hf_model
    out = str(tmp_path / "ckpt")
    assert main.main(["import-hf", "--input", hf_dir, "--output", out]) == 0
    model_type, config = params_io.read_model_json(out)
    cfg = GemmaConfig.from_dict(config)
    assert (model_type, cfg.family) == ("decoder_only", family)
    model = DecoderOnly(cfg, rngs=nnx.Rngs(1))
    params_io.load_into(model, out)

    tokens, mask = hf_fixtures.padded_batch(cfg.vocab_size, LENGTHS)
    theirs = hf_fixtures.hf_logits(torch_model, tokens, mask)
    ours = our_logits(model, tokens, mask)
    assert_close_on_tokens(ours, theirs, mask)
    # Not vacuous: the soft-capped logits spread over several units.
    assert np.ptp(theirs[mask.astype(bool)]) > 1.0


def test_round_trip_import_export(hf_model, tmp_path):
    _, hf_dir, torch_model = hf_model
    ckpt, exported = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert main.main(["import-hf", "--input", hf_dir, "--output", ckpt]) == 0
    assert main.main(["export-hf", "--input", ckpt, "--output", exported]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(torch_model)
    tokens, mask = hf_fixtures.padded_batch(torch_model.config.vocab_size, LENGTHS, seed=1)
    np.testing.assert_array_equal(
        hf_fixtures.hf_logits(reloaded, tokens, mask),
        hf_fixtures.hf_logits(torch_model, tokens, mask),
    )


def test_sharded_safetensors_index(tmp_path):
    hf_dir = str(tmp_path / "hf")
    torch_model = hf_fixtures.save_gemma(hf_dir, "gemma2", seed=3, max_shard_size="20KB")
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    model = load_hf_decoder(hf_dir)
    tokens, mask = hf_fixtures.padded_batch(96, LENGTHS, seed=2)
    assert_close_on_tokens(
        our_logits(model, tokens, mask), hf_fixtures.hf_logits(torch_model, tokens, mask), mask
    )


def test_bfloat16_checkpoint(tmp_path):
    """Released checkpoints are bf16: they import without a float32 copy and restore exactly."""
    hf_dir, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    hf_fixtures.save_gemma(hf_dir, "gemma3", seed=6).to(torch.bfloat16).save_pretrained(hf_dir)
    assert main.main(["import-hf", "--input", hf_dir, "--output", ckpt]) == 0
    stored = params_io.load(ckpt)
    assert stored["embedder"]["embedding"].dtype == jnp.bfloat16
    model = load_hf_decoder(hf_dir)
    assert model.embedder.embedding[...].dtype == jnp.float32
    # A fresh float32 load of the same files (the bf16 torch model's rotary buffers are rounded).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens, mask = hf_fixtures.padded_batch(96, LENGTHS, seed=8)
    assert_close_on_tokens(
        our_logits(model, tokens, mask), hf_fixtures.hf_logits(reference, tokens, mask), mask
    )


def gemma_library_tree(torch_model, extra_rows: int) -> dict:
    """The gemma-library layout, built here from the HF tensors by its own reshapes, with extra
    embedding rows as the Kaggle Gemma 2 checkpoints carry (256128 vs 256000)."""
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    c = torch_model.config
    n, k, h, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    extra = np.random.default_rng(0).normal(size=(extra_rows, d)).astype(np.float32)

    def heads(w, m):  # [m * h, d] -> [m, d, h]
        return w.reshape(m, h, d).transpose(0, 2, 1)

    tree = {
        "embedder": {"input_embedding": np.concatenate([sd["model.embed_tokens.weight"], extra])},
        "final_norm": {"scale": sd["model.norm.weight"]},
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        k_w, v_w = sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]
        tree[f"layer_{i}"] = {
            "attn": {
                "q_einsum": {"w": heads(sd[p + "self_attn.q_proj.weight"], n)},
                "kv_einsum": {"w": np.stack([heads(k_w, k), heads(v_w, k)])},
                "attn_vec_einsum": {"w": sd[p + "self_attn.o_proj.weight"].T.reshape(n, h, d)},
            },
            "mlp": {  # [2, F, D]: the transposed gating layout
                "gating_einsum": {
                    "w": np.stack([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
                },
                "linear": {"w": sd[p + "mlp.down_proj.weight"].T},
            },
            "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
            "post_attention_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
            "pre_ffw_norm": {"scale": sd[p + "pre_feedforward_layernorm.weight"]},
            "post_ffw_norm": {"scale": sd[p + "post_feedforward_layernorm.weight"]},
        }
    return {"transformer": tree}


def test_gemma_library_tree_with_extra_vocab_rows(tmp_path):
    torch_model = hf_fixtures.save_gemma(str(tmp_path / "hf"), "gemma2", seed=4)
    tree = gemma_library_tree(torch_model, extra_rows=32)
    cfg = gemma.config_from_hf(torch_model.config.to_dict(), "test")
    with pytest.raises(params_io.CheckpointError, match=r"128 rows.*vocab_size=96"):
        gemma.from_gemma_library(tree, cfg)
    params = gemma.from_gemma_library(tree, cfg, vocab_rows="slice")
    model = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    params_io.assign(model, params, "gemma tree")
    tokens, mask = hf_fixtures.padded_batch(96, LENGTHS, seed=5)
    assert_close_on_tokens(
        our_logits(model, tokens, mask), hf_fixtures.hf_logits(torch_model, tokens, mask), mask
    )


def test_import_gemma_cli_reads_kaggle_orbax_layout(tmp_path, capsys):
    """Kaggle checkpoints store flat "transformer/layer_0/..." keys in an Orbax PyTree."""
    torch_model = hf_fixtures.save_gemma(str(tmp_path / "hf"), "gemma2", seed=9)
    tree = gemma_library_tree(torch_model, extra_rows=32)["transformer"]
    flat = {}
    for top, sub in tree.items():
        for name, leaf in params_io.flatten(sub).items():
            *mods, param_name = f"transformer/{top}/{name}".split("/")
            flat.setdefault("/".join(mods), {})[param_name] = leaf
    kaggle = str(tmp_path / "kaggle")
    ocp.PyTreeCheckpointer().save(kaggle, flat)
    cfg = gemma.config_from_hf(torch_model.config.to_dict(), "test")
    preset = tmp_path / "tiny.gin"
    lines = ["import encdec_adapt.nn.config"]
    for key, value in cfg.to_dict().items():
        value = tuple(value) if isinstance(value, list) else value
        lines.append(f"tiny/GemmaConfig.{key} = {value!r}")
    preset.write_text("\n".join([*lines, "MODEL_CONFIG = @tiny/GemmaConfig()", ""]))

    out = str(tmp_path / "ckpt")
    args = ["import-gemma", "--input", kaggle, "--output", out, "--preset", str(preset)]
    assert main.main(args) == 2  # 128 embedding rows vs vocab_size 96, and nothing written
    assert "vocab_rows='exact'" in capsys.readouterr().err and not os.path.exists(out)
    assert main.main([*args, "--vocab_rows", "slice"]) == 0
    model = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    params_io.load_into(model, out)
    tokens, mask = hf_fixtures.padded_batch(96, LENGTHS, seed=10)
    assert_close_on_tokens(
        our_logits(model, tokens, mask), hf_fixtures.hf_logits(torch_model, tokens, mask), mask
    )


# ---- bad input: one clear error, nothing written ----


@pytest.fixture
def hf_dir(tmp_path):
    path = str(tmp_path / "hf")
    hf_fixtures.save_gemma(path, "gemma2", seed=7)
    return path


def run_import(hf_dir, out, capsys):
    code = main.main(["import-hf", "--input", hf_dir, "--output", out])
    err = capsys.readouterr().err
    assert code == 2  # bad input
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
    return err


def _edit_tensors(hf_dir, edit):
    file = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_file(tmp_path, capsys):
    err = run_import(str(tmp_path / "nowhere"), str(tmp_path / "out"), capsys)
    assert "nowhere/config.json does not exist" in err


def test_missing_weights(hf_dir, tmp_path, capsys):
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    err = run_import(hf_dir, str(tmp_path / "out"), capsys)
    assert "neither model.safetensors nor model.safetensors.index.json" in err


def test_unsupported_architecture(hf_dir, tmp_path, capsys):
    cfg_file = os.path.join(hf_dir, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    err = run_import(hf_dir, str(tmp_path / "out"), capsys)
    assert "model_type 'llama'" in err and "LlamaForCausalLM" in err and "gemma2" in err


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path, capsys):
    name = "model.layers.2.mlp.up_proj.weight"
    _edit_tensors(hf_dir, lambda t: t.__setitem__(name, np.zeros((40, 32), np.float32)))
    err = run_import(hf_dir, str(tmp_path / "out"), capsys)
    assert name in err and "(40, 32)" in err and "(48, 32)" in err


def test_unknown_tensor(hf_dir, tmp_path, capsys):
    _edit_tensors(hf_dir, lambda t: t.__setitem__("model.extra.bias", np.zeros(3, np.float32)))
    err = run_import(hf_dir, str(tmp_path / "out"), capsys)
    assert "unknown tensor 'model.extra.bias'" in err


def test_missing_tensor(hf_dir, tmp_path, capsys):
    _edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    err = run_import(hf_dir, str(tmp_path / "out"), capsys)
    assert "'model.layers.1.self_attn.k_proj.weight'" in err and "missing" in err


def test_existing_output_is_not_overwritten(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main.main(["import-hf", "--input", hf_dir, "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
