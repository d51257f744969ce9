"""Feature converters: packing that never crosses segments (checked through DecoderOnly and the
attention masks), counted length policies, the KD teacher view, dual-encoder pairs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

from encdec_adapt.data import counters, prefix_lm, vocab
from encdec_adapt.data import feature_converters as fc
from encdec_adapt.nn.attention import attention_mask
from encdec_adapt.nn.config import load_preset
from encdec_adapt.nn.transformer import DecoderOnly


def seq2seq(examples):
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature={
            "inputs": tf.TensorSpec([None], tf.int32),
            "targets": tf.TensorSpec([None], tf.int32),
        },
    )


def random_examples(n, max_in, max_tg, seed=0):
    rng = np.random.default_rng(seed)
    make = lambda k: np.append(rng.integers(10, 4000, size=k), 1).astype(np.int32)  # + EOS
    return [
        {
            "inputs": make(int(rng.integers(1, max_in))),
            "targets": make(int(rng.integers(1, max_tg))),
        }
        for _ in range(n)
    ]


def segments(row_segment_ids):
    return [s for s in np.unique(row_segment_ids) if s != 0]


def test_encdec_packing_keeps_examples_whole_and_masks_within_segments():
    examples = random_examples(30, 20, 10)
    lengths = {"inputs": 48, "targets": 24}
    ds = fc.EncDecConverter(pack=True)(seq2seq(examples), lengths).batch(4)
    batches = list(ds.as_numpy_iterator())
    assert sum(len(segments(r)) for b in batches for r in b["encoder_segment_ids"]) == 30
    seen = []
    for b in batches:
        for row in range(len(b["encoder_input_tokens"])):
            enc_seg, dec_seg = b["encoder_segment_ids"][row], b["decoder_segment_ids"][row]
            for s in segments(enc_seg):
                enc = b["encoder_input_tokens"][row][enc_seg == s]
                dec = b["decoder_target_tokens"][row][dec_seg == s]
                np.testing.assert_array_equal(b["encoder_positions"][row][enc_seg == s],
                                              np.arange(len(enc)))  # fmt: skip
                # decoder inputs restart at BOS (0) in every segment: no token leaks across.
                assert b["decoder_input_tokens"][row][dec_seg == s][0] == 0
                seen.append((enc.tolist(), dec.tolist()))
        for name, q, k, causal in (
            ("encoder self", "encoder", "encoder", False),
            ("decoder self", "decoder", "decoder", True),
            ("cross", "decoder", "encoder", False),
        ):
            mask = np.asarray(attention_mask(
                jnp.asarray(b[f"{q}_positions"]), jnp.asarray(b[f"{q}_segment_ids"]),
                jnp.asarray(b[f"{k}_positions"]), jnp.asarray(b[f"{k}_segment_ids"]),
                causal=causal,
            ))  # fmt: skip
            same = b[f"{q}_segment_ids"][:, :, None] == b[f"{k}_segment_ids"][:, None, :]
            assert not (mask & ~same).any(), name
            assert mask[b[f"{q}_segment_ids"] > 0].any(axis=-1).all(), name
    assert seen == [(e["inputs"].tolist(), e["targets"].tolist()) for e in examples]


def test_packed_decoder_only_batch_matches_each_segment_run_alone():
    """Packed rows through the real DecoderOnly: each segment's logits equal its own run."""
    cfg = load_preset("gemma_tiny")
    model = DecoderOnly(cfg, rngs=nnx.Rngs(0))
    examples = random_examples(12, 14, 10, seed=1)
    ds = fc.DecoderOnlyConverter(pack=True)(seq2seq(examples), {"inputs": 24, "targets": 16})
    (batch,) = list(ds.batch(64).as_numpy_iterator())
    assert (batch["decoder_segment_ids"].max(axis=1) >= 2).any()  # really packed
    # Compiled: an eager call compiles every op at each new shape (seconds per call on CPU).
    forward = nnx.jit(lambda m, tokens, **kw: m(tokens, **kw)[0])
    logits = forward(
        model,
        jnp.asarray(batch["decoder_input_tokens"]),
        segment_ids=jnp.asarray(batch["decoder_segment_ids"]),
        positions=jnp.asarray(batch["decoder_positions"]),
    )
    # Every segment alone in its own row (left-aligned, zero-padded; causal, so trailing padding
    # cannot change it): one batched call instead of one compile per segment length.
    pieces, where = [], []
    for row, seg_ids in enumerate(batch["decoder_segment_ids"]):
        for s in segments(seg_ids):
            pieces.append(batch["decoder_input_tokens"][row][seg_ids == s])
            where.append((row, seg_ids == s))
    alone_tokens = np.zeros((len(pieces), batch["decoder_input_tokens"].shape[1]), np.int32)
    for i, p in enumerate(pieces):
        alone_tokens[i, : len(p)] = p
    alone = forward(
        model,
        jnp.asarray(alone_tokens),
        segment_ids=jnp.asarray((np.arange(40) < [[len(p)] for p in pieces]).astype(np.int32)),
    )
    assert len(pieces) == 12
    for i, (row, sel) in enumerate(where):
        np.testing.assert_allclose(
            np.asarray(logits[row][sel]),
            np.asarray(alone[i, : len(pieces[i])]),
            atol=2e-5,
            rtol=2e-5,
        )


def test_truncate_policy_cuts_and_counts():
    own = counters.Counters()
    examples = [
        {"inputs": np.arange(2, 12, dtype=np.int32), "targets": np.arange(2, 5, dtype=np.int32)},
        {"inputs": np.arange(2, 5, dtype=np.int32), "targets": np.arange(2, 9, dtype=np.int32)},
        {"inputs": np.arange(2, 4, dtype=np.int32), "targets": np.arange(2, 4, dtype=np.int32)},
    ]
    conv = fc.EncDecConverter(pack=False, length_policy="truncate", counters=own)
    out = list(conv(seq2seq(examples), {"inputs": 6, "targets": 4}).as_numpy_iterator())
    assert len(out) == 3
    np.testing.assert_array_equal(out[0]["encoder_input_tokens"], [2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(out[1]["decoder_target_tokens"], [2, 3, 4, 5])
    result = own.result()
    assert result["truncated/inputs"] == 1 and result["truncated_tokens/inputs"] == 4
    assert result["truncated/targets"] == 1 and result["truncated_tokens/targets"] == 3


def test_drop_policy_drops_and_counts():
    own = counters.Counters()
    examples = random_examples(40, 30, 12, seed=2)
    conv = fc.EncDecConverter(pack=True, length_policy="drop", counters=own)
    batches = list(conv(seq2seq(examples), {"inputs": 16, "targets": 8}).as_numpy_iterator())
    fits = [e for e in examples if len(e["inputs"]) <= 16 and len(e["targets"]) <= 8]
    kept = sum(len(segments(b["encoder_segment_ids"])) for b in batches)
    result = own.result()
    assert kept == len(fits) < len(examples)
    assert result["dropped_examples"] == len(examples) - len(fits)
    assert result["dropped/inputs"] == sum(len(e["inputs"]) > 16 for e in examples)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="length policy"):
        fc.apply_length_policy(seq2seq([]), {"inputs": 4}, policy="clip")


def test_kd_teacher_view_is_aligned_with_the_student_targets():
    v = vocab.embedded_vocabulary()
    features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
    lengths = {"inputs": 32, "targets": 16}
    rng = np.random.default_rng(3)
    docs = [rng.integers(10, 4000, size=int(n)).astype(np.int32) for n in (5, 30, 60, 100)]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)},
    )
    with seqio.utils.map_seed_manager(0):
        ds = prefix_lm.prefix_lm(ds, lengths, features, full_sequence=True, mode_token="[S2S]")
    ds = seqio.preprocessors.append_eos(ds, features)
    examples = list(ds.as_numpy_iterator())
    conv = fc.EncDecConverter(pack=False, teacher=True)
    for ex, b in zip(examples, conv(ds, lengths).as_numpy_iterator()):
        k, n = int(ex["split"]), int(b["decoder_loss_weights"].sum())
        assert b["teacher_input_tokens"][0] == 2  # Gemma BOS
        np.testing.assert_array_equal(
            b["teacher_input_tokens"][1 : 1 + len(ex["full"])], ex["full"]
        )
        np.testing.assert_array_equal(
            b["teacher_target_tokens"][k : k + n], b["decoder_target_tokens"][:n]
        )
        np.testing.assert_array_equal(np.flatnonzero(b["teacher_loss_weights"]), k + np.arange(n))
    with pytest.raises(ValueError, match="'full'"):
        conv(seq2seq(random_examples(2, 4, 4)), lengths)


def test_dual_encoder_pairs_pad_truncate_and_count_negatives():
    own = counters.Counters()
    examples = [
        {"query": [3, 4, 1], "positive": [9, 9, 9, 9, 9, 1]},
        {"query": [3, 1], "positive": [8, 1]},
    ]
    negatives = [[5, 6, 7, 8, 9, 1], [5, 1], [7, 7, 1]]
    ds = tf.data.Dataset.from_generator(
        lambda: (
            {**e, "negatives": tf.ragged.constant(negatives, dtype=tf.int32)} for e in examples
        ),
        output_signature={
            "query": tf.TensorSpec([None], tf.int32),
            "positive": tf.TensorSpec([None], tf.int32),
            "negatives": tf.RaggedTensorSpec([None, None], tf.int32),
        },
    )
    conv = fc.DualEncoderConverter(counters=own)
    (b,) = list(conv(ds, {"query": 4, "positive": 4}).batch(2).as_numpy_iterator())
    assert b["query_tokens"].shape == (2, 4) and b["negative_tokens"].shape == (2, 3, 4)
    np.testing.assert_array_equal(b["negative_tokens"][0, 0], [5, 6, 7, 8])
    np.testing.assert_array_equal(b["negative_tokens"][0, 1], [5, 1, 0, 0])
    assert own.result()["truncated/positive"] == 1
    assert own.result()["truncated_tokens/negatives"] == 4  # 2 tokens x 2 examples
    with pytest.raises(ValueError, match="query"):
        conv(ds, {"positive": 4})


def test_jax_sees_int32_batches():
    examples = random_examples(4, 6, 6, seed=4)
    ds = fc.EncDecConverter(pack=True)(seq2seq(examples), {"inputs": 16, "targets": 8}).batch(2)
    batch = jax.tree.map(jnp.asarray, next(ds.as_numpy_iterator()))
    assert all(x.dtype == jnp.int32 for x in batch.values())
