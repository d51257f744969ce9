"""Token-level losses: cross-entropy with z-loss and label smoothing, and KL for distillation.

Every loss here returns *sums* over tokens together with the sum of weights, so that callers
choose the normaliser (tokens in the micro-batch, in the global batch, or a constant as t5x's
`loss_normalizing_factor`) and gradient accumulation stays exact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenLoss(NamedTuple):
    """Weighted sums over the tokens of a batch (float32 scalars).

    loss: cross-entropy (+ z-loss) summed over tokens; z_loss: the z-loss part of it;
    weight: sum of the loss weights; correct: weighted count of argmax == target.
    """

    loss: jax.Array
    z_loss: jax.Array
    weight: jax.Array
    correct: jax.Array


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> TokenLoss:
    """Softmax cross-entropy of integer targets, summed over weighted tokens.

    Args:
      logits: [B, T, V] (any float dtype; computed in float32).
      targets: [B, T] int token ids.
      weights: [B, T] loss weights (0 for padding); default: targets > 0.
      z_loss: coefficient of z_loss * log(Z)^2 per token (PaLM), which keeps the softmax
        normaliser near 1 and the logits from drifting.
      label_smoothing: mass spread uniformly over the other V - 1 classes; the constant entropy
        of the smoothed target is subtracted so that a perfect prediction has loss 0 (as t5x).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}")
    if weights is None:
        weights = (targets > 0).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if label_smoothing:
        on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        # -sum_v q_v log p_v with q = on at the target and off elsewhere.
        sum_logits = jnp.sum(logits, axis=-1)
        nll = log_z - on * target_logit - off * (sum_logits - target_logit)
        entropy = -(on * jnp.log(on) + (vocab - 1) * off * jnp.log(off + 1e-20))
        nll = nll - entropy
    else:
        nll = log_z - target_logit
    zl = z_loss * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return TokenLoss(
        loss=jnp.sum((nll + zl) * weights),
        z_loss=jnp.sum(zl * weights),
        weight=jnp.sum(weights),
        correct=jnp.sum(correct * weights),
    )


def kl_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """Sum over weighted tokens of KL(teacher || student), both softened by `temperature`.

    Args:
      student_logits, teacher_logits: [B, T, V] over the same vocabulary.
      weights: [B, T].
    Returns:
      A float32 scalar; multiplied by temperature^2 so gradients keep their scale (Hinton et al.).
      The teacher receives no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {student_logits.shape} and teacher logits "
            f"{teacher_logits.shape} differ"
        )
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_t = jax.nn.log_softmax(t, axis=-1)
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)  # [B, T]
    return jnp.sum(kl * weights.astype(jnp.float32)) * temperature**2
