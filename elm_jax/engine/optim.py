"""AdamW with linear warm-up and decay, gradient clipping and the weight-decay mask."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from elm_jax.fields import get as get_field


def lr_schedule(tc: Any, total_steps: int) -> optax.Schedule:
    """Linear warm-up, an optional constant stretch, then linear decay to zero.

    With peak ``lr = tc.lr``, ``T = total_steps``, ``W = floor(tc.warmup_frac * T)`` and
    ``D = max(W, floor(tc.decay_start_frac * T))`` (``decay_start_frac`` 0 or absent: ``D = W``,
    the plain warm-up / linear-decay schedule)::

        lr(t) = lr * t / W                          for 0 <= t < W
        lr(t) = lr                                  for W <= t < D
        lr(t) = lr * max(0, (T - t) / (T - D))      for t >= D

    so ``lr(0) = 0`` when there is a warm-up, ``lr(W) = lr`` and ``lr(T) = 0``. A late ``D``
    holds the peak through the MLM teacher's slow phase (see the README's training recipe).
    """
    peak = float(tc.lr)
    total = max(int(total_steps), 1)
    warm = int(math.floor(float(get_field(tc, "warmup_frac", 0.0)) * total))
    warm = min(max(warm, 0), total - 1) if total > 1 else 0
    decay = int(math.floor(float(get_field(tc, "decay_start_frac", 0.0) or 0.0) * total))
    decay = min(max(decay, warm), total - 1) if total > 1 else 0

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        up = peak * t / max(warm, 1)
        down = peak * jnp.minimum(1.0, jnp.maximum(0.0, (total - t) / (total - decay)))
        return jnp.where(t < warm, up, down)

    return schedule


# Parameter roles that weight decay applies to (DESIGN 1.5): weight matrices and embedding
# tables. Biases, LayerNorm / NoNorm scales and offsets are never decayed.
DECAYED_ROLES: tuple[str, ...] = ("kernel", "embedding")


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The names along a pytree key path of a parameter (dict keys, attributes, indices),
    without an ``nnx.Variable``'s own trailing ``value`` field."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    return names


def _role(path: tuple[Any, ...]) -> str:
    """The role of a parameter: the last component of its path; a supernet candidate stack
    ``p.attn__query__kernel`` (``[L, T, ...]``) has the role of its dense name, ``kernel``."""
    names = path_names(path)
    return names[-1].rsplit("__", 1)[-1] if names else ""


def decay_mask(params: Any) -> Any:
    """Weight-decay mask by the parameter's role, not its ``ndim`` (the supernet stacks biases
    and norm scales as ``[L, T, d]``): True for :data:`DECAYED_ROLES` (weight matrices and
    embedding tables), False for biases and norm scales, which should not be pulled to zero."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _role(path) in DECAYED_ROLES, params)


def make_optimizer(tc: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the :func:`lr_schedule`, decoupled weight decay on weight matrices and
    embeddings only (:func:`decay_mask`), after global-norm clipping to
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


# ---------------------------------------------------------------------------------------------
# The sampled-path update (DESIGN 1.5)


class SampledPathState(NamedTuple):
    """State of :func:`sampled_path_adamw`: the global step (learning-rate schedule) and, per
    parameter leaf, one Adam step count per *unit* (its leading unit axes) and the moments."""

    step: jax.Array
    count: Any
    mu: Any
    nu: Any


def _per_unit(x: jax.Array, leaf: jax.Array) -> jax.Array:
    """``x`` of the leaf's unit shape (a prefix of its shape) reshaped to broadcast over it."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (leaf.ndim - x.ndim))


def sampled_path_adamw(tc: Any, total_steps: int,
                       unit_axes: Callable[[tuple[Any, ...], jax.Array], int]
                       ) -> optax.GradientTransformationExtraArgs:
    """AdamW that updates only the parameter tensors a step used, with PyTorch's semantics.

    The unit of the update is a *tensor*: a leaf whose first ``unit_axes(path, leaf)`` axes index
    separate tensors (the supernet's ``[L, T, ...]`` candidate stacks: one tensor per layer and
    candidate) or the whole leaf (``unit_axes = 0``). ``update(grads, state, params, used=...)``
    takes ``used``, a tree like ``params`` of bool arrays of each leaf's unit shape. Gradients are
    first clipped to global norm ``clip_norm`` (:func:`optax.clip_by_global_norm`); then, with the
    global learning rate ``lr_t = schedule(step)`` of :func:`lr_schedule`, per unit:

    - used: ``c += 1``, ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
      ``update = -lr_t (m / (1 - b1^c) / (sqrt(v / (1 - b2^c)) + eps) + wd * decay * p)``
      (AdamW with the unit's own step count ``c``; ``decay`` from :func:`decay_mask`);
    - unused: weights, ``m``, ``v`` and ``c`` unchanged (PyTorch's AdamW skips a parameter
      whose gradient is ``None``; a dense update would move it on stale momentum and decay it).

    With every unit used at every step this is ``optax.adamw`` after clipping, exactly.
    """
    schedule = lr_schedule(tc, total_steps)
    b1, b2 = float(get_field(tc, "b1", 0.9)), float(get_field(tc, "b2", 0.999))
    eps = float(get_field(tc, "eps", 1e-6))
    wd = float(get_field(tc, "weight_decay", 0.0))
    clip = float(get_field(tc, "clip_norm", 0.0) or 0.0)
    clipper = optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()

    def unit_shape(path: tuple[Any, ...], leaf: jax.Array) -> tuple[int, ...]:
        return tuple(leaf.shape[:unit_axes(path, leaf)])

    def init(params: Any) -> SampledPathState:
        count = jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.zeros(unit_shape(path, p), jnp.int32), params)
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return SampledPathState(jnp.zeros((), jnp.int32), count, mu, nu)

    def update(grads: Any, state: SampledPathState, params: Any = None, *, used: Any = None,
               **extra: Any) -> tuple[Any, SampledPathState]:
        del extra
        if params is None or used is None:
            raise ValueError("sampled_path_adamw needs params and used= (the units of this step)")
        grads, _ = clipper.update(grads, clipper.init(params))
        lr = schedule(state.step)
        decay = decay_mask(params)

        def one(g, p, u, c, m, v, d):
            u_leaf = _per_unit(jnp.asarray(u, bool), p)
            c_new = c + jnp.asarray(u, jnp.int32)
            g = g.astype(jnp.float32)
            m_new = jnp.where(u_leaf, b1 * m + (1.0 - b1) * g, m)
            v_new = jnp.where(u_leaf, b2 * v + (1.0 - b2) * g * g, v)
            c_f = _per_unit(jnp.maximum(c_new, 1), p).astype(jnp.float32)
            m_hat = m_new / (1.0 - b1 ** c_f)
            v_hat = v_new / (1.0 - b2 ** c_f)
            step = m_hat / (jnp.sqrt(v_hat) + eps) + (wd * p if d else 0.0)
            return jnp.where(u_leaf, -lr * step, 0.0).astype(p.dtype), c_new, m_new, v_new

        out = jax.tree.map(one, grads, params, used, state.count, state.mu, state.nu, decay)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], params, out)  # noqa: E731
        return pick(0), SampledPathState(state.step + 1, pick(1), pick(2), pick(3))

    return optax.GradientTransformationExtraArgs(init, update)
