"""Token-level losses shared by MLM and CLM training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The metrics derived from :func:`weighted_cross_entropy`'s sums, as engine ratios
# ``{name: (numerator, denominator)}``: token-mean loss and accuracy over the whole eval set.
LM_RATIOS: dict[str, tuple[str, str]] = {"loss": ("loss_sum", "weight_sum"),
                                          "correct": ("correct_sum", "weight_sum")}


def weighted_cross_entropy(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array
) -> dict[str, jax.Array]:
    """Weighted token cross-entropy, returned as sums so shards and steps add up.

    With ``p = softmax(z)`` computed in float32 through ``log_softmax``::

        loss_sum    = - sum_{b,l} w[b,l] * log p[b,l, y[b,l]]
        weight_sum  =   sum_{b,l} w[b,l]
        correct_sum =   sum_{b,l} w[b,l] * [argmax_v z[b,l,v] == y[b,l]]

    The mean loss is ``loss_sum / weight_sum`` (perplexity ``exp`` of it for CLM). Sums
    rather than means let callers aggregate exactly over devices, micro-batches and
    evaluation batches. ``weights`` is 0 for positions that carry no target (padding,
    unmasked MLM positions); target ids at such positions may be anything valid.

    Args:
      logits_BxLxV: logits of any float dtype.
      targets_BxL: integer target ids.
      weights_BxL: per-token weights (bool or float).

    Returns:
      dict with float32 scalars ``loss_sum``, ``weight_sum``, ``correct_sum``.
    """
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    tgt = targets_BxL.astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    w = weights_BxL.astype(jnp.float32)
    correct = (jnp.argmax(logits_BxLxV, axis=-1) == tgt).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(nll * w),
        "weight_sum": jnp.sum(w),
        "correct_sum": jnp.sum(correct * w),
    }


def scored_cross_entropy(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """:func:`weighted_cross_entropy` of a batch's LM logits: ``logits_BxKxV`` at the scored
    positions against ``targets_k`` / ``weights_k`` when the batch carries ``positions`` (the
    model was called with ``head_positions_BxK=batch['positions']``, see
    :func:`head_positions`), else ``logits_BxLxV`` against ``targets`` / ``weights``. The sums
    are the same either way (every scored position is among the gathered ones)."""
    if "positions" in batch:
        return weighted_cross_entropy(logits, batch["targets_k"], batch["weights_k"])
    return weighted_cross_entropy(logits, batch["targets"], batch["weights"])


def head_positions(batch: dict) -> jax.Array | None:
    """The positions at which a batch's LM loss needs logits (``batch['positions']``, MLM
    batches with ``data.max_predictions``), or ``None``: every position."""
    return batch.get("positions")
