"""The generative models: decoder-only LM, T5Gemma encoder-decoder, and PrefixLM distillation.

Each is a `base.BaseModel` (the model API every runtime component calls) around a network (an
nnx.Module such as `transformer.DecoderOnly`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from encdec_adapt.errors import ConfigError
from encdec_adapt.models import decoding, losses, vocab_loss
from encdec_adapt.models.base import BaseModel, Batch, decoder_weights
from encdec_adapt.nn.config import EncoderDecoderConfig, GemmaConfig
from encdec_adapt.nn.encdec import EncoderDecoder
from encdec_adapt.nn.transformer import Block, DecoderOnly, apply_scan


def _check_number(owner: str, name: str, value: Any, low: float, high: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value < high:
        raise ConfigError(f"{owner}.{name}={value!r} must be a number in [{low}, {high})")


REMAT_POLICIES = {
    "none": None,
    # recompute everything in the backward pass: least memory
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep matmul outputs, recompute the cheap element-wise ops
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_REMAT_CLASSES: dict = {}


def _sequenced_remat(fn):
    """`fn(state, args, kwargs)` rematerialised: the forward pass saves only the inputs and the
    backward pass recomputes `fn` from them.

    Unlike `jax.checkpoint`, the recomputation depends on the incoming cotangent: XLA (CPU)
    drops optimization barriers before scheduling and then ran the recomputations of all
    layers of a scanned group side by side, holding all their activations at once (4.2 GB at
    4,096 tokens in the t5gemma_270m_270m scan body). Adding `0 * g[first element]` to the
    first float input is exact for finite cotangents and makes the order a data dependency.
    """

    @jax.custom_vjp
    def remat_call(state, args, kwargs):
        return fn(state, args, kwargs)

    def call_fwd(state, args, kwargs):
        return fn(state, args, kwargs), (state, args, kwargs)

    def call_bwd(res, g):
        state, args, kwargs = res
        g_leaves = [x for x in jax.tree.leaves(g) if jnp.issubdtype(x.dtype, jnp.floating)]
        if g_leaves and args and jnp.issubdtype(args[0].dtype, jnp.floating):
            tie = jnp.zeros((), args[0].dtype) * g_leaves[0].reshape(-1)[0].astype(args[0].dtype)
            args = (args[0] + tie, *args[1:])
        _, vjp = jax.vjp(fn, state, args, kwargs)
        return vjp(g)

    remat_call.defvjp(call_fwd, call_bwd)
    return remat_call


def _remat_class(cls: type, policy_name: str) -> type:
    """A subclass of a transformer block class whose training call is rematerialised.

    Calls with a decode cache (inference) run unchanged.
    """
    key = (cls, policy_name)
    if key not in _REMAT_CLASSES:
        policy = REMAT_POLICIES[policy_name]

        def __call__(self, *args, **kwargs):
            if kwargs.get("cache") is not None:
                return cls.__call__(self, *args, **kwargs)
            if policy_name == "full":
                graphdef, state = nnx.split(self)
                return _sequenced_remat(
                    lambda st, a, kw: cls.__call__(nnx.merge(graphdef, st), *a, **kw)
                )(state, args, kwargs)
            fn = nnx.remat(lambda m, a, kw: cls.__call__(m, *a, **kw), policy=policy)
            return fn(self, args, kwargs)

        _REMAT_CLASSES[key] = type(f"Remat{cls.__name__}", (cls,), {"__call__": __call__})
    return _REMAT_CLASSES[key]


def apply_remat(module: nnx.Module, policy_name: str) -> nnx.Module:
    """Rematerialises every transformer block of `module` (activation memory of one block per
    layer instead of all its intermediates), in place. Parameters are untouched, so a remat and
    a plain model share checkpoints."""
    if policy_name not in REMAT_POLICIES:
        raise ConfigError(f"remat={policy_name!r} (expected one of {sorted(REMAT_POLICIES)})")
    if policy_name == "none":
        return module
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Block) and not type(node).__name__.startswith("Remat"):
            node.__class__ = _remat_class(type(node), policy_name)
    return module


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(BaseModel):
    """A Gemma causal LM (`transformer.DecoderOnly`) trained on next-token prediction.

    Reads decoder_input_tokens, decoder_target_tokens, decoder_loss_weights and, when packed,
    decoder_segment_ids / decoder_positions (seqio's DecoderFeatureConverter). A
    `decoder_causal_attention` feature (prefix-LM) is accepted, and the prefix is attended
    causally: the loss weights already restrict the loss to the targets.

    Attributes:
      config: the network's GemmaConfig (usually %MODEL_CONFIG from models/).
      z_loss: coefficient of the log(Z)^2 auxiliary loss.
      label_smoothing: uniform label smoothing of the cross-entropy.
      remat: rematerialisation of the transformer blocks in training: "none", "full" or "dots"
        (keep matmul outputs).
      scan_layers: run the layers as a `jax.lax.scan` over attention-pattern periods in
        training and scoring (compiles one period instead of every layer; same parameters).
      loss_chunk_tokens: the training loss computes logits this many tokens at a time and never
        holds [B, T, V] (models/vocab_loss.py); None (default): only when B * T * V > 2**28;
        0: never.
    """

    config: GemmaConfig = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    remat: str = "none"
    scan_layers: bool = False
    loss_chunk_tokens: int | None = None

    model_type = "decoder_only"
    features = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
    can_predict = True

    def __post_init__(self):
        if not isinstance(self.config, GemmaConfig):
            raise ConfigError(
                f"DecoderOnlyModel.config must be a GemmaConfig (e.g. %MODEL_CONFIG from a "
                f"models/ file), got {self.config!r}"
            )
        _check_number("DecoderOnlyModel", "z_loss", self.z_loss, 0.0, float("inf"))
        _check_number("DecoderOnlyModel", "label_smoothing", self.label_smoothing, 0.0, 1.0)
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"DecoderOnlyModel.remat={self.remat!r} must be one of {sorted(REMAT_POLICIES)}"
            )

    def build(self, rngs: nnx.Rngs) -> DecoderOnly:
        net = apply_remat(DecoderOnly(self.config, rngs=rngs), self.remat)
        return apply_scan(net, self.scan_layers)

    def logits(
        self, module: DecoderOnly, batch: Batch, rng: jax.Array | None, return_hidden=False
    ) -> jax.Array:
        logits, _ = module(
            batch["decoder_input_tokens"],
            segment_ids=batch.get("decoder_segment_ids"),
            positions=batch.get("decoder_positions"),
            rng=rng,
            return_hidden=return_hidden,
        )
        return logits

    def predict_batch(self, module, batch, decode_cfg, rng=None) -> decoding.Decoded:
        """Continues each row's prompt (`decoding.decoder_only_prompts`: the prefix-LM inputs,
        or the whole row when no position has a loss weight); KV cache, fixed shapes."""
        prompts, lengths = decoding.decoder_only_prompts(batch)
        step_fn, init_logits, state = decoding.decoder_only_start(
            module, prompts, lengths, decode_cfg.max_decode_len
        )
        return decoding.decode(step_fn, init_logits, state, decode_cfg, rng)

    def flops_per_token(self, lengths: dict[str, int]) -> float:
        """6 * matmul params + attention (12 * layers * T * heads * head_dim), per token."""
        c = self.config
        attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
        ffw = 3 * c.embed_dim * c.hidden_dim
        logits = c.vocab_size * c.embed_dim
        t = lengths.get("targets", lengths.get("inputs", 0))
        per_layer_attn = 12 * c.num_heads * c.head_dim * t / 2  # causal: half the scores
        return 6 * (c.num_layers * (attn + ffw) + logits) + c.num_layers * per_layer_attn


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(BaseModel):
    """A T5Gemma encoder-decoder (`encdec.EncoderDecoder`) trained on targets given inputs.

    Reads encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
    decoder_loss_weights and, when packed, encoder/decoder segment ids and positions (seqio's
    EncDecFeatureConverter).

    Attributes:
      config: an EncoderDecoderConfig (%MODEL_CONFIG of a models/t5gemma_*.gin file).
      z_loss, label_smoothing, remat, scan_layers, loss_chunk_tokens: as DecoderOnlyModel.
      decoder_start_id: first decoder input when generating: 0 for models trained here (seqio
        shifts targets right with 0), 2 (BOS) for released HF T5Gemma checkpoints.
    """

    config: Any = None
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    remat: str = "none"
    scan_layers: bool = False
    loss_chunk_tokens: int | None = None
    decoder_start_id: int = 0

    model_type = "encoder_decoder"
    features = (
        "encoder_input_tokens",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
    )
    can_predict = True

    def __post_init__(self):
        if not isinstance(self.config, EncoderDecoderConfig):
            raise ConfigError(
                f"EncoderDecoderModel.config must be an EncoderDecoderConfig (e.g. %MODEL_CONFIG "
                f"from models/t5gemma_*.gin), got {type(self.config).__name__}"
            )
        _check_number("EncoderDecoderModel", "z_loss", self.z_loss, 0.0, float("inf"))
        _check_number("EncoderDecoderModel", "label_smoothing", self.label_smoothing, 0.0, 1.0)
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"EncoderDecoderModel.remat={self.remat!r} must be one of {sorted(REMAT_POLICIES)}"
            )

    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        net = apply_remat(EncoderDecoder(self.config, rngs=rngs), self.remat)
        return apply_scan(net, self.scan_layers)

    def logits(
        self, module: nnx.Module, batch: Batch, rng: jax.Array | None, return_hidden=False
    ) -> jax.Array:
        return module(
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            decoder_positions=batch.get("decoder_positions"),
            rng=rng,
            return_hidden=return_hidden,
        )

    def predict_batch(self, module, batch, decode_cfg, rng=None) -> decoding.Decoded:
        """Decodes from `encoder_input_tokens` (cross-attention K/V projected once, KV cache)."""
        step_fn, init_logits, state = decoding.encoder_decoder_start(
            module,
            batch["encoder_input_tokens"],
            decode_cfg.max_decode_len,
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_start_id=self.decoder_start_id,
        )
        return decoding.decode(step_fn, init_logits, state, decode_cfg, rng)

    def flops_per_token(self, lengths: dict[str, int]) -> float:
        """Training FLOPs per *target* token: the encoder's work is spread over the targets."""
        enc, dec = self.config.encoder, self.config.decoder
        s, t = lengths.get("inputs", 0), lengths.get("targets", 0)

        def stack(c, length, causal, cross=0):
            attn = c.embed_dim * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
            ffw = 3 * c.embed_dim * c.hidden_dim
            scores = 12 * c.num_heads * c.head_dim * (length / 2 if causal else length)
            cross_flops = 0.0
            if cross:
                cross_flops = 6 * attn + 12 * c.num_heads * c.head_dim * cross
            return c.num_layers * (6 * (attn + ffw) + scores + cross_flops)

        per_target = stack(dec, t, True, cross=s) + 6 * dec.vocab_size * dec.embed_dim
        return per_target + stack(enc, s, False) * s / max(t, 1)


class _Pair(nnx.Module):
    """A student network and a frozen teacher network, one parameter tree."""

    def __init__(self, student: nnx.Module, teacher: nnx.Module):
        self.student = student
        self.teacher = teacher


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class DistillationModel(BaseModel):
    """PrefixLM knowledge distillation from a decoder-only teacher into an encoder-decoder.

    The teacher runs in the same step on the concatenated sequence (the row's non-padding
    encoder inputs, then the targets); its distributions at the positions that predict each
    target token are the KD targets. Loss per target token:
        (1 - kd_weight) * cross_entropy + kd_weight * KL(teacher || student) at `temperature`.
    The teacher's parameters live under `teacher/` of the state and are frozen by the trainer
    (`frozen_patterns`); initialise them with `teacher_checkpoint` (a params_io directory).

    Attributes:
      student: an EncoderDecoderModel.
      teacher: a DecoderOnlyModel over the same vocabulary.
      teacher_checkpoint: params checkpoint of the teacher (loaded on a fresh start).
      kd_weight: mix between cross-entropy (0) and KL (1).
      temperature: softmax temperature of both distributions for the KL.
    """

    student: Any = None
    teacher: Any = None
    teacher_checkpoint: str | None = None
    kd_weight: float = 0.5
    temperature: float = 1.0

    model_type = "distillation"
    frozen_patterns = ("^teacher/",)
    teacher_subtree = "teacher"
    warm_start_subtree = "student"

    def __post_init__(self):
        if not isinstance(self.student, EncoderDecoderModel):
            raise ConfigError(
                f"DistillationModel.student must be an EncoderDecoderModel, got {self.student!r}"
            )
        if not isinstance(self.teacher, DecoderOnlyModel):
            raise ConfigError(
                f"DistillationModel.teacher must be a DecoderOnlyModel, got {self.teacher!r}"
            )
        sv, tv = self.student.config.decoder.vocab_size, self.teacher.config.vocab_size
        if sv != tv:
            raise ConfigError(f"student vocab_size {sv} != teacher vocab_size {tv}")
        _check_number("DistillationModel", "kd_weight", self.kd_weight, 0.0, 1.0 + 1e-9)
        _check_number("DistillationModel", "temperature", self.temperature, 1e-6, float("inf"))

    @property
    def config(self):
        return self.student.config

    @property
    def z_loss(self):
        return self.student.z_loss

    @property
    def label_smoothing(self):
        return self.student.label_smoothing

    def build(self, rngs: nnx.Rngs) -> _Pair:
        return _Pair(self.student.build(rngs), self.teacher.build(rngs))

    def submodel(self, name: str) -> BaseModel:
        if name == "student":
            return self.student
        if name == "teacher":
            return self.teacher
        return super().submodel(name)

    def export(self, params):
        """The student (the model that was trained) and its parameters."""
        return self.student, params["student"]

    def logits(self, module: _Pair, batch: Batch, rng: jax.Array | None) -> jax.Array:
        return self.student.logits(module.student, batch, rng)

    def flops_per_token(self, lengths: dict[str, int]) -> float:
        teacher = self.teacher.flops_per_token(
            {"targets": lengths.get("inputs", 0) + lengths.get("targets", 0)}
        )
        return self.student.flops_per_token(lengths) + teacher / 3  # forward only

    def teacher_logits(
        self, teacher: nnx.Module, batch: Batch, return_hidden: bool = False
    ) -> jax.Array:
        """[B, T, V] teacher logits predicting each decoder target token.

        With the data pipeline's teacher features (`EncDecConverter(teacher=True)`:
        teacher_input_tokens = [bos] + prefix + targets, teacher_loss_weights = 1 from the
        first target on) the teacher reads exactly that sequence; otherwise it reads the row's
        non-padding encoder inputs followed by the targets (`teacher_target_logits`).
        """
        if "teacher_input_tokens" in batch:
            logits = self.teacher.logits(
                teacher,
                {"decoder_input_tokens": batch["teacher_input_tokens"]},
                None,
                return_hidden,
            )
            split = jnp.argmax(batch["teacher_loss_weights"] > 0, axis=1)  # [B]
            t = batch["decoder_target_tokens"].shape[1]
            pos = jnp.minimum(split[:, None] + jnp.arange(t)[None, :], logits.shape[1] - 1)
            return jnp.take_along_axis(logits, pos[..., None], axis=1)
        return teacher_target_logits(
            lambda tokens: self.teacher.logits(
                teacher, {"decoder_input_tokens": tokens}, None, return_hidden
            ),
            batch["encoder_input_tokens"],
            batch["decoder_target_tokens"],
        )

    def loss_fn(self, module, batch, rng, normalizer=None):
        weights = decoder_weights(batch)
        chunk = self.student.loss_chunk(module.student, batch)
        if chunk:  # never materialises [B, T, V] logits (models/vocab_loss.py)
            (s_head, s_cap), (t_head, t_cap) = (
                m.output_head() for m in (module.student, module.teacher)
            )
            tl, kd = vocab_loss.distillation(
                self.student.logits(module.student, batch, rng, return_hidden=True),
                s_head,
                self.teacher_logits(module.teacher, batch, return_hidden=True),
                t_head,
                batch["decoder_target_tokens"],
                weights,
                student_soft_cap=s_cap,
                teacher_soft_cap=t_cap,
                chunk_tokens=chunk,
                temperature=self.temperature,
                z_loss=self.z_loss,
                label_smoothing=self.label_smoothing,
            )
        else:
            tl, student_logits = self.student.token_loss(module.student, batch, rng)
            teacher_logits = jax.lax.stop_gradient(self.teacher_logits(module.teacher, batch))
            kd = losses.kl_divergence(
                student_logits, teacher_logits, weights, temperature=self.temperature
            )
        if normalizer is None:
            normalizer = jnp.maximum(tl.weight, 1.0)
        total = (1.0 - self.kd_weight) * tl.loss + self.kd_weight * kd
        metrics = {
            "loss_sum": tl.loss,
            "z_loss_sum": tl.z_loss,
            "kd_sum": kd,
            "weight": tl.weight,
            "correct": tl.correct,
        }
        return total / normalizer, metrics

    def eval_fn(self, module, batch):
        return self.student.eval_fn(module.student, batch)

    def score_batch(self, module, batch):
        return self.student.score_batch(module.student, batch)


def teacher_target_logits(logits_fn, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Runs a decoder-only `logits_fn` on [inputs (non-padding, left-aligned), targets] and
    returns the logits that predict each target token.

    Args:
      logits_fn: [B, L] tokens -> [B, L, V].
      inputs: [B, S] encoder input tokens, padding (0) at the end of each row.
      targets: [B, T] decoder target tokens.
    Returns:
      [B, T, V]: for target t, the logits at sequence position n_inputs - 1 + t, where the
      teacher has seen the whole prefix and targets[:t]. Rows without inputs use position 0.
    """
    b, s = inputs.shape
    t = targets.shape[1]
    n_in = jnp.sum(inputs != 0, axis=1)  # [B]
    j = jnp.arange(s + t)[None, :]  # [1, S + T]
    from_inputs = jnp.take_along_axis(inputs, jnp.minimum(j, s - 1).repeat(b, 0), axis=1)
    tgt_idx = jnp.clip(j - n_in[:, None], 0, t - 1)
    from_targets = jnp.take_along_axis(targets, tgt_idx, axis=1)
    tokens = jnp.where(j < n_in[:, None], from_inputs, from_targets)  # [B, S + T]
    tokens = jnp.where(j - n_in[:, None] < t, tokens, 0)
    logits = logits_fn(tokens)  # [B, S + T, V]
    pos = jnp.maximum(n_in[:, None] - 1 + jnp.arange(t)[None, :], 0)  # [B, T]
    return jnp.take_along_axis(logits, pos[..., None], axis=1)
