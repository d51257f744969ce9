"""Decoding an EncoderDecoder: cached steps equal full recompute, beam search vs greedy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt import decoding
from encdec_adapt.config import EncoderDecoderConfig, load_preset
from encdec_adapt.encdec import EncoderDecoder

TINY = load_preset("gemma_tiny").replace(num_layers=2, vocab_size=64, sliding_window=3)
MAX_LEN = 8


@pytest.fixture(scope="module")
def model():
    return EncoderDecoder(EncoderDecoderConfig(encoder=TINY, decoder=TINY), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 64, size=(3, 9))
    tokens[1, 4:] = 0  # padding
    return jnp.asarray(tokens, jnp.int32)


def generate(model, tokens, cfg):
    step_fn, init_logits, state = decoding.encoder_decoder_start(model, tokens, cfg.max_decode_len)
    return decoding.decode(step_fn, init_logits, state, cfg)


run = nnx.jit(generate, static_argnames="cfg")


def test_cached_greedy_equals_full_recompute(model, inputs):
    cfg = decoding.DecodeConfig(max_decode_len=MAX_LEN, eos_id=-1)
    out = np.asarray(run(model, inputs, cfg).tokens)
    seq = np.zeros((3, 1), np.int32)  # decoder start id 0
    for _ in range(MAX_LEN):  # no cache: the whole decoder prefix is run again every step
        logits = model(inputs, jnp.asarray(seq))
        seq = np.concatenate([seq, np.asarray(jnp.argmax(logits[:, -1], -1))[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq[:, 1:])


def test_beam_search(model, inputs):
    greedy = run(model, inputs, decoding.DecodeConfig(max_decode_len=MAX_LEN))
    beam = lambda k: decoding.DecodeConfig(
        method="beam", beam_size=k, length_penalty=0.0, max_decode_len=MAX_LEN
    )
    one = run(model, inputs, beam(1))
    np.testing.assert_array_equal(one.tokens[:, 0], greedy.tokens)
    four = run(model, inputs, beam(4))
    assert np.all(np.asarray(four.scores[:, 0]) >= np.asarray(greedy.scores) - 1e-5)
