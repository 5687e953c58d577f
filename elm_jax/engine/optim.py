"""AdamW with linear warm-up and decay, gradient clipping and the weight-decay mask."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from elm_jax.fields import get as get_field


def lr_schedule(tc: Any, total_steps: int) -> optax.Schedule:
    """Linear warm-up then linear decay to zero.

    With peak ``lr = tc.lr``, ``T = total_steps`` and ``W = floor(tc.warmup_frac * T)``::

        lr(t) = lr * t / W                          for 0 <= t < W
        lr(t) = lr * max(0, (T - t) / (T - W))      for t >= W

    so ``lr(0) = 0`` when there is a warm-up, ``lr(W) = lr`` and ``lr(T) = 0``.
    """
    peak = float(tc.lr)
    total = max(int(total_steps), 1)
    warm = int(math.floor(float(get_field(tc, "warmup_frac", 0.0)) * total))
    warm = min(max(warm, 0), total - 1) if total > 1 else 0

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        up = peak * t / max(warm, 1)
        down = peak * jnp.maximum(0.0, (total - t) / (total - warm))
        return jnp.where(t < warm, up, down)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight-decay mask: True for matrices/embeddings, False for biases and norm
    scales (every parameter with ``ndim <= 1``), which should not be pulled to zero."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(tc: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the :func:`lr_schedule`, decoupled weight decay on ``ndim > 1``
    parameters only (:func:`decay_mask`), after global-norm clipping to
    ``tc.clip_norm`` (``0`` = no clipping).

    Fields read: ``lr, warmup_frac, weight_decay, b1, b2, eps, clip_norm``.
    """
    adamw = optax.adamw(
        learning_rate=lr_schedule(tc, total_steps),
        b1=float(get_field(tc, "b1", 0.9)),
        b2=float(get_field(tc, "b2", 0.999)),
        eps=float(get_field(tc, "eps", 1e-6)),
        weight_decay=float(get_field(tc, "weight_decay", 0.0)),
        mask=decay_mask,
    )
    clip = float(get_field(tc, "clip_norm", 0.0) or 0.0)
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), adamw)
    return adamw
