"""Contrastive losses for embedding towers, all switches in one configurable function.

For queries q_i, positives p_i (and optional hard negatives n_ik), with cosine similarity s and
temperature tau, the query -> document loss of row i is

  L_i = -log( e^{s(q_i,p_i)/tau} / ( sum_j m_ij w_ij e^{s(q_i,p_j)/tau}
                                    + sum_k w_ik e^{s(q_i,n_ik)/tau}
                                    [+ sum_{j!=i} m'_ij w_ij e^{s(q_i,q_j)/tau}  (same-tower)] ) )

m masks in-batch "negatives" that duplicate row i's query or positive, w = exp(alpha * stopgrad(s))
up-weights hard negatives (the positive keeps weight 1). The document -> query direction swaps the
roles of q and p (hard negatives are query-side only). A spread-out regulariser penalises
mean_{i != j} (q_i . q_j)^2 (and the same for p). Matryoshka prefixes repeat the loss on the first
d dimensions, each re-normalised, and average with the given weights.

`contrastive_loss` takes global arrays: under `jax.jit` with the batch sharded over devices, XLA
gathers what each device needs, so every row sees the negatives of the whole global batch.
`sharded_contrastive_loss` makes that explicit with `shard_map`: each device keeps its own rows as
anchors, all-gathers the candidates, and holds only a [B_local, B_global] similarity block.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from encdec_adapt.errors import ConfigError

_NEG = -1.0e9


@gin.configurable(module="encdec_adapt")
@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """Switches of the in-batch softmax loss.

    Attributes:
      temperature: tau (used when the model has no learned temperature).
      bidirectional: add the document -> query direction and average the two.
      same_tower_negatives: SamToNe: other rows' queries are negatives of a query (and other
        documents of a document).
      mask_duplicates: drop in-batch negatives whose query or positive id equals the anchor row's.
      hard_negative_alpha: alpha of the hardness weight exp(alpha * stopgrad(s)); 0 is off.
      spread_out_weight: weight of the spread-out regulariser; 0 is off.
      matryoshka_dims: embedding prefixes to train besides the full width (e.g. (512, 256, 128)).
      matryoshka_weights: one weight per entry of (full width, *matryoshka_dims); default equal.
    """

    temperature: float = 0.05
    bidirectional: bool = True
    same_tower_negatives: bool = False
    mask_duplicates: bool = True
    hard_negative_alpha: float = 0.0
    spread_out_weight: float = 0.0
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        n = 1 + len(self.matryoshka_dims)
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != n:
            raise ConfigError(
                f"ContrastiveConfig.matryoshka_weights has {len(self.matryoshka_weights)} "
                f"entries, expected {n} (full width + matryoshka_dims {self.matryoshka_dims})"
            )
        if self.temperature <= 0:
            raise ConfigError(f"ContrastiveConfig.temperature={self.temperature} must be > 0")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _direction_losses(
    anchors: jax.Array,
    targets: jax.Array,
    anchor_ids: jax.Array,
    target_ids: jax.Array,
    row_offset: jax.Array | int,
    cfg: ContrastiveConfig,
    tau: jax.Array,
    hard_negatives: jax.Array | None = None,
    all_anchors: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Per-row losses of local anchors [b, D] against global targets [B, D].

    anchor_ids / target_ids: [B] global duplicate ids of anchors and targets; row_offset: the
    global index of local row 0; hard_negatives: [b, K, D]; all_anchors: [B, D] for same-tower
    negatives; valid: [B] bool, False for rows that only pad the batch (never a candidate).
    Returns [b].
    """
    b, big_b = anchors.shape[0], targets.shape[0]
    rows = row_offset + jnp.arange(b)
    is_self = rows[:, None] == jnp.arange(big_b)[None, :]  # [b, B]
    local_a_ids = jnp.take(anchor_ids, rows)
    local_t_ids = jnp.take(target_ids, rows)
    if cfg.mask_duplicates:
        dup = (anchor_ids[None, :] == local_a_ids[:, None]) | (
            target_ids[None, :] == local_t_ids[:, None]
        )
    else:
        dup = jnp.zeros((b, big_b), bool)
    if valid is not None:
        dup = dup | ~valid[None, :]

    def weighted(s, keep):
        logits = s / tau
        if cfg.hard_negative_alpha:
            logits = logits + cfg.hard_negative_alpha * jax.lax.stop_gradient(s)
        return jnp.where(keep, logits, _NEG)

    s_at = anchors @ targets.T  # [b, B]
    positive = jnp.sum(jnp.where(is_self, s_at, 0.0), axis=1) / tau
    # The positive is in the denominator with weight 1; other targets are weighted negatives.
    terms = [jnp.where(is_self, s_at / tau, weighted(s_at, ~dup))]
    if hard_negatives is not None:
        s_an = jnp.einsum("bd,bkd->bk", anchors, hard_negatives)
        terms.append(weighted(s_an, jnp.ones_like(s_an, bool)))
    if all_anchors is not None:
        s_aa = anchors @ all_anchors.T
        terms.append(weighted(s_aa, ~is_self & ~dup))
    return jax.nn.logsumexp(jnp.concatenate(terms, axis=1), axis=1) - positive


def _spread_out(x: jax.Array, rows: jax.Array, all_x: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum over local valid rows of sum_{valid j != i} (x_i . x_j)^2; [b] and [B] rows ->
    scalar."""
    sim = x @ all_x.T
    off = rows[:, None] != jnp.arange(all_x.shape[0])[None, :]
    off = off & valid[None, :] & jnp.take(valid, rows)[:, None]
    return jnp.sum(jnp.where(off, sim * sim, 0.0))


def _loss_sums(q, p, n, q_ids, p_ids, all_q, all_p, row_offset, cfg, tau, valid):
    """Sums over local valid rows of the per-row loss and of the spread-out term, over all
    prefixes; valid: [B] bool of the global batch."""
    dims = (q.shape[-1], *cfg.matryoshka_dims)
    weights = cfg.matryoshka_weights or (1.0,) * len(dims)
    rows = row_offset + jnp.arange(q.shape[0])
    local_valid = jnp.take(valid, rows).astype(jnp.float32)
    loss_sum = spread_sum = jnp.zeros((), jnp.float32)
    for dim, weight in zip(dims, weights):
        nq, np_, naq, nap = (l2_normalize(x[..., :dim]) for x in (q, p, all_q, all_p))
        nn = None if n is None else l2_normalize(n[..., :dim])
        same = cfg.same_tower_negatives
        per_row = _direction_losses(
            nq, nap, q_ids, p_ids, row_offset, cfg, tau, nn, naq if same else None, valid
        )
        if cfg.bidirectional:
            backward = _direction_losses(
                np_, naq, p_ids, q_ids, row_offset, cfg, tau, None, nap if same else None, valid
            )
            per_row = 0.5 * (per_row + backward)
        loss_sum += weight * jnp.sum(per_row * local_valid)
        if cfg.spread_out_weight:
            spread = _spread_out(nq, rows, naq, valid) + _spread_out(np_, rows, nap, valid)
            spread_sum += weight * spread
    return loss_sum, spread_sum


def _finish(loss_sum, spread_sum, valid, cfg):
    batch = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    loss = loss_sum / batch
    spread = spread_sum / (2 * batch * jnp.maximum(batch - 1, 1.0))
    total = loss + cfg.spread_out_weight * spread
    return total, {"contrastive_loss": loss, "spread_out": spread}


def _default_ids(batch: int) -> jax.Array:
    return jnp.arange(batch, dtype=jnp.int32)


def contrastive_loss(
    queries: jax.Array,
    positives: jax.Array,
    cfg: ContrastiveConfig,
    *,
    negatives: jax.Array | None = None,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    temperature: jax.Array | float | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured loss of a global batch.

    Args:
      queries, positives: [B, D] embeddings (normalised here; any scale).
      negatives: [B, K, D] hard negatives of each query, or None.
      query_ids, positive_ids: [B] int ids equal for duplicate texts (default: all distinct).
      temperature: overrides cfg.temperature (a learned temperature).
      valid: [B] bool, False for rows that only pad the batch: they are neither anchors nor
        candidates, and the mean is over the valid rows (default: all rows).
    Returns:
      (scalar loss, metrics).
    """
    batch = queries.shape[0]
    q_ids = _default_ids(batch) if query_ids is None else query_ids
    p_ids = _default_ids(batch) + batch if positive_ids is None else positive_ids
    tau = cfg.temperature if temperature is None else temperature
    valid = jnp.ones((batch,), bool) if valid is None else valid
    sums = _loss_sums(
        queries, positives, negatives, q_ids, p_ids, queries, positives, 0, cfg, tau, valid
    )
    return _finish(*sums, valid, cfg)


def sharded_contrastive_loss(
    mesh: Mesh, batch_axes: tuple[str, ...] = ("data", "fsdp")
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """`contrastive_loss` with rows sharded over `batch_axes`: anchors stay local, candidates are
    all-gathered, so each device holds a [B / devices, B] similarity block."""

    def loss(
        queries,
        positives,
        cfg,
        *,
        negatives=None,
        query_ids=None,
        positive_ids=None,
        temperature=None,
        valid=None,
    ):
        batch = queries.shape[0]
        q_ids = _default_ids(batch) if query_ids is None else query_ids
        p_ids = _default_ids(batch) + batch if positive_ids is None else positive_ids
        tau = jnp.asarray(cfg.temperature if temperature is None else temperature, jnp.float32)
        valid = jnp.ones((batch,), bool) if valid is None else valid
        rows = P(batch_axes)

        def local(q, p, n, q_ids, p_ids, valid, tau):
            gather = functools.partial(jax.lax.all_gather, axis_name=batch_axes, tiled=True)
            all_q, all_p = gather(q), gather(p)
            all_q_ids, all_p_ids, all_valid = gather(q_ids), gather(p_ids), gather(valid)
            offset = jax.lax.axis_index(batch_axes) * q.shape[0]
            sums = _loss_sums(
                q, p, n, all_q_ids, all_p_ids, all_q, all_p, offset, cfg, tau, all_valid
            )
            return jax.lax.psum(sums, batch_axes)

        n_spec = None if negatives is None else rows
        sums = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(rows, rows, n_spec, rows, rows, rows, P()),
            out_specs=P(),
        )(queries, positives, negatives, q_ids, p_ids, valid, tau)
        return _finish(*sums, valid, cfg)

    return loss
