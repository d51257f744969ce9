"""Decoding loops on a DecoderOnly model: parity with transformers' generate, cache vs recompute,
beam search vs greedy, sampling controls, fixed-shape compilation, bad options."""

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from encdec_adapt.convert import load_hf_decoder
from encdec_adapt.models import decoding

MAX_LEN = 10
PROMPT_LENGTHS = [5, 2, 7]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gemma2"))
    torch_model = hf_fixtures.save_gemma(path, "gemma2", seed=11)
    return torch_model, load_hf_decoder(path)


@pytest.fixture(scope="module")
def prompts():
    tokens, _ = hf_fixtures.padded_batch(96, PROMPT_LENGTHS, seed=3)
    return jnp.asarray(tokens), jnp.asarray(PROMPT_LENGTHS, jnp.int32)


def generate(model, prompts, lengths, cfg, rng=None):
    step_fn, init_logits, state = decoding.decoder_only_start(
        model, prompts, lengths, cfg.max_decode_len
    )
    return decoding.decode(step_fn, init_logits, state, cfg, rng)


run = nnx.jit(generate, static_argnames="cfg")


def greedy_cfg(**kw):
    return decoding.DecodeConfig(**({"method": "greedy", "max_decode_len": MAX_LEN} | kw))


def check_greedy_equals_transformers_generate(torch_model, model, tokens, lengths):
    out = run(model, tokens, lengths, greedy_cfg())
    for b, n in enumerate(PROMPT_LENGTHS):
        ids = torch.from_numpy(np.asarray(tokens[b : b + 1, :n], np.int64))
        gen = torch_model.generate(
            ids,
            max_new_tokens=MAX_LEN,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=1,
            pad_token_id=0,
        )
        theirs = gen.sequences[0, n:].numpy()
        np.testing.assert_array_equal(np.asarray(out.tokens[b, : len(theirs)]), theirs)
        assert np.all(np.asarray(out.tokens[b, len(theirs) :]) == 0)
        transition = torch_model.compute_transition_scores(
            gen.sequences, gen.scores, normalize_logits=True
        )
        np.testing.assert_allclose(float(out.scores[b]), float(transition.sum()), atol=1e-4)
    return np.asarray(out.tokens)


def test_greedy_equals_transformers_generate(models, prompts):
    check_greedy_equals_transformers_generate(*models, *prompts)


def test_gemma3_greedy_equals_transformers_generate(tmp_path, prompts):
    # Gemma 3: QK norm, local / global RoPE bases (linear scaling on the global layers), 5:1
    # pattern; prompt + generation (up to 17 tokens) runs past the 4-token window in the cache.
    torch_model = hf_fixtures.save_gemma(str(tmp_path), "gemma3", seed=12)
    model = load_hf_decoder(str(tmp_path))
    tokens = check_greedy_equals_transformers_generate(torch_model, model, *prompts)
    assert len(np.unique(tokens[tokens > 1])) > 3  # varied generations, not one repeated id


def test_cached_decoding_equals_full_recompute(models, prompts):
    _, model = models
    tokens, lengths = prompts
    out = np.asarray(run(model, tokens, lengths, greedy_cfg(eos_id=-1)).tokens)
    # No cache: the whole sequence is run again for every token. The sequence is zero-padded to
    # one fixed length so that a single compiled forward serves every step (eager calls take
    # seconds each); causal attention keeps the padding after position t out of its logits.
    forward = nnx.jit(lambda m, x: m(x)[0])
    for b, n in enumerate(PROMPT_LENGTHS):
        seq = np.zeros((1, n + MAX_LEN), np.int32)
        seq[0, :n] = np.asarray(tokens[b, :n])
        for t in range(n, n + MAX_LEN):
            seq[0, t] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, t - 1]))
        np.testing.assert_array_equal(out[b], seq[0, n:])


def test_beam_one_equals_greedy_and_beam_four_scores_at_least_as_high(models, prompts):
    _, model = models
    tokens, lengths = prompts
    greedy = run(model, tokens, lengths, greedy_cfg())
    beam1 = run(model, tokens, lengths, greedy_cfg(method="beam", beam_size=1, length_penalty=0.0))
    np.testing.assert_array_equal(beam1.tokens[:, 0], greedy.tokens)
    np.testing.assert_allclose(beam1.scores[:, 0], greedy.scores, atol=1e-5)
    beam4 = run(model, tokens, lengths, greedy_cfg(method="beam", beam_size=4, length_penalty=0.0))
    assert beam4.tokens.shape == (3, 4, MAX_LEN)
    assert np.all(np.asarray(beam4.scores[:, 0]) >= np.asarray(greedy.scores) - 1e-5)
    assert np.all(np.diff(np.asarray(beam4.scores), axis=1) <= 1e-6)  # best first


def test_sampling_is_seeded_and_top_k_one_is_greedy(models, prompts):
    _, model = models
    tokens, lengths = prompts
    cfg = greedy_cfg(method="sample", temperature=1.5, eos_id=-1)
    a = run(model, tokens, lengths, cfg, jax.random.key(0)).tokens
    b = run(model, tokens, lengths, cfg, jax.random.key(0)).tokens
    c = run(model, tokens, lengths, cfg, jax.random.key(1)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    top1 = run(model, tokens, lengths, greedy_cfg(method="sample", top_k=1), jax.random.key(2))
    np.testing.assert_array_equal(top1.tokens, run(model, tokens, lengths, greedy_cfg()).tokens)
    nucleus = run(
        model, tokens, lengths, greedy_cfg(method="sample", top_p=1e-6), jax.random.key(3)
    )
    np.testing.assert_array_equal(nucleus.tokens, top1.tokens)


def test_filter_logits():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: np.asarray(x[0] > decoding.NEG_INF / 2)
    np.testing.assert_array_equal(kept(decoding.filter_logits(logits, 2, 1.0)), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(decoding.filter_logits(logits, 0, 0.7)), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(decoding.filter_logits(logits, 0, 0.5)), [1, 0, 0, 0])


def test_one_compilation_per_shape(models, prompts):
    _, model = models
    tokens, lengths = prompts
    cfg = greedy_cfg(method="beam", beam_size=2)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, n: generate(nnx.merge(graphdef, s), t, n, cfg).tokens)
    fn(state, tokens, lengths)
    fn(state, tokens[::-1], lengths[::-1])
    fn(state, tokens + 1, lengths)
    assert fn._cache_size() == 1


def test_bad_options():
    with pytest.raises(ValueError, match=r"method='topk'.*choose from"):
        decoding.DecodeConfig(method="topk")
    with pytest.raises(ValueError, match=r"top_p=0.0"):
        decoding.DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="needs an rng"):
        decoding.sample_or_greedy(
            lambda t, s: (None, s), jnp.zeros((1, 4)), None, decoding.DecodeConfig(method="sample")
        )
