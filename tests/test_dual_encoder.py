"""Dual-encoder towers, warm start, encode API and the MTEB adapter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.evaluation.encode import MTEBEncoder, TextEncoder
from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.dual_encoder import DualEncoder, DualEncoderConfig, warm_start_dual_encoder
from encdec_adapt.nn.transformer import DecoderOnly
from encdec_adapt.storage import params_io

TOWER = load_preset("gemma_tiny").replace(num_layers=2, vocab_size=300)


class ByteVocab:
    """Bytes + 3 as ids: a real, deterministic tokenizer with no model file."""

    def encode(self, text):
        return [b + 3 for b in text.encode()]


def make(**kw):
    cfg = DualEncoderConfig(tower=TOWER, **kw)
    return cfg, DualEncoder(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sharing", ["shared", "separate", "separate_shared_projection"])
@pytest.mark.parametrize("pooling", ["mean", "first", "last", "attention", "lexical", "terms"])
def test_towers_embed_unit_vectors(sharing, pooling):
    _, model = make(sharing=sharing, pooling=pooling, projection_dims=(32, 16))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, size=(3, 9)))
    tokens = tokens.at[1, 5:].set(0)
    q = model(tokens, side="query")
    d = model(tokens, side="document")
    assert q.shape == (3, 16) and q.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, rtol=1e-5)
    params = params_io.flatten(params_io.model_params(model))
    assert ("doc_tower/stack/final_norm/scale" in params) == (sharing != "shared")
    assert ("doc_projection/layers/0/kernel" in params) == (sharing == "separate")
    assert ("pooler/query" in params) == (pooling == "attention")
    assert ("pooler/kernel" in params) == (pooling == "terms")
    if sharing == "shared":
        np.testing.assert_array_equal(q, d)
    elif pooling == "terms" and sharing == "separate_shared_projection":
        # An untrained term pooler ignores the encoder (every token weighs 1), and the
        # projection is shared: the towers agree until training moves the kernel.
        np.testing.assert_allclose(q, d, atol=1e-6)
    else:
        assert not np.allclose(q, d)


def test_lexical_pooling_matches_numpy_reference():
    cfg, model = make(pooling="lexical")
    assert cfg.embedding_dim == TOWER.vocab_size
    tokens = jnp.asarray([[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]])
    got = model(tokens, normalize=False)
    hidden = np.asarray(model.query_tower(tokens).hidden, np.float64)
    table = np.asarray(model.query_tower.embedder.embedding[...], np.float64)
    want = np.zeros((2, TOWER.vocab_size))
    for b in range(2):
        n = int((tokens[b] != 0).sum())
        want[b] = np.log1p(np.maximum(hidden[b, :n] @ table.T, 0)).max(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert (got >= 0).all() and (got > 0).any()


def test_term_pooling_weights_only_the_texts_own_tokens():
    cfg, model = make(pooling="terms")
    assert cfg.embedding_dim == TOWER.vocab_size
    tokens = jnp.asarray([[5, 6, 5, 0, 0], [7, 0, 0, 0, 0]])
    # Untrained (kernel 0, bias 1): a binary bag of words.
    want = np.zeros((2, TOWER.vocab_size))
    want[0, [5, 6]] = 1.0
    want[1, 7] = 1.0
    # One compile instead of an eager call's per-op compiles (seconds each).
    embed = nnx.jit(lambda m, t: m(t, normalize=False))
    np.testing.assert_array_equal(embed(model, tokens), want)
    # With a kernel: relu(h . u + b), the larger of a repeated id's weights, nothing elsewhere.
    model.pooler.kernel[...] = jnp.asarray(np.random.default_rng(1).normal(size=TOWER.embed_dim))
    got = np.asarray(embed(model, tokens))
    hidden = np.asarray(nnx.jit(lambda m, t: m.query_tower(t).hidden)(model, tokens), np.float64)
    w = np.maximum(hidden @ np.asarray(model.pooler.kernel[...]) + 1.0, 0)
    np.testing.assert_allclose(got[0, 5], max(w[0, 0], w[0, 2]), rtol=1e-5)
    np.testing.assert_allclose(got[0, 6], w[0, 1], rtol=1e-5)
    np.testing.assert_allclose(got[1, 7], w[1, 0], rtol=1e-5)
    assert np.count_nonzero(got[0]) <= 2 and np.count_nonzero(got[1]) <= 1
    grads = nnx.jit(nnx.grad(lambda m: m(tokens, normalize=False).sum()))(model)
    assert np.abs(np.asarray(grads.pooler.kernel[...])).sum() > 0


@pytest.mark.parametrize("pooling", ["mean", "lexical", "terms"])
def test_padding_does_not_leak(pooling):
    _, model = make(pooling=pooling, projection_dims=(16,))
    tokens = jnp.asarray([[5, 6, 7, 0, 0, 0]])
    more_padding = jnp.asarray([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0]])
    junk_in_padding = jnp.asarray([[5, 6, 7, 9, 9, 9]])
    segs = jnp.asarray([[1, 1, 1, 0, 0, 0]])
    a = model(tokens)
    np.testing.assert_allclose(model(more_padding), a, atol=1e-6)
    np.testing.assert_allclose(model(junk_in_padding, segment_ids=segs), a, atol=1e-6)


def test_warm_start_copies_decoder_into_every_tower():
    decoder = DecoderOnly(TOWER, rngs=nnx.Rngs(3))
    source = params_io.model_params(decoder)
    cfg = DualEncoderConfig(tower=TOWER, sharing="separate", projection_dims=(16,))
    params = warm_start_dual_encoder(cfg, source)
    for tower in ("query_tower", "doc_tower"):
        jax.tree.map(np.testing.assert_array_equal, params[tower], source)
    model = DualEncoder(cfg, rngs=nnx.Rngs(0))
    params_io.assign(model, params, "warm start")
    bad = params_io.model_params(DecoderOnly(TOWER.replace(embed_dim=32), rngs=nnx.Rngs(0)))
    with pytest.raises(params_io.CheckpointError, match=r"embedder/embedding.*\(300, 32\)"):
        warm_start_dual_encoder(cfg, bad)


def test_learned_temperature():
    _, model = make(learn_temperature=True, init_temperature=0.07)
    assert float(model.temperature()) == pytest.approx(0.07)
    _, fixed = make()
    assert fixed.temperature() is None


def test_bad_config():
    with pytest.raises(ValueError, match=r"pooling='cls' is not a pooling.*attention"):
        DualEncoderConfig(tower=TOWER, pooling="cls")
    with pytest.raises(ValueError, match=r"sharing='twin'"):
        DualEncoderConfig(tower=TOWER, sharing="twin")


@pytest.fixture(scope="module")
def encoder():
    _, model = make(projection_dims=(32,))
    return TextEncoder(model, ByteVocab(), max_length=24, batch_size=64)


def test_encode_same_text_in_batch_of_1_and_64(encoder):
    texts = [f"text number {i} " * (i % 4 + 1) for i in range(64)]
    batch = encoder.encode(texts)
    for i in (0, 17, 63):
        np.testing.assert_array_equal(encoder.encode([texts[i]]), batch[i : i + 1])
    # Across different batch sizes the compiled function differs: equal to float precision.
    np.testing.assert_allclose(encoder.encode([texts[5]], batch_size=1), batch[5:6], atol=1e-6)


def test_encode_empty_long_and_truncate_dim(encoder):
    encoder.stats.truncated = encoder.stats.empty = 0
    out = encoder.encode(["", "x" * 100, "short"], truncate_dim=8)
    assert out.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert encoder.stats.empty == 1 and encoder.stats.truncated == 1
    # A long text keeps its first max_length tokens and loses EOS, as the training pipeline
    # (append EOS, then cut) gives it to the towers; a short one ends in EOS.
    assert encoder.tokenize("x" * 100) == [ord("x") + 3] * 24
    assert encoder.tokenize("ab") == [ord("a") + 3, ord("b") + 3, 1]
    np.testing.assert_allclose(
        encoder.encode(["x" * 100]), encoder.encode(["x" * 200]), atol=1e-6
    )  # both cut to the same 23 tokens + EOS
    with pytest.raises(ValueError, match=r"truncate_dim=64 must be in \[1, 32\]"):
        encoder.encode(["a"], truncate_dim=64)
    with pytest.raises(TypeError, match="not one string"):
        encoder.encode("a string")


def test_prompts_change_embeddings_and_mteb_adapter(encoder):
    a = encoder.encode(["find the file"])
    b = encoder.encode(["find the file"], prompt="query: ")
    assert not np.allclose(a, b)
    mteb = MTEBEncoder(encoder, query_prompt="query: ", document_prompt="passage: ")
    np.testing.assert_array_equal(mteb.encode(["find the file"], prompt_type="query"), b)
    doc = mteb.encode(["find the file"], prompt_type="passage")
    np.testing.assert_array_equal(
        doc, encoder.encode(["find the file"], prompt="passage: ", side="document")
    )
    with pytest.raises(ValueError, match=r"unknown prompt_type 'instruction'"):
        mteb.encode(["x"], prompt_type="instruction")


def test_text_transform_applies_to_texts_not_prompts(encoder):
    from encdec_adapt.data.identifiers import text_transform

    split = TextEncoder(
        encoder.model,
        ByteVocab(),
        max_length=24,
        batch_size=64,
        text_transform=text_transform("split_identifiers_lower"),
    )
    raw = ["def readFile(self, file_name):", "HTTPResponse"]
    np.testing.assert_array_equal(
        split.encode(raw, prompt="Code: "),
        encoder.encode(["def read file(self, file name):", "http response"], prompt="Code: "),
    )
    assert split.tokenize("A_b", prompt="Q: ") == [b + 3 for b in b"Q: a b"] + [1]
    with pytest.raises(ValueError, match=r"unknown text transform 'lower'; known: \["):
        text_transform("lower")
