"""Knowledge-distillation losses and the student -> teacher layer mapping (DESIGN §1.4).

ELM pre-trains its supernet against a teacher with *relational* feature losses: the student's
embedding, attention-sublayer and block outputs are projected to the teacher width by learned
linears (one shared projection ``P`` for the embedding and block outputs, one ``P_fam`` per
block family for the attention-sublayer outputs) and compared with the teacher's features of
the mapped teacher layer::

    L = D(E_T, P E_S) + sum_{l active} [ D(A_T^{m(l)}, P_fam(l) A_S^l) + D(H_T^{m(l)}, P H_S^l) ]

``D`` is the Pearson (PKD-style) loss :func:`pearson_feature_loss` (ELM's choice) or plain
:func:`mse_feature_loss` (the baseline). For logits (task fine-tuning) ELM uses DIST
(:func:`dist_logit_loss`); :func:`soft_cross_entropy` is the baseline. A MiniLMv2-style
Q-Q / K-K / V-V relation loss (:func:`attention_relation_loss`) is an extra option.

Every function here is a pure function of jax arrays (jit-able; no Python control flow on
traced values); :class:`KDProjections` holds a student's learned projections as parameters.
All computation is in float32 whatever the input dtype. Feature losses take a token mask
``mask_BxS`` (1 = real token, 0 = padding): padding positions contribute neither to the
normalisation statistics nor to the loss, so the values stored at padded positions never
change a loss.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from elm_jax.arch import FAMILY_INDEX

# Large negative logit for masked keys (finite, so 0 * it stays 0 and gradients stay finite).
_MASK_LOGIT = -1e30
FEATURE_LOSSES = ("mse", "pearson")
_HIGHEST = jax.lax.Precision.HIGHEST


def _token_mask(mask_BxS: jax.Array | None, shape_BxS: tuple[int, ...]) -> jax.Array:
    """The token mask as float32 ``[B, S]`` (all ones when None)."""
    if mask_BxS is None:
        return jnp.ones(shape_BxS, jnp.float32)
    return (mask_BxS != 0).astype(jnp.float32)


# ----------------------------------------------------------------------------------
# Feature losses
# ----------------------------------------------------------------------------------

def mse_feature_loss(student_BxSxD: jax.Array, teacher_BxSxD: jax.Array,
                     mask_BxS: jax.Array | None = None) -> jax.Array:
    """Masked mean squared error over real tokens and channels (the baseline ``D``).

    With ``m[b,s]`` the token mask::

        mse = sum_{b,s,d} m[b,s] (S[b,s,d] - T[b,s,d])^2 / (D * max(1, sum_{b,s} m[b,s]))

    Padded positions are replaced by zero before the product, so even non-finite values there
    cannot leak into the loss.
    """
    s = student_BxSxD.astype(jnp.float32)
    t = teacher_BxSxD.astype(jnp.float32)
    m = _token_mask(mask_BxS, s.shape[:2])
    diff = jnp.where(m[..., None] > 0, s - t, 0.0)
    denom = jnp.maximum(jnp.sum(m), 1.0) * s.shape[-1]
    return jnp.sum(jnp.square(diff)) / denom


def masked_standardize(x_BxSxD: jax.Array, mask_BxS: jax.Array | None = None,
                       eps: float = 1e-6) -> jax.Array:
    """Z-normalises every channel over the real token positions of each example.

    With ``n_b = sum_s m[b,s]``::

        mu[b,d]  = sum_s m[b,s] x[b,s,d] / n_b
        var[b,d] = sum_s m[b,s] (x[b,s,d] - mu[b,d])^2 / n_b        (population variance)
        z[b,s,d] = (x[b,s,d] - mu[b,d]) / sqrt(var[b,d] + eps)

    Padded positions of the result are zero. An example without real tokens gives zeros.
    """
    x = x_BxSxD.astype(jnp.float32)
    m = _token_mask(mask_BxS, x.shape[:2])[..., None]
    x = jnp.where(m > 0, x, 0.0)
    n = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
    mu = jnp.sum(x, axis=1, keepdims=True) / n
    xc = (x - mu) * m
    var = jnp.sum(jnp.square(xc), axis=1, keepdims=True) / n
    return xc * jax.lax.rsqrt(var + eps)


def pearson_feature_loss(student_BxSxD: jax.Array, teacher_BxSxD: jax.Array,
                         mask_BxS: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """ELM's relational (PKD-style Pearson) feature loss.

    Each channel of each example is z-normalised over its real tokens
    (:func:`masked_standardize`: ``z = (x - mu) / sqrt(var + eps)``) for student and teacher,
    then compared with the masked MSE::

        pearson = mse(z(S), z(T), m)
                = sum_{b,s,d} m (z_S - z_T)^2 / (D sum m)

    Per channel this is ``2 (1 - r)`` for the Pearson correlation ``r`` of the channel over
    the tokens (up to ``eps``), hence the name. It is invariant to any per-channel affine
    map ``a x + b`` (``a > 0``) of the student, so a block family need not reproduce the
    teacher's scale -- it keeps the relative structure, which lets different block
    families stay distinguishable during the search.
    """
    zs = masked_standardize(student_BxSxD, mask_BxS, eps)
    zt = masked_standardize(teacher_BxSxD, mask_BxS, eps)
    return mse_feature_loss(zs, zt, mask_BxS)


def feature_loss(kind: str, student_BxSxD: jax.Array, teacher_BxSxD: jax.Array,
                 mask_BxS: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """Dispatch on ``kind``: 'mse' (:func:`mse_feature_loss`) or 'pearson'
    (:func:`pearson_feature_loss`, ``eps`` used)."""
    if kind == "mse":
        return mse_feature_loss(student_BxSxD, teacher_BxSxD, mask_BxS)
    if kind == "pearson":
        return pearson_feature_loss(student_BxSxD, teacher_BxSxD, mask_BxS, eps)
    raise ValueError(f"unknown feature loss kind {kind!r}; choose from {FEATURE_LOSSES}")


# ----------------------------------------------------------------------------------
# Logit losses
# ----------------------------------------------------------------------------------

def _rows(logits: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Flattens ``[..., C]`` logits to ``[N, C]`` float32 and the weights to ``[N]``
    (ones when None); rows of weight 0 get logits 0 so their values never matter."""
    z = logits.astype(jnp.float32).reshape(-1, logits.shape[-1])
    if weights is None:
        w = jnp.ones((z.shape[0],), jnp.float32)
    else:
        w = weights.astype(jnp.float32).reshape(-1)
    z = jnp.where(w[:, None] > 0, z, 0.0)
    return z, w


def _centred_cosine(a: jax.Array, b: jax.Array, axis: int, w: jax.Array | None,
                    eps: float) -> jax.Array:
    """Weighted Pearson correlation along ``axis`` (weights ``w`` broadcast along it)::

        r = sum w (a - a_bar)(b - b_bar) / (sqrt(sum w (a - a_bar)^2) sqrt(sum w (b - b_bar)^2) + eps)

    with weighted means ``a_bar = sum w a / sum w`` (DIST's cosine of centred vectors)."""
    if w is None:
        w = jnp.ones_like(a)
    wsum = jnp.maximum(jnp.sum(w, axis=axis, keepdims=True), 1e-12)
    ac = a - jnp.sum(w * a, axis=axis, keepdims=True) / wsum
    bc = b - jnp.sum(w * b, axis=axis, keepdims=True) / wsum
    num = jnp.sum(w * ac * bc, axis=axis)
    den = jnp.sqrt(jnp.sum(w * ac * ac, axis=axis)) * jnp.sqrt(jnp.sum(w * bc * bc, axis=axis))
    return num / (den + eps)


def dist_logit_loss(student_logits_NxC: jax.Array, teacher_logits_NxC: jax.Array,
                    tau: float = 1.0, weights_N: jax.Array | None = None, *,
                    beta: float = 1.0, gamma: float = 1.0, scale_tau2: bool = True,
                    eps: float = 1e-8) -> jax.Array:
    """DIST (Huang et al. 2022), ELM's relational logit loss.

    With ``p = softmax(z / tau)`` per row, weights ``w_i`` (0 = ignored row) and the Pearson
    correlation ``rho(a, b) = <a - a_bar, b - b_bar> / (|a - a_bar| |b - b_bar| + eps)``::

        inter = 1 - sum_i w_i rho(p_S[i,:], p_T[i,:]) / sum_i w_i      (per row, over classes)
        intra = 1 - mean_c rho_w(p_S[:,c], p_T[:,c])                    (per class, over rows)
        DIST  = (beta * inter + gamma * intra) * (tau^2 if scale_tau2 else 1)

    where ``rho_w`` uses weighted means and sums over the rows. ``scale_tau2`` defaults to
    True as in the reference implementation. Inputs may be ``[..., C]`` (e.g. token
    positions ``[B, S, C]`` with ``weights`` the token mask ``[B, S]``): they are flattened
    to rows.
    """
    zs, w = _rows(student_logits_NxC, weights_N)
    zt, _ = _rows(teacher_logits_NxC, weights_N)
    ps = jax.nn.softmax(zs / tau, axis=-1)
    pt = jax.nn.softmax(zt / tau, axis=-1)
    row_r = _centred_cosine(ps, pt, axis=1, w=None, eps=eps)
    inter = 1.0 - jnp.sum(w * row_r) / jnp.maximum(jnp.sum(w), 1e-12)
    col_r = _centred_cosine(ps, pt, axis=0, w=jnp.broadcast_to(w[:, None], ps.shape), eps=eps)
    intra = 1.0 - jnp.mean(col_r)
    scale = tau * tau if scale_tau2 else 1.0
    return (beta * inter + gamma * intra) * scale


def soft_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array,
                       tau: float = 1.0, weights: jax.Array | None = None) -> jax.Array:
    """Soft-target cross-entropy (Hinton KD), the logit baseline.

    ``p_T = softmax(z_T / tau)``; per row ``ce_i = - sum_c p_T[i,c] log softmax(z_S[i] / tau)_c``;

        soft_ce = tau^2 * sum_i w_i ce_i / sum_i w_i

    Its minimum over the student is at ``z_S = z_T`` (up to a per-row constant), where it
    equals ``tau^2 * H(p_T)`` (the teacher's mean entropy); the ``tau^2`` keeps gradient
    magnitudes comparable across temperatures. Inputs may be ``[..., C]`` (flattened to rows).
    """
    zs, w = _rows(student_logits, weights)
    zt, _ = _rows(teacher_logits, weights)
    pt = jax.nn.softmax(zt / tau, axis=-1)
    ce = -jnp.sum(pt * jax.nn.log_softmax(zs / tau, axis=-1), axis=-1)
    return tau * tau * jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


# ----------------------------------------------------------------------------------
# MiniLMv2 attention relations
# ----------------------------------------------------------------------------------

def _relation_logprobs(x_BxSxW: jax.Array, relation_heads: int, key_mask_Bx1xSxS: jax.Array,
                       ) -> jax.Array:
    """``log softmax(X_r X_r^T / sqrt(d_r))`` over keys, per relation head ``[B, R, S, S]``.

    The concatenated heads are re-split into ``relation_heads`` heads of ``d_r = W / R``."""
    b, s, w = x_BxSxW.shape
    if w % relation_heads:
        raise ValueError(f"relation width {w} is not divisible by relation_heads={relation_heads}")
    d = w // relation_heads
    x = x_BxSxW.astype(jnp.float32).reshape(b, s, relation_heads, d)
    scores = jnp.einsum("bqrd,bkrd->brqk", x, x, precision=_HIGHEST) / jnp.sqrt(float(d))
    scores = jnp.where(key_mask_Bx1xSxS, scores, _MASK_LOGIT)
    return jax.nn.log_softmax(scores, axis=-1)


def attention_relation_loss(student_qkv: Sequence[jax.Array], teacher_qkv: Sequence[jax.Array],
                            mask_BxS: jax.Array | None, relation_heads: int,
                            causal: bool = False) -> jax.Array:
    """MiniLMv2 self-attention relation distillation (Q-Q, K-K, V-V).

    For each ``X`` in (Q, K, V) (``[B, S, W]``, the concatenated heads; student and teacher
    widths may differ) re-split into ``R = relation_heads`` heads of ``d_r = W / R``::

        rel_X[b,r] = softmax(X_r X_r^T / sqrt(d_r))              (over real keys only)
        KL_X       = sum_{b,r,q} m[b,q] sum_k rel_T log(rel_T / rel_S) / (R sum_{b,q} m[b,q])
        loss       = (KL_Q + KL_K + KL_V) / 3

    i.e. KL(teacher || student) averaged over real query positions, relation heads and the
    three relations. Padded keys are masked out of the softmax (``causal=True`` additionally
    masks future keys, for decoders); padded queries carry no weight.
    """
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError("attention_relation_loss takes (q, k, v) tuples for student and teacher")
    b, s, _ = student_qkv[0].shape
    m = _token_mask(mask_BxS, (b, s))
    key_mask = (m > 0)[:, None, None, :]
    if causal:
        key_mask = jnp.logical_and(key_mask, jnp.tril(jnp.ones((s, s), bool))[None, None])
    total = jnp.zeros((), jnp.float32)
    for xs, xt in zip(student_qkv, teacher_qkv):
        ls = _relation_logprobs(xs, relation_heads, key_mask)
        lt = _relation_logprobs(xt, relation_heads, key_mask)
        pt = jnp.exp(lt)
        kl = jnp.sum(jnp.where(key_mask, pt * (lt - ls), 0.0), axis=-1)  # [B, R, S]
        kl = jnp.sum(kl * m[:, None, :])
        total = total + kl / (jnp.maximum(jnp.sum(m), 1.0) * relation_heads)
    return total / 3.0


# ----------------------------------------------------------------------------------
# Layer mapping and the supernet objective
# ----------------------------------------------------------------------------------

def teacher_layer_map(active_L: jax.Array, teacher_layers: int) -> tuple[jax.Array, jax.Array]:
    """Maps each student layer to a teacher layer (DESIGN §1.4).

    The ``l``-th *active* student layer (0-based among the active ones), with
    ``L_s = sum(active)`` active layers and ``k = L_t // L_s``, maps to teacher layer::

        m(l) = (l + 1) * k - 1

    so the last active student layer meets teacher layer ``L_s * k - 1`` (the last one when
    ``L_s`` divides ``L_t``). Skipped layers do not count: skipping a layer renumbers the
    active layers after it and may change ``k``, so the map depends on the whole skip
    pattern, not on a layer's position in the stack. Inactive layers get ``valid = False``
    (and an in-range index). When ``L_s > L_t`` (not a sensible set-up) ``k`` is clamped to
    1 and indices to ``L_t - 1``.

    Jit-able with a traced ``active`` (the rank among active layers is a cumsum).

    Returns:
      (idx int32 [L] in [0, L_t), valid bool [L] == active)
    """
    active = jnp.asarray(active_L).astype(bool)
    rank = jnp.cumsum(active.astype(jnp.int32)) - 1
    n_active = jnp.sum(active.astype(jnp.int32))
    k = jnp.maximum(teacher_layers // jnp.maximum(n_active, 1), 1)
    idx = jnp.clip((rank + 1) * k - 1, 0, teacher_layers - 1)
    idx = jnp.where(active, idx, 0).astype(jnp.int32)
    return idx, active


def _project(x: jax.Array, proj: Mapping[str, jax.Array]) -> jax.Array:
    """``x @ kernel + bias`` in float32 (full matmul precision)."""
    k = jnp.asarray(proj["kernel"], jnp.float32)
    return jnp.matmul(x.astype(jnp.float32), k, precision=_HIGHEST) + jnp.asarray(proj["bias"], jnp.float32)


def _stack_layers(x: Any) -> jax.Array:
    """A tuple/list of per-layer arrays becomes one ``[L, ...]`` array."""
    if isinstance(x, (tuple, list)):
        return jnp.stack(x)
    return jnp.asarray(x)


def supernet_distill_loss(student_embedding_BxSxH: jax.Array, student_block_LxBxSxH: jax.Array,
                          student_attn_by_family: Mapping[str, jax.Array | None],
                          family_L: jax.Array, active_L: jax.Array,
                          teacher_embedding: jax.Array, teacher_attn_outs: Any,
                          teacher_block_outs: Any, mask_BxS: jax.Array | None,
                          projections: Mapping[str, Mapping[str, jax.Array]],
                          kind: str = "pearson") -> tuple[jax.Array, dict[str, jax.Array]]:
    """ELM's supernet pre-training objective (DESIGN §1.4)::

        L = D(E_T, P E_S)
            + sum_{l : active[l]} [ D(A_T^{m(l)}, P_fam(l) A_S^l) + D(H_T^{m(l)}, P H_S^l) ]

    ``D`` = :func:`feature_loss` of ``kind``; ``P x = x @ shared.kernel + shared.bias`` is
    ONE projection (H -> H_t) shared by the embedding and all block outputs; ``P_fam`` is one
    projection per block family for the attention-sublayer outputs (bert: H -> H_t,
    mobilebert: I -> H_t); ``m(l)`` is :func:`teacher_layer_map`.

    Per-layer losses are computed for all ``L`` layers at once (``jax.vmap`` over the
    stacked layer axis) and masked: a layer contributes only when active, and its attention
    term uses only its own family's projection and features (the other family's features
    are zeros there). So the gradient reaching a family's projection is exactly zero when
    the architecture has no active layer of that family.

    Args:
      student_embedding_BxSxH: the student's embedding output ``[B, S, H]``.
      student_block_LxBxSxH: the student's block outputs stacked on the layer axis.
      student_attn_by_family: family name (``'bert'``, ``'mobilebert'``) -> the attention-
        sublayer outputs of that family's layers, stacked ``[L, B, S, H]`` (bert) /
        ``[L, B, S, I]`` (mobilebert), zeros at the other layers; a family may be absent or
        None (not on the menu). A supernet's ``SupernetOutput.layers.attn_<family>``.
      family_L: int ``[L]``, each layer's family index (:data:`FAMILY_INDEX`).
      active_L: bool ``[L]``, which layers are active (may be traced).
      teacher_embedding: ``[B, S, H_t]``.
      teacher_attn_outs, teacher_block_outs: ``[L_t, B, S, H_t]`` (or tuples of ``[B,S,H_t]``,
        as in the dense model's ``ModelOutput``).
      mask_BxS: token mask (1 real, 0 padding) or None.
      projections: ``{'shared': {'kernel', 'bias'}, 'attn_bert': {...}, 'attn_mobilebert':
        {...}}``; a family's entry may be absent when the family is not on the menu
        (:meth:`KDProjections.arrays`).
      kind: 'pearson' (ELM) or 'mse'.

    Returns:
      (loss, {'embedding', 'attn', 'block'}) with ``loss`` the sum of the three parts.
    """
    t_attn = _stack_layers(teacher_attn_outs)
    t_block = _stack_layers(teacher_block_outs)
    teacher_layers = t_block.shape[0]
    idx, valid = teacher_layer_map(active_L, teacher_layers)
    t_attn_l = jnp.take(t_attn, idx, axis=0)
    t_block_l = jnp.take(t_block, idx, axis=0)
    shared = projections["shared"]

    def per_layer(s_all, t_all, proj):
        return jax.vmap(lambda s, t: feature_loss(kind, _project(s, proj), t, mask_BxS))(s_all, t_all)

    emb = feature_loss(kind, _project(student_embedding_BxSxH, shared), teacher_embedding, mask_BxS)
    block_l = per_layer(student_block_LxBxSxH, t_block_l, shared)
    attn_l = jnp.zeros_like(block_l)
    for fam, fidx in FAMILY_INDEX.items():
        feats = student_attn_by_family.get(fam)
        key = f"attn_{fam}"
        if feats is None or key not in projections:
            continue
        loss_f = per_layer(feats, t_attn_l, projections[key])
        attn_l = jnp.where(family_L == fidx, loss_f, attn_l)
    attn = jnp.sum(jnp.where(valid, attn_l, 0.0))
    block = jnp.sum(jnp.where(valid, block_l, 0.0))
    parts = {"embedding": emb, "attn": attn, "block": block}
    return emb + attn + block, parts


def init_projections(rng: jax.Array, hidden: int, inner: int, teacher_hidden: int,
                     families: Iterable[str]) -> dict[str, dict[str, jax.Array]]:
    """Distillation projections: kernels ``N(0, 0.02^2)``, biases zero (float32).

    ``shared``: ``[hidden, teacher_hidden]`` (embedding and block outputs);
    ``attn_bert``: ``[hidden, teacher_hidden]``; ``attn_mobilebert``:
    ``[inner, teacher_hidden]`` -- only for the ``families`` on the menu.
    """
    families = tuple(families)
    for f in families:
        if f not in FAMILY_INDEX:
            raise ValueError(f"unknown family {f!r}; choose from {tuple(FAMILY_INDEX)}")
    in_dim = {"shared": hidden, "attn_bert": hidden, "attn_mobilebert": inner}
    names = ["shared"] + [f"attn_{f}" for f in FAMILY_INDEX if f in families]
    keys = jax.random.split(rng, len(names))
    return {
        name: {"kernel": 0.02 * jax.random.normal(k, (in_dim[name], teacher_hidden), jnp.float32),
               "bias": jnp.zeros((teacher_hidden,), jnp.float32)}
        for name, k in zip(names, keys)
    }


class KDProjections(nnx.Module):
    """The learned distillation projections of a student (:func:`init_projections`), as
    parameters: ``<name>.kernel`` / ``<name>.bias`` for ``name`` in ``shared``,
    ``attn_<family>`` (a student keeps it as its ``proj`` attribute, so the checkpoint paths
    are ``proj.<name>.<kernel|bias>``).

    Args: as :func:`init_projections` (same key, same initial values).
    """

    def __init__(self, rng: jax.Array, hidden: int, inner: int, teacher_hidden: int,
                 families: Iterable[str]):
        proj = init_projections(rng, hidden, inner, teacher_hidden, families)
        self.names = tuple(proj)
        for name, d in proj.items():
            setattr(self, name, nnx.Dict({k: nnx.Param(v) for k, v in d.items()}))

    def arrays(self) -> dict[str, dict[str, jax.Array]]:
        """``{name: {'kernel', 'bias'}}`` (the current values), the ``projections`` argument of
        :func:`supernet_distill_loss`."""
        return {name: {k: v[...] for k, v in getattr(self, name).items()} for name in self.names}
