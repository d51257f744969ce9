"""The T5Gemma encoder-decoder: a bidirectional Gemma encoder and a causal Gemma decoder with
cross-attention, built so that both stacks can be warm-started from decoder-only checkpoints.

Numerics follow HF `T5GemmaForConditionalGeneration` (checked by a parity test):
  - encoder: embed * sqrt(D) -> Gemma blocks with bidirectional self-attention (local layers
    see keys with |q - k| <= window, inclusive, as HF's bidirectional window) -> final norm;
  - decoder layer: pre-norm -> causal self-attn -> post-norm -> residual; pre-cross norm ->
    cross-attn (no RoPE, the layer's soft-cap, K/V projected from the encoder width) -> post-cross
    norm -> residual; pre-norm -> GeGLU -> post-norm -> residual; final norm;
  - logits through the decoder's input embedding (tied), then the final soft-cap;
  - dropout on the scaled embeddings, on every residual branch and after the final norm. (HF
    also drops inside the GeGLU and on attention probabilities; the shared `FeedForward` and
    `Attention` have no dropout, so training regularisation differs slightly; eval is identical.)
The T5Gemma 2 switches follow HF `T5Gemma2ForConditionalGeneration` (parity tests in
tests/test_convert_t5gemma2.py): one table embeds encoder and decoder inputs and gives the
logits; the decoder's self-attention queries see [causal self keys; encoder keys] in one softmax,
the encoder keys through the same k/v projections with k_norm and no RoPE; the encoder's local
layers see `sliding_window` keys split around the query (`encoder_window="split"`).

Parameter paths (what freezing regexes and warm starts match, `params_io.flatten` form):
  encoder/embedder/embedding                         [V_enc, D_enc]
  encoder/stack/blocks/{i}/{pre_attn_norm,post_attn_norm,pre_ffw_norm,post_ffw_norm}/scale
  encoder/stack/blocks/{i}/attn/{q,k,v,o}            (+ q_norm/scale, k_norm/scale with QK-norm)
  encoder/stack/blocks/{i}/mlp/{gate,up,down}
  encoder/stack/final_norm/scale
  decoder/embedder/embedding                         (absent with tie_encoder_decoder_embeddings)
  decoder/lm_head                                    (only when decoder.tie_embeddings is False)
  decoder/stack/blocks/{i}/...                       as the encoder, plus
  decoder/stack/blocks/{i}/{pre_cross_norm,post_cross_norm}/scale
  decoder/stack/blocks/{i}/cross_attn/{q,k,v,o}      k, v: [K, D_enc, H]  (absent when merged)
  decoder/stack/final_norm/scale
`encoder/*` has exactly the layout of a `DecoderOnly` tree, and `decoder/*` too apart from the
cross-attention entries, which is what makes the balanced warm start a copy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.nn import layers
from encdec_adapt.nn.attention import (
    KV,
    Attention,
    HeadMajorKV,
    MaskSpec,
    concat_keys,
    concat_kv,
    to_head_major,
)
from encdec_adapt.nn.config import AttentionType, EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.transformer import (
    Block,
    DecodeCache,
    Stack,
    default_positions,
    init_cache,
    make_attention,
    make_lm_head,
    output_logits,
    write_cache,
)
from encdec_adapt.parallel import sharding

#: model_type of encoder-decoder params checkpoints (model.json).
MODEL_TYPE = "encoder_decoder"

_ACT = ("activation_batch", "activation_length", "activation_embed")


class Encoded(NamedTuple):
    """Encoder output and what the decoder needs to mask it.

    hidden: [B, S, D_enc] final-norm encoder states; segment_ids: [B, S] (0 = padding).
    """

    hidden: jax.Array
    segment_ids: jax.Array


class CrossInputs(NamedTuple):
    """Cross-attention keys/values of every decoder layer, computed once per encoded batch.

    kv: one KV per decoder layer, each [B, S, K, H] (HeadMajorKV [B, K, S, H] when prepared for
    decoding: `cross_inputs(..., head_major=True)`); segment_ids: [B, S] encoder segment ids.
    """

    kv: tuple[KV | HeadMajorKV, ...]
    segment_ids: jax.Array


def _norm(cfg: GemmaConfig, rngs: nnx.Rngs) -> layers.RMSNorm:
    return layers.RMSNorm(
        cfg.embed_dim, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype, rngs=rngs
    )


def project_cross_kv(attn: Attention, encoded: jax.Array) -> KV:
    """Keys and values of encoder states for cross-attention: no RoPE (k_norm if the layer has one).

    [B, S, D_enc] -> KV of [B, S, K, H]. Written here rather than with `attn.keys_values` so the
    merged (T5Gemma 2) attention, whose projections do carry RoPE on self-attention keys, can use
    it too: HF applies no RoPE to the encoder keys there either.
    """
    dt = encoded.dtype
    k = layers.token_einsum("bsd,kdh->bskh", encoded, attn.k[...].astype(dt))
    v = layers.token_einsum("bsd,kdh->bskh", encoded, attn.v[...].astype(dt))
    if attn.k_norm is not None:
        k = attn.k_norm(k)
    axes = ("activation_batch", "activation_length", "activation_kv_heads", None)
    return KV(sharding.constrain(k, axes), sharding.constrain(v, axes))


class EncoderStack(Stack):
    """A bidirectional Gemma stack (causal with `causal=True`, an ablation).

    Local layers, window W (`EncoderDecoderConfig.encoder_window`; transformers wins, parity tests):
      "inclusive": HF T5Gemma's bidirectional window, |q - k| <= W, while
        `attention_mask(causal=False)` keeps |q - k| < window: hence window W + 1.
      "split": HF T5Gemma 2's, W keys around the query: q - k < (W + 1) // 2 behind (the query
        included) and k - q < W // 2 + 1 ahead.
    A causal encoder uses the decoder-only window, q - k < window, as its source LM did.
    """

    def __init__(
        self, cfg: GemmaConfig, *, causal: bool = False, window: str = "inclusive", rngs: nnx.Rngs
    ):
        super().__init__(cfg, causal=causal, rngs=rngs)
        self.window_kind = window

    def masks(self, q_pos, q_seg, k_pos, k_seg) -> dict[AttentionType, MaskSpec]:
        if self.causal:
            return super().masks(q_pos, q_seg, k_pos, k_seg)
        w = self.sliding_window
        if self.window_kind == "split":
            local = {"window": (w + 1) // 2, "window_ahead": w // 2 + 1}
        else:
            local = {"window": w + 1}
        out = {}
        for t in set(b.attention_type for b in self.blocks):
            extra = local if t == AttentionType.LOCAL else {}
            out[t] = MaskSpec(q_pos, q_seg, k_pos, k_seg, causal=False, **extra)
        return out


class Encoder(nnx.Module):
    """Token embedding and a bidirectional Gemma stack: [B, S] tokens -> [B, S, D] states.

    `causal=True` (EncoderDecoderConfig.encoder_causal) makes every position see only itself
    and earlier positions: the "keep the decoder-only mask" ablation of T5Gemma. `window`: how
    local layers read the sliding window ("inclusive" or "split", see `EncoderStack`).
    """

    def __init__(
        self, cfg: GemmaConfig, *, causal: bool = False, window: str = "inclusive", rngs: nnx.Rngs
    ):
        self.config = cfg
        self.embedder = layers.Embedder(
            cfg.vocab_size, cfg.embed_dim, param_dtype=cfg.weight_dtype, rngs=rngs
        )
        self.stack = EncoderStack(cfg, causal=causal, window=window, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> Encoded:
        """tokens: [B, S] int; segment_ids: [B, S] (0 = padding; default: tokens != 0);
        positions: [B, S] (default: restarting per segment) -> Encoded([B, S, D], [B, S])."""
        if segment_ids is None:
            segment_ids = (tokens != 0).astype(jnp.int32)
        if positions is None:
            positions = default_positions(segment_ids)
        rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        rate = self.config.dropout_rate
        x = layers.dropout(self.embedder.encode(tokens, self.config.compute_dtype), rate, rngs[0])
        hidden, _ = self.stack(x, positions, segment_ids, rng=rngs[1])
        return Encoded(layers.dropout(hidden, rate, rngs[2]), segment_ids)


class DecoderBlock(Block):
    """A Gemma layer with a cross-attention sub-block between self-attention and feed-forward.

    With `merged` (T5Gemma 2) there is no cross-attention sub-block: the self-attention's queries
    attend, in one softmax, to the causal self keys and to the encoder keys (same projections).
    """

    def __init__(
        self,
        cfg: GemmaConfig,
        attention_type: AttentionType,
        *,
        encoder_dim: int,
        merged: bool,
        rngs: nnx.Rngs,
    ):
        super().__init__(cfg, attention_type, rngs=rngs)
        self.merged = merged
        if not merged:
            self.pre_cross_norm = _norm(cfg, rngs)
            self.cross_attn = make_attention(cfg, None, rngs, kv_input_dim=encoder_dim)
            self.post_cross_norm = _norm(cfg, rngs)

    @property
    def cross_projections(self) -> Attention:
        """The attention whose k/v project the encoder states for this layer."""
        return self.attn if self.merged else self.cross_attn

    def merged_attention(self, x, positions, mask, cross_kv, cross_mask, cache, cache_index):
        """T5Gemma 2 attention sub-block: keys = [self (cached) keys; encoder keys]."""
        h = self.pre_attn_norm(x)
        q = self.attn.queries(h, positions)
        kv = self.attn.keys_values(h, positions)
        if cache is not None:
            kv = write_cache(cache, kv, cache_index)
        joint = concat_kv(kv, cross_kv)  # in the cache's layout when decoding
        out = self.attn.attend(q, joint, concat_keys(mask, cross_mask))
        return self.post_attn_norm(out), kv if cache is not None else None

    def __call__(
        self,
        x,
        positions,
        mask,
        *,
        cross_kv: KV | HeadMajorKV,
        cross_mask: MaskSpec,
        cache=None,
        cache_index=None,
        rng=None,
    ):
        """x: [B, T, D]; mask: self mask over L keys; cross_kv: [B, S, K, H]; cross_mask: over S
        -> ([B, T, D], updated layer cache or None)."""
        rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        if self.merged:
            attn, cache = self.merged_attention(
                x, positions, mask, cross_kv, cross_mask, cache, cache_index
            )
        else:
            attn, cache = self.self_attention(x, positions, mask, cache, cache_index)
        x = sharding.constrain(x + layers.dropout(attn, self.dropout_rate, rngs[0]), _ACT)
        if not self.merged:
            q = self.cross_attn.queries(self.pre_cross_norm(x), positions)
            cross = self.post_cross_norm(self.cross_attn.attend(q, cross_kv, cross_mask))
            x = sharding.constrain(x + layers.dropout(cross, self.dropout_rate, rngs[1]), _ACT)
        ffw = self.feed_forward(x)
        x = sharding.constrain(x + layers.dropout(ffw, self.dropout_rate, rngs[2]), _ACT)
        return x, cache


class DecoderStack(Stack):
    """Causal Gemma stack of `DecoderBlock`s reading precomputed cross-attention K/V."""

    def __init__(self, cfg: EncoderDecoderConfig, *, rngs: nnx.Rngs):
        dec = cfg.decoder
        self.causal = True
        self.sliding_window = dec.sliding_window
        self.blocks = nnx.List(
            [
                DecoderBlock(
                    dec,
                    t,
                    encoder_dim=cfg.encoder.embed_dim,
                    merged=cfg.merged_attention,
                    rngs=rngs,
                )
                for t in dec.layer_types
            ]
        )
        self.final_norm = _norm(dec, rngs)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cross: CrossInputs,
        *,
        cache: DecodeCache | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """x: [B, T, D] embedded decoder inputs; positions, segment_ids: [B, T]
        -> ([B, T, D] final-norm states, updated cache or None)."""
        # Decoder tokens see the encoder tokens of their own segment (packing), never padding.
        enc_seg = cross.segment_ids
        cross_mask = MaskSpec(positions, segment_ids, jnp.zeros_like(enc_seg), enc_seg)
        per_layer = [{"cross_kv": kv, "cross_mask": cross_mask} for kv in cross.kv]
        return super().__call__(
            x, positions, segment_ids, cache=cache, rng=rng, layer_kwargs=per_layer
        )


class Decoder(nnx.Module):
    """Decoder embedding (unless shared with the encoder), decoder stack, and output projection."""

    def __init__(self, cfg: EncoderDecoderConfig, *, rngs: nnx.Rngs):
        dec = cfg.decoder
        self.config = dec
        if not cfg.tie_encoder_decoder_embeddings:
            self.embedder = layers.Embedder(
                dec.vocab_size, dec.embed_dim, param_dtype=dec.weight_dtype, rngs=rngs
            )
        self.stack = DecoderStack(cfg, rngs=rngs)
        self.lm_head = None if dec.tie_embeddings else make_lm_head(dec, rngs)

    def logits(self, hidden: jax.Array, embedder: layers.Embedder) -> jax.Array:
        """[B, T, D] -> [B, T, V] (float32 when soft-capped)."""
        return output_logits(hidden, self.config, embedder, self.lm_head)


class EncoderDecoder(nnx.Module):
    """T5Gemma encoder-decoder network (the t5x-style model API lives with losses / decoding).

    Training: `model(encoder_tokens, decoder_tokens, ...) -> logits`.
    Step-by-step decoding (fixed shapes, everything a pytree, jit-friendly):
      encoded = model.encode(encoder_tokens)           # once
      cross = model.cross_inputs(encoded)              # once: K/V of every decoder layer
      cache = model.init_cache(batch_size, max_decode_length)
      logits, cache = model.decode(tokens[:, :1], cross, cache=cache)  # repeat, T tokens a call
    """

    def __init__(self, cfg: EncoderDecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(
            cfg.encoder, causal=cfg.encoder_causal, window=cfg.encoder_window, rngs=rngs
        )
        self.decoder = Decoder(cfg, rngs=rngs)

    @property
    def decoder_embedder(self) -> layers.Embedder:
        if self.config.tie_encoder_decoder_embeddings:
            return self.encoder.embedder
        return self.decoder.embedder

    def encode(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> Encoded:
        """[B, S] encoder tokens -> Encoded(hidden [B, S, D_enc], segment_ids [B, S]).

        segment_ids default to `tokens != 0` (pad id 0); positions restart per segment.
        """
        return self.encoder(tokens, segment_ids=segment_ids, positions=positions, rng=rng)

    def cross_inputs(self, encoded: Encoded, *, head_major: bool = False) -> CrossInputs:
        """Projects the encoder states once for every decoder layer: K/V of [B, S, K, H], or
        [B, K, S, H] with `head_major` (what decoding steps read without a transpose)."""
        hidden = encoded.hidden.astype(self.config.decoder.compute_dtype)
        kv = tuple(project_cross_kv(b.cross_projections, hidden) for b in self.decoder.stack.blocks)
        if head_major:
            kv = tuple(to_head_major(x) for x in kv)
        return CrossInputs(kv, encoded.segment_ids)

    def init_cache(self, batch_size: int, max_length: int) -> DecodeCache:
        """An empty decoder self-attention cache of `max_length` slots."""
        return init_cache(self.config.decoder, batch_size, max_length)

    def decode(
        self,
        tokens: jax.Array,
        cross: CrossInputs,
        *,
        cache: DecodeCache | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """Decoder logits for T tokens given the encoder's cross inputs.

        Args:
          tokens: [B, T] decoder input tokens.
          cross: from `cross_inputs`.
          cache: a `DecodeCache` from `init_cache`; the tokens are written at `cache.index`.
          segment_ids: [B, T] (default: all ones; must match the encoder segment ids to see them).
          positions: [B, T] (default: restarting per segment, or cache.index + 0..T-1 with a cache).
          rng: dropout key; None disables dropout.
          return_hidden: return the final-norm states [B, T, D] instead of logits.
        Returns:
          ([B, T, V] logits or [B, T, D] states, the updated cache or None).
        """
        cfg = self.config.decoder
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        if positions is None:
            if cache is None:
                positions = default_positions(segment_ids)
            else:
                steps = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :] + cache.index
                positions = jnp.broadcast_to(steps, tokens.shape)
        rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        embedder = self.decoder_embedder
        x = layers.dropout(embedder.encode(tokens, cfg.compute_dtype), cfg.dropout_rate, rngs[0])
        hidden, cache = self.decoder.stack(
            x, positions, segment_ids, cross, cache=cache, rng=rngs[1]
        )
        hidden = layers.dropout(hidden, cfg.dropout_rate, rngs[2])
        return (hidden if return_hidden else self.decoder.logits(hidden, embedder)), cache

    def __call__(
        self,
        encoder_tokens: jax.Array,
        decoder_tokens: jax.Array,
        *,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Teacher-forced logits: [B, S] encoder tokens, [B, T] decoder inputs -> [B, T, V]
        (the final decoder states [B, T, D] with `return_hidden`).

        Unpacked batches need no segment ids (encoder padding is `tokens == 0`); packed batches
        pass the seqio `encoder_segment_ids` / `decoder_segment_ids` and positions.
        """
        enc_rng, dec_rng = (None, None) if rng is None else tuple(jax.random.split(rng))
        encoded = self.encode(
            encoder_tokens,
            segment_ids=encoder_segment_ids,
            positions=encoder_positions,
            rng=enc_rng,
        )
        if decoder_segment_ids is None:
            # Unpacked: every decoder token belongs to its row's single encoder segment (id 1).
            decoder_segment_ids = jnp.ones_like(decoder_tokens, jnp.int32)
        logits, _ = self.decode(
            decoder_tokens,
            self.cross_inputs(encoded),
            segment_ids=decoder_segment_ids,
            positions=decoder_positions,
            rng=dec_rng,
            return_hidden=return_hidden,
        )
        return logits

    def output_head(self) -> tuple[jax.Array, float | None]:
        """The decoder's [V, D] output projection and final soft-cap (chunked losses)."""
        lm_head = self.decoder.lm_head
        head = self.decoder_embedder.embedding if lm_head is None else lm_head
        return head[...], self.config.decoder.final_logit_soft_cap
