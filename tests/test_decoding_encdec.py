"""Decoding an EncoderDecoder: cached steps equal full recompute, beam search vs greedy; the
decoding loop of both model kinds reads attention weights in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from encdec_adapt.models import decoding
from encdec_adapt.nn.config import EncoderDecoderConfig, load_preset
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import DecoderOnly

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
    # No cache: the whole decoder prefix is run again every step, zero-padded to one length so
    # that one compiled forward serves every step (the decoder is causal: the padding after
    # position t does not reach its logits).
    forward = nnx.jit(lambda m, x, y: m(x, y))
    seq = np.zeros((3, MAX_LEN + 1), np.int32)  # decoder start id 0
    for t in range(MAX_LEN):
        seq[:, t + 1] = np.asarray(jnp.argmax(forward(model, inputs, jnp.asarray(seq))[:, t], -1))
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


def test_greedy_and_scores_equal_transformers_t5gemma(tmp_path):
    import hf_fixtures
    import torch
    import transformers

    from encdec_adapt.convert import import_hf
    from encdec_adapt.storage import params_io

    module = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
        sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    )  # fmt: skip
    hf_cfg = transformers.T5GemmaConfig(encoder=module, decoder=module, attn_implementation="eager")
    torch.manual_seed(0)
    torch_model = hf_fixtures.randomize_(
        transformers.T5GemmaForConditionalGeneration(hf_cfg), seed=1
    )
    torch_model.save_pretrained(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    _, config = params_io.read_model_json(str(tmp_path / "ckpt"))
    model = EncoderDecoder(EncoderDecoderConfig.from_dict(config), rngs=nnx.Rngs(0))
    params_io.load_into(model, str(tmp_path / "ckpt"))

    start = 2  # HF T5Gemma starts decoding from BOS (checked below), not t5x's 0
    lengths = [9, 4]
    tokens, _ = hf_fixtures.padded_batch(96, lengths, seed=4)
    cfg = decoding.DecodeConfig(max_decode_len=MAX_LEN)

    @nnx.jit
    def ours(model, tokens):
        step_fn, init_logits, state = decoding.encoder_decoder_start(
            model, tokens, MAX_LEN, decoder_start_id=start
        )
        return decoding.decode(step_fn, init_logits, state, cfg)

    out = ours(model, jnp.asarray(tokens))
    for b, n in enumerate(lengths):
        gen = torch_model.generate(
            torch.from_numpy(tokens[b : b + 1, :n].astype(np.int64)),
            max_new_tokens=MAX_LEN,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=1,
            pad_token_id=0,
        )
        assert int(gen.sequences[0, 0]) == start
        theirs = gen.sequences[0, 1:].numpy()
        np.testing.assert_array_equal(np.asarray(out.tokens[b, : len(theirs)]), theirs)
        transition = torch_model.compute_transition_scores(
            gen.sequences, gen.scores, normalize_logits=True
        )
        np.testing.assert_allclose(float(out.scores[b]), float(transition.sum()), atol=1e-4)


def _copied_operand_shapes(hlo: str) -> set[tuple[int, ...]]:
    """Shapes of the arrays that a transpose or copy inside the compiled while loop reads (the
    loop body and every computation it calls, fusions included)."""
    bodies = {}
    for m in re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    pending = re.findall(r"body=%([\w.\-]+)", hlo)
    seen, shapes = set(), set()
    while pending:
        name = pending.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        text = bodies[name]
        pending += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", text)
        dims = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", text))
        for operand in re.findall(r"= \w+\[[\d,]*\]\S* (?:transpose|copy)\(%([\w.\-]+)\)", text):
            if operand in dims:
                shapes.add(tuple(int(d) for d in dims[operand].split(",") if d))
    return shapes


@pytest.mark.parametrize("kind", ["encoder_decoder", "decoder_only"])
def test_the_decoding_loop_reads_attention_weights_without_copying_them(kind):
    # D (96) != N * H (4 * 16): a weight and its transposed copy have different shapes.
    cfg = TINY.replace(embed_dim=96, hidden_dim=128)
    if kind == "encoder_decoder":
        net = EncoderDecoder(EncoderDecoderConfig(encoder=cfg, decoder=cfg), rngs=nnx.Rngs(0))
    else:
        net = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    weights = {
        tuple(node.shape)
        for path, node in nnx.to_flat_state(nnx.state(net, nnx.Param))
        if path[-1] in ("q", "k", "v", "o")
    }
    assert len(weights) == 3  # [N, D, H], [K, D, H], [N, H, D]
    graphdef, state = nnx.split(net)
    decode_cfg = decoding.DecodeConfig(max_decode_len=4, eos_id=-1)
    tokens = jnp.ones((2, 5), jnp.int32)

    def generate_tokens(state):
        m = nnx.merge(graphdef, state)
        if kind == "encoder_decoder":
            start = decoding.encoder_decoder_start(m, tokens, 4)
        else:
            start = decoding.decoder_only_start(m, tokens, jnp.array([5, 3]), 4)
        return decoding.decode(*start, decode_cfg).tokens

    hlo = jax.jit(generate_tokens).lower(state).compile().as_text()
    assert "while" in hlo
    assert not (_copied_operand_shapes(hlo) & weights)
