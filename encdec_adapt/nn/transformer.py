"""The Gemma 2 / Gemma 3 transformer: blocks, the layer stack, and the decoder-only language model.

`Stack` is shared by every model in the package: causal for decoders, bidirectional for encoders
and embedding towers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.nn import layers
from encdec_adapt.nn.attention import KV, Attention, HeadMajorKV, MaskSpec
from encdec_adapt.nn.config import AttentionType, GemmaConfig
from encdec_adapt.parallel import sharding

_ACT = ("activation_batch", "activation_length", "activation_embed")


def _norm(cfg: GemmaConfig, dim: int, rngs: nnx.Rngs) -> layers.RMSNorm:
    return layers.RMSNorm(dim, eps=cfg.rms_norm_eps, param_dtype=cfg.weight_dtype, rngs=rngs)


def make_attention(
    cfg: GemmaConfig, attention_type: AttentionType | None, rngs: nnx.Rngs, kv_input_dim=None
) -> Attention:
    """Self-attention of a layer of `attention_type`; cross-attention when the type is None."""
    if attention_type is None:
        rope_base, rope_scale = None, 1.0
    elif attention_type == AttentionType.LOCAL:
        rope_base, rope_scale = cfg.rope_base_local, 1.0
    else:
        rope_base, rope_scale = cfg.rope_base_global, cfg.rope_scale_global
    return Attention(
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar,
        attn_logits_soft_cap=cfg.attn_logits_soft_cap,
        use_qk_norm=cfg.use_qk_norm,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_base=rope_base,
        rope_scale=rope_scale,
        kv_input_dim=kv_input_dim,
        attention_impl=cfg.attention_impl,
        param_dtype=cfg.weight_dtype,
        rngs=rngs,
    )


def write_cache(cache: HeadMajorKV, new: KV, index: jax.Array) -> HeadMajorKV:
    """Writes T new keys/values [B, T, K, H] into a layer cache [B, K, L, H] at slot `index`."""
    start = (0, 0, index, 0)

    def write(c, x):
        return jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), start)

    return HeadMajorKV(write(cache.k, new.k), write(cache.v, new.v))


class Block(nnx.Module):
    """One Gemma layer: norm -> self-attn -> norm -> residual; norm -> GeGLU -> norm -> residual."""

    def __init__(self, cfg: GemmaConfig, attention_type: AttentionType, *, rngs: nnx.Rngs):
        self.attention_type = attention_type
        self.dropout_rate = cfg.dropout_rate
        self.pre_attn_norm = _norm(cfg, cfg.embed_dim, rngs)
        self.attn = make_attention(cfg, attention_type, rngs)
        self.post_attn_norm = _norm(cfg, cfg.embed_dim, rngs)
        self.pre_ffw_norm = _norm(cfg, cfg.embed_dim, rngs)
        self.mlp = layers.FeedForward(
            cfg.embed_dim, cfg.hidden_dim, param_dtype=cfg.weight_dtype, rngs=rngs
        )
        self.post_ffw_norm = _norm(cfg, cfg.embed_dim, rngs)

    def self_attention(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: KV | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, KV | None]:
        """Attention sub-block output (before the residual) and the updated layer cache."""
        h = self.pre_attn_norm(x)
        q = self.attn.queries(h, positions)
        kv = self.attn.keys_values(h, positions)
        if cache is not None:
            kv = write_cache(cache, kv, cache_index)
        return self.post_attn_norm(self.attn.attend(q, kv, mask)), kv if cache is not None else None

    def feed_forward(self, x: jax.Array) -> jax.Array:
        return self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))

    def __call__(self, x, positions, mask, *, cache=None, cache_index=None, rng=None):
        """x: [B, T, D] -> ([B, T, D], updated cache or None)."""
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        attn, cache = self.self_attention(x, positions, mask, cache, cache_index)
        x = sharding.constrain(x + layers.dropout(attn, self.dropout_rate, rngs[0]), _ACT)
        ffw = self.feed_forward(x)
        x = sharding.constrain(x + layers.dropout(ffw, self.dropout_rate, rngs[1]), _ACT)
        return x, cache


class DecodeCache(NamedTuple):
    """Self-attention cache of a whole stack.

    layers: one HeadMajorKV per layer, each [B, K, L, H] (head-major, see `HeadMajorKV`);
    positions / segment_ids: [B, L] of the cached slots (segment 0 = empty); index: the next
    slot to write (a scalar int32).
    """

    layers: tuple[HeadMajorKV, ...]
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array


def init_cache(cfg: GemmaConfig, batch_size: int, max_length: int) -> DecodeCache:
    """An empty cache of `max_length` slots in the compute dtype."""
    shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
    kv = HeadMajorKV(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
    zeros = jnp.zeros((batch_size, max_length), jnp.int32)
    return DecodeCache((kv,) * cfg.num_layers, zeros, zeros, jnp.zeros((), jnp.int32))


def default_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions 0, 1, ... restarting at each new segment of a packed row. [B, T] -> [B, T]."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def pattern_period(types: Sequence[AttentionType]) -> int:
    """The smallest p with types[i] == types[i - p] for every layer i >= p."""
    n = len(types)
    return next(p for p in range(1, n + 1) if all(types[i] == types[i - p] for i in range(p, n)))


class Stack(nnx.Module):
    """Gemma layers and the final norm over embedded inputs; causal or bidirectional.

    With `scan_layers` (set by `apply_scan`) training / scoring calls run the layers as a
    `jax.lax.scan` over groups of one attention-pattern period (Gemma 2: local, global; Gemma 3:
    5 local, 1 global), so XLA compiles one group instead of every layer. Parameters stay stored
    per layer (the checkpoint layout does not change); the scan stacks them on the fly.
    """

    block_cls = Block
    scan_layers = False

    def __init__(self, cfg: GemmaConfig, *, causal: bool, rngs: nnx.Rngs):
        self.causal = causal
        self.sliding_window = cfg.sliding_window
        self.blocks = nnx.List([self.block_cls(cfg, t, rngs=rngs) for t in cfg.layer_types])
        self.final_norm = _norm(cfg, cfg.embed_dim, rngs)

    def masks(self, q_pos, q_seg, k_pos, k_seg) -> dict[AttentionType, MaskSpec]:
        """The mask of each attention type (its rules; `MaskSpec.dense()` gives [B, T, S])."""
        out = {}
        for t in set(b.attention_type for b in self.blocks):
            window = self.sliding_window if t == AttentionType.LOCAL else None
            out[t] = MaskSpec(q_pos, q_seg, k_pos, k_seg, causal=self.causal, window=window)
        return out

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        *,
        cache: DecodeCache | None = None,
        rng: jax.Array | None = None,
        layer_kwargs: Sequence[dict] | None = None,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """x: [B, T, D] embedded inputs; positions, segment_ids: [B, T] -> ([B, T, D], cache).

        layer_kwargs: extra keyword arguments of each block (e.g. its cross-attention inputs).
        """
        x = sharding.constrain(x, _ACT)
        if cache is None:
            masks = self.masks(positions, segment_ids, positions, segment_ids)
        else:
            start = (0, cache.index)
            cache = cache._replace(
                positions=jax.lax.dynamic_update_slice(cache.positions, positions, start),
                segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, start),
            )
            masks = self.masks(positions, segment_ids, cache.positions, cache.segment_ids)
        if self.scan_layers and cache is None:
            x = self._scan(x, positions, masks, rng, layer_kwargs)
            return self.final_norm(x), None
        new_layers = []
        for i, block in enumerate(self.blocks):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            x, layer_cache = block(
                x,
                positions,
                masks[block.attention_type],
                cache=None if cache is None else cache.layers[i],
                cache_index=None if cache is None else cache.index,
                rng=layer_rng,
                **(layer_kwargs[i] if layer_kwargs else {}),
            )
            new_layers.append(layer_cache)
        if cache is not None:
            cache = cache._replace(layers=tuple(new_layers), index=cache.index + positions.shape[1])
        return self.final_norm(x), cache

    def _scan(self, x, positions, masks, rng, layer_kwargs) -> jax.Array:
        """The layers of a cache-free call: whole periods in a scan, the remainder unrolled.

        Layer i gets the same dropout key and keyword arguments as in the unrolled loop, so
        both paths compute the same function.
        """
        blocks = list(self.blocks)
        types = [b.attention_type for b in blocks]
        period = pattern_period(types)
        groups = len(blocks) // period
        kwargs = list(layer_kwargs) if layer_kwargs else [{}] * len(blocks)

        def run(block, x, i, kw):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            out, _ = block(x, positions, masks[block.attention_type], rng=layer_rng, **kw)
            return out

        # Each pattern position j has one graph structure; its states over the groups stack.
        graphdefs, stacked = [], []
        for j in range(period):
            members = [blocks[g * period + j] for g in range(groups)]
            graphdefs.append(nnx.graphdef(members[0]))
            stacked.append(
                jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in members])
            )
        stacked_kwargs = [
            jax.tree.map(
                lambda *xs: jnp.stack(xs), *[kwargs[g * period + j] for g in range(groups)]
            )
            for j in range(period)
        ]

        def body(x, xs):
            states, kws, g = xs
            for j in range(period):
                block = nnx.merge(graphdefs[j], states[j])
                x = run(block, x, g * period + j, kws[j])
            return x, None

        x, _ = jax.lax.scan(body, x, (stacked, stacked_kwargs, jnp.arange(groups)))
        for i in range(groups * period, len(blocks)):
            x = run(blocks[i], x, i, kwargs[i])
        return x


def apply_scan(module: nnx.Module, enabled: bool = True) -> nnx.Module:
    """Makes every `Stack` inside `module` scan over its layers in cache-free calls (in place).

    Decoding with a cache stays unrolled (one step touches each layer once anyway).
    """
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Stack):
            node.scan_layers = enabled
    return module


def make_lm_head(cfg: GemmaConfig, rngs: nnx.Rngs) -> nnx.Param:
    """An untied output projection [V, D] (Gemma checkpoints tie it to the input embedding)."""
    return layers.param(
        rngs,
        layers.fan_in_init(-1),
        (cfg.vocab_size, cfg.embed_dim),
        ("vocab", "embed"),
        cfg.weight_dtype,
    )


def output_logits(
    hidden: jax.Array, cfg: GemmaConfig, embedder: layers.Embedder, lm_head: nnx.Param | None
) -> jax.Array:
    """[B, T, D] final hidden states -> [B, T, V] logits through the tied embedding or
    `lm_head`, then the final soft-cap (float32 when soft-capped)."""
    if lm_head is None:
        logits = embedder.decode(hidden)
    else:
        logits = layers.token_einsum("btd,vd->btv", hidden, lm_head[...].astype(hidden.dtype))
    logits = sharding.constrain(
        logits, ("activation_batch", "activation_length", "activation_vocab")
    )
    cap = cfg.final_logit_soft_cap
    return logits if cap is None else jnp.tanh(logits.astype(jnp.float32) / cap) * cap


class DecoderOnly(nnx.Module):
    """A Gemma causal language model: embed -> causal stack -> tied logits (-> soft-cap).

    The t5x-style model API (losses, scoring, decoding) lives in the modules that use it; this
    class is the network only.
    """

    def __init__(self, cfg: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedder = layers.Embedder(
            cfg.vocab_size, cfg.embed_dim, param_dtype=cfg.weight_dtype, rngs=rngs
        )
        self.stack = Stack(cfg, causal=True, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else make_lm_head(cfg, rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] final hidden states -> [B, T, V] logits (float32 when soft-capped)."""
        return output_logits(hidden, self.config, self.embedder, self.lm_head)

    def output_head(self) -> tuple[jax.Array, float | None]:
        """The [V, D] output projection `logits` uses and its final soft-cap (chunked losses)."""
        head = self.embedder.embedding if self.lm_head is None else self.lm_head
        return head[...], self.config.final_logit_soft_cap

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: DecodeCache | None = None,
        rng: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """Next-token logits.

        Args:
          tokens: [B, T] int token ids.
          segment_ids: [B, T]; 0 marks padding, distinct non-zero ids mark packed documents
            (default: all ones).
          positions: [B, T] (default: 0, 1, ... restarting per segment).
          cache: a `DecodeCache`; the T tokens are written at `cache.index`.
          rng: dropout key; None disables dropout.
          return_hidden: return the final-norm hidden states [B, T, D] instead of logits.
        Returns:
          ([B, T, V] logits or [B, T, D] hidden states, the updated cache or None).
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens, jnp.int32)
        if positions is None:
            positions = default_positions(segment_ids)
        x = self.embedder.encode(tokens, self.config.compute_dtype)
        hidden, cache = self.stack(x, positions, segment_ids, cache=cache, rng=rng)
        return (hidden if return_hidden else self.logits(hidden)), cache
