"""ELM's dynamic modules: PCA width statistic (DESIGN §1.2) and CKA head analysis (§1.3).

**Dynamic dimension (PCA).** Every ``calc_every`` steps the trainer takes, for the sampled
architecture, each active block's FFN pre-activation ``X W1 + b1`` and records ``k``, the
number of principal components needed to explain more than ``eta`` of its variance
(:func:`pca_components`, :func:`layer_pca_stats`; jit-able, traced architecture). The host
averages ``k`` per (layer, family, candidate) over the epoch (:class:`PCAAccumulator`) and at
the epoch end widens the candidates with the largest mean ``k`` by ``f0``
(:func:`grow_widths`). Widths only grow.

**Dynamic heads (CKA).** Linear CKA between the context outputs of every pair of heads
(:func:`linear_cka`, :func:`head_cka_matrix`); a head that is near-identical (CKA > 0.9) to
an earlier one is redundant (:func:`redundant_heads`) and the head count is reduced to a
divisor of the attention width (:func:`reduced_head_count`). :func:`layer_head_cka` gives the
mean off-diagonal CKA per layer of a traced architecture, for logging during supernet
training. :func:`cka_matrix` is the same CKA between several representations of the same rows
(e.g. tokens), used for the candidate blocks' contributions
(:func:`block_cka`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.arch import FAMILY_INDEX, NUM_FAMILIES, ArchArrays, family_branch
from elm_jax.models.dense import DenseLM
from elm_jax.models.elastic import BLOCK_FNS, Supernet
from elm_jax.models.layers import attention_mask

# Variance share a block's FFN pre-activation must exceed (DESIGN §1.2).
ETA: dict[str, float] = {"bert": 0.99, "mobilebert": 0.9}
CKA_THRESHOLD = 0.9
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------
# PCA width statistic
# ----------------------------------------------------------------------------------

def pca_components(pre_NxF: jax.Array, width: Any, eta: float,
                   token_mask_N: jax.Array | None = None) -> jax.Array:
    """Number of principal components explaining more than ``eta`` of the variance.

    Only the first ``width`` columns of ``pre_NxF`` are real (``width`` may be traced); the
    others are set to exactly zero, which only adds zero eigenvalues. With ``m_n`` the token
    mask, ``n = sum_n m_n``::

        mu     = sum_n m_n x_n / n                                  (column means, real tokens)
        Xc     = m * (X - mu)                                      (padding rows are zero)
        C      = Xc^T Xc / max(n - 1, 1)                           (F x F covariance)
        l_1 >= l_2 >= ... >= l_F >= 0                              (eigenvalues of C, clipped at 0)
        k      = min { j : sum_{i<=j} l_i / sum_i l_i > eta }      (strictly greater)

    ``k = 0`` when the total variance ``sum_i l_i`` is 0; ``k`` is capped at ``width`` (float
    round-off could otherwise leave a cumulative share of ``1 - 1e-7`` below an ``eta``
    extremely close to 1). When there are fewer tokens than columns the ``N x N`` Gram matrix
    ``Xc Xc^T`` is decomposed instead (same non-zero eigenvalues, smaller; a static choice
    on shapes). Computed in float32 with full-precision matmuls.

    Returns:
      int32 scalar ``k``.
    """
    x = jnp.asarray(pre_NxF).astype(jnp.float32)
    n_rows, f = x.shape
    keep = jnp.arange(f) < width
    if token_mask_N is None:
        m = jnp.ones((n_rows,), jnp.float32)
    else:
        m = (jnp.asarray(token_mask_N) != 0).astype(jnp.float32)
    x = jnp.where(jnp.logical_and(keep[None, :], m[:, None] > 0), x, 0.0)
    n = jnp.sum(m)
    mu = jnp.sum(x, axis=0) / jnp.maximum(n, 1.0)
    xc = (x - mu) * m[:, None]
    if n_rows < f:
        gram = jnp.matmul(xc, xc.T, precision=_HIGHEST)
    else:
        gram = jnp.matmul(xc.T, xc, precision=_HIGHEST)
    cov = gram / jnp.maximum(n - 1.0, 1.0)
    eig = jnp.maximum(jnp.linalg.eigvalsh(cov)[::-1], 0.0)  # descending
    total = jnp.sum(eig)
    share = jnp.cumsum(eig) / jnp.where(total > 0, total, 1.0)
    k = jnp.sum((share <= eta).astype(jnp.int32)) + 1
    k = jnp.minimum(k, jnp.asarray(width, jnp.int32))
    return jnp.where(total > 0, k, 0).astype(jnp.int32)


def _per_layer_switch(branches: Sequence[Callable], index_L: jax.Array, xs: Any) -> jax.Array:
    """``lax.scan`` over layers calling ``branches[index_L[l]](xs[l])`` -- only the chosen
    branch runs (``lax.switch``), unlike a vmap which would evaluate every branch."""
    def body(carry, inp):
        i, x = inp
        return carry, jax.lax.switch(i, branches, x)

    _, out = jax.lax.scan(body, None, (index_L, xs))
    return out


def layer_pca_stats(ffn_pre_bert: jax.Array | None, ffn_pre_mobilebert: jax.Array | None,
                    arch: ArchArrays, mask_BxS: jax.Array | None = None,
                    eta: Mapping[str, float] | None = None) -> jax.Array:
    """:func:`pca_components` of every layer with its own family's ``eta`` and width.

    ``ffn_pre_<family>`` is the supernet's stacked FFN pre-activation ``[L, B, S, F_max]``
    (None when the family is not on the menu); layer ``l``'s tokens are the ``B*S``
    positions (padding excluded by ``mask_BxS``), its width ``arch.width[l]``, its
    ``eta = ETA[family]`` (overridable). Inactive layers give 0. Jit-able with a traced
    ``arch``: a ``lax.scan`` over layers whose ``lax.switch`` runs only the layer's own
    family (plus a zero branch for inactive layers / families off the menu).

    Returns:
      int32 ``[L]``.
    """
    eta = dict(ETA if eta is None else eta)
    feats = {"bert": ffn_pre_bert, "mobilebert": ffn_pre_mobilebert}
    some = next((v for v in feats.values() if v is not None), None)
    if some is None:
        raise ValueError("layer_pca_stats needs the FFN pre-activation of at least one family")
    _, b, s, _ = some.shape
    tok_mask = None if mask_BxS is None else jnp.reshape(mask_BxS, (b * s,))
    fams = [f for f in FAMILY_INDEX if feats[f] is not None]
    branches = []
    for f in fams:
        def run(x, f=f):
            pre = x[f]
            return pca_components(pre.reshape(b * s, pre.shape[-1]), x["width"], eta[f], tok_mask)
        branches.append(run)
    branches.append(lambda x: jnp.zeros((), jnp.int32))
    idx = family_branch(fams, arch.family, arch.active)
    xs = {f: feats[f] for f in fams}
    xs["width"] = jnp.asarray(arch.width, jnp.int32)
    return _per_layer_switch(branches, idx, xs)


class PCAAccumulator:
    """Host-side running sums of ``k`` per (layer, family, candidate) over an epoch.

    ``sums [L, 2, T] float64`` and ``counts [L, 2, T] int64`` (family axis = FAMILY_INDEX);
    ``mean = sums / counts`` (NaN where nothing was recorded). The state is a dict of numpy
    arrays (:meth:`state_dict`), so it checkpoints with the training state.
    """

    def __init__(self, num_layers: int, num_candidates: int, num_families: int = NUM_FAMILIES):
        self.sums = np.zeros((num_layers, num_families, num_candidates), np.float64)
        self.counts = np.zeros((num_layers, num_families, num_candidates), np.int64)

    def add(self, k: Any, arch_arrays: ArchArrays) -> None:
        """Adds ``k[l]`` to entry ``(l, family[l], candidate[l])`` of every active layer.

        ``k`` and the ``arch_arrays`` fields are ``[L]`` (or ``[..., L]``, e.g. one row per
        data-parallel shard / population member: every row is added)."""
        k = np.asarray(k, np.float64)
        fam = np.asarray(arch_arrays.family, np.int64)
        cand = np.asarray(arch_arrays.candidate, np.int64)
        active = np.asarray(arch_arrays.active, bool)
        num_layers = self.sums.shape[0]
        if k.shape != fam.shape or k.shape[-1] != num_layers:
            raise ValueError(f"k of shape {k.shape} does not match the architecture's "
                             f"{fam.shape} (last axis must be L={num_layers})")
        layer = np.broadcast_to(np.arange(num_layers), k.shape)
        sel = active
        np.add.at(self.sums, (layer[sel], fam[sel], cand[sel]), k[sel])
        np.add.at(self.counts, (layer[sel], fam[sel], cand[sel]), 1)

    def mean(self) -> np.ndarray:
        """``sums / counts`` float64 ``[L, 2, T]``, NaN where the count is 0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)

    def reset(self) -> None:
        """Clears the statistics (call at each epoch end, after :func:`grow_widths`)."""
        self.sums[...] = 0.0
        self.counts[...] = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"sums": self.sums.copy(), "counts": self.counts.copy()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "PCAAccumulator":
        sums = np.asarray(state["sums"], np.float64)
        counts = np.asarray(state["counts"], np.int64)
        if sums.shape != counts.shape or sums.ndim != 3:
            raise ValueError(f"PCAAccumulator state: sums {sums.shape} / counts {counts.shape} "
                             f"must both be [L, families, T]")
        acc = cls(sums.shape[0], sums.shape[2], sums.shape[1])
        acc.sums[...] = sums
        acc.counts[...] = counts
        return acc


def grow_widths(widths: Any, acc: PCAAccumulator, num_add: int, f0: int, max_widths: Any,
                families_on_menu: Iterable[str | int],
                mean_params_fn: Callable[[], float] | None = None,
                upper_params: float | None = None,
                ) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """The epoch-end widening step of the dynamic dimension module (DESIGN §1.2).

    1. Budget check: when ``upper_params`` is given and ``mean_params_fn()`` (the caller's
       mean parameter count of 1000 random architectures under the current widths) exceeds
       it, nothing grows.
    2. Entries ``(l, fam, cand)`` of a family on the menu with ``count > 0`` and
       ``widths < max_widths`` are sorted by mean ``k`` descending, ties by ``(l, fam, cand)``
       ascending (deterministic); the first ``num_add`` are widened::

           new = min(old + f0, max)

    Widths never shrink. Neither input is modified (reset the accumulator yourself).

    Returns:
      (new widths int32 ``[L, 2, T]``, list of ``(l, fam_index, cand, old, new)`` Python ints
      in the sorted order).
    """
    w = np.array(widths, dtype=np.int32, copy=True)
    if upper_params is not None:
        if mean_params_fn is None:
            raise ValueError("grow_widths: upper_params needs mean_params_fn")
        if float(mean_params_fn()) > float(upper_params):
            return w, []
    caps = np.broadcast_to(np.asarray(max_widths, np.int64), w.shape)
    fam_ok = np.zeros(w.shape[1], bool)
    for f in families_on_menu:
        fam_ok[FAMILY_INDEX[f] if isinstance(f, str) else int(f)] = True
    mean = acc.mean()
    entries = []
    for l, fam, cand in zip(*np.nonzero(acc.counts > 0)):
        if fam_ok[fam] and w[l, fam, cand] < caps[l, fam, cand]:
            entries.append((-float(mean[l, fam, cand]), int(l), int(fam), int(cand)))
    entries.sort()
    grown = []
    for _, l, fam, cand in entries[:max(int(num_add), 0)]:
        old = int(w[l, fam, cand])
        new = max(old, min(old + int(f0), int(caps[l, fam, cand])))
        w[l, fam, cand] = new
        grown.append((l, fam, cand, old, new))
    return w, grown


# ----------------------------------------------------------------------------------
# CKA head analysis
# ----------------------------------------------------------------------------------

def _cka_from_grams(k_hsic: jax.Array, diag_k: jax.Array, diag_l: jax.Array) -> jax.Array:
    den = jnp.sqrt(jnp.maximum(diag_k * diag_l, 0.0))
    return jnp.where(den > 0, k_hsic / jnp.where(den > 0, den, 1.0), 0.0)


def linear_cka(x_NxD: jax.Array, y_NxE: jax.Array) -> jax.Array:
    """Linear CKA (Kornblith et al. 2019) with the biased HSIC estimator.

    ``K = X X^T``, ``L = Y Y^T`` (rows = examples), ``H = I - 1/n``::

        HSIC(K, L) = tr(K H L H) / (n - 1)^2
        CKA        = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

    Computed as ``tr(Kc Lc)`` with ``Kc = Xc Xc^T`` for column-centred ``Xc = H X`` (equal to
    ``tr(K H L H)``; the ``(n-1)^2`` cancels). 1 for identical inputs; invariant to
    orthogonal transforms and isotropic scaling of either input; 0 when either input has
    no variance. Float32, full-precision matmuls.
    """
    x = jnp.asarray(x_NxD, jnp.float32)
    y = jnp.asarray(y_NxE, jnp.float32)
    xc = x - jnp.mean(x, axis=0, keepdims=True)
    yc = y - jnp.mean(y, axis=0, keepdims=True)
    kc = jnp.matmul(xc, xc.T, precision=_HIGHEST)
    lc = jnp.matmul(yc, yc.T, precision=_HIGHEST)
    return _cka_from_grams(jnp.sum(kc * lc), jnp.sum(kc * kc), jnp.sum(lc * lc))


def cka_matrix(feats_CxNxD: jax.Array, weights_N: jax.Array | None = None) -> jax.Array:
    """Linear CKA between every pair of ``C`` representations of the same ``N`` rows.

    Rows with weight 0 (e.g. padding tokens) are dropped: each representation's columns are
    centred over the kept rows (``Xc``), then, for representations ``a, b``::

        CKA[a, b] = ||Xc_b^T Xc_a||_F^2 / (||Xc_a^T Xc_a||_F ||Xc_b^T Xc_b||_F)

    (equal to :func:`linear_cka`: ``||Xc_b^T Xc_a||_F^2 = tr(Kc_a Kc_b)``). Computed in the
    smaller of the two spaces (``D x D`` cross-covariances when ``D < N``, else ``N x N`` Gram
    matrices). 1 on the diagonal; 0 where a representation has no variance. ``weights_N``
    holds 0/1 row weights (``None``: all rows). Float32, full-precision matmuls.

    Returns:
      float32 ``[C, C]``, symmetric.
    """
    z = jnp.asarray(feats_CxNxD, jnp.float32)
    _, n, d = z.shape
    w = (jnp.ones((n,), jnp.float32) if weights_N is None
         else (jnp.asarray(weights_N) != 0).astype(jnp.float32))
    mean = jnp.einsum("cnd,n->cd", z, w, precision=_HIGHEST) / jnp.maximum(jnp.sum(w), 1.0)
    zc = (z - mean[:, None, :]) * w[None, :, None]
    if d < n:
        cross = jnp.einsum("and,bne->abde", zc, zc, precision=_HIGHEST)
        hsic = jnp.sum(jnp.square(cross), axis=(2, 3))
        diag = jnp.diagonal(hsic)
        return _cka_from_grams(hsic, diag[:, None], diag[None, :])
    return _cka_of_grams(jnp.einsum("and,amd->anm", zc, zc, precision=_HIGHEST))


def _head_grams(ctx_BxSxW: jax.Array, heads: int, mask_BxS: jax.Array | None) -> jax.Array:
    """Centred Gram matrices ``[heads, B, B]`` of each head's per-example flattened context."""
    x = jnp.asarray(ctx_BxSxW, jnp.float32)
    b, s, w = x.shape
    if w % heads:
        raise ValueError(f"context width {w} is not divisible by heads={heads}")
    if mask_BxS is not None:
        x = jnp.where(jnp.asarray(mask_BxS)[..., None] != 0, x, 0.0)
    xh = x.reshape(b, s, heads, w // heads).transpose(2, 0, 1, 3).reshape(heads, b, -1)
    xh = xh - jnp.mean(xh, axis=1, keepdims=True)
    return jnp.einsum("hae,hce->hac", xh, xh, precision=_HIGHEST)


def _cka_of_grams(grams_HxBxB: jax.Array) -> jax.Array:
    hsic = jnp.einsum("hab,gab->hg", grams_HxBxB, grams_HxBxB, precision=_HIGHEST)
    d = jnp.diagonal(hsic)
    return _cka_from_grams(hsic, d[:, None], d[None, :])


def head_cka_matrix(ctx_BxSxW: jax.Array, heads: int, mask_BxS: jax.Array | None = None) -> jax.Array:
    """Linear CKA between every pair of attention heads (DESIGN §1.3).

    Head ``h``'s context is columns ``[h W/heads, (h+1) W/heads)`` of ``ctx`` (the supernet's
    ``ctx_*`` / ``softmax(Q_h K_h^T / sqrt(d)) V_h``); each example is one row: its ``S * d``
    values flattened, padding positions zeroed. Then ``CKA[j, k] = linear_cka(X_j, X_k)``
    over the batch of ``B`` examples (see :func:`linear_cka`), via the ``B x B`` Gram
    matrices of the heads. ``heads`` is static.

    Returns:
      float32 ``[heads, heads]``, symmetric, ones on the diagonal (0 for a constant head).
    """
    return _cka_of_grams(_head_grams(ctx_BxSxW, heads, mask_BxS))


def grouped_head_cka(ctx_BxSxW: jax.Array, heads: jax.Array, base_heads: int,
                     mask_BxS: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`head_cka_matrix` for a *traced* head count (a divisor of ``base_heads``).

    Merged head ``j`` is the concatenation of base heads ``j g .. (j+1) g - 1``
    (``g = base_heads / heads``), so its centred Gram matrix is the sum of theirs:
    ``K_j = sum_{b in group j} K_b``. Rows/columns ``>= heads`` are padding.

    Returns:
      (cka ``[base_heads, base_heads]`` with zeros outside ``[:heads, :heads]``,
      valid bool ``[base_heads]`` = ``arange < heads``)
    """
    grams = _head_grams(ctx_BxSxW, base_heads, mask_BxS)
    heads = jnp.asarray(heads, jnp.int32)
    g = base_heads // jnp.maximum(heads, 1)
    gid = jnp.arange(base_heads) // g
    member = (gid[None, :] == jnp.arange(base_heads)[:, None]).astype(jnp.float32)
    merged = jnp.einsum("jb,bac->jac", member, grams, precision=_HIGHEST)
    valid = jnp.arange(base_heads) < heads
    cka = _cka_of_grams(merged)
    return jnp.where(valid[:, None] & valid[None, :], cka, 0.0), valid


def layer_head_cka(ctx_bert: jax.Array | None, ctx_mobilebert: jax.Array | None,
                   arch: ArchArrays, base_heads: int,
                   mask_BxS: jax.Array | None = None) -> jax.Array:
    """Mean off-diagonal head CKA per layer of a traced architecture (for logging).

    For layer ``l`` with ``h = arch.heads[l]`` merged heads (:func:`grouped_head_cka` on its
    family's stacked context ``ctx_<family>[l]``)::

        mean_offdiag = sum_{j != k < h} CKA[j, k] / (h (h - 1))

    NaN for inactive layers and layers with one head (nothing to compare). A ``lax.scan``
    with ``lax.switch`` runs only each layer's own family.

    Returns:
      float32 ``[L]``.
    """
    feats = {"bert": ctx_bert, "mobilebert": ctx_mobilebert}
    fams = [f for f in FAMILY_INDEX if feats[f] is not None]
    if not fams:
        raise ValueError("layer_head_cka needs the attention context of at least one family")

    def offdiag(cka, valid, h):
        pair = (valid[:, None] & valid[None, :]) & ~jnp.eye(base_heads, dtype=bool)
        hf = h.astype(jnp.float32)
        return jnp.where(h > 1, jnp.sum(jnp.where(pair, cka, 0.0)) / jnp.maximum(hf * (hf - 1), 1.0),
                         jnp.nan)

    branches = []
    for f in fams:
        def run(x, f=f):
            cka, valid = grouped_head_cka(x[f], x["heads"], base_heads, mask_BxS)
            return offdiag(cka, valid, x["heads"])
        branches.append(run)
    branches.append(lambda x: jnp.full((), jnp.nan, jnp.float32))
    idx = family_branch(fams, arch.family, arch.active)
    xs = {f: feats[f] for f in fams}
    xs["heads"] = jnp.asarray(arch.heads, jnp.int32)
    return _per_layer_switch(branches, idx, xs)


def redundant_heads(cka: Any, threshold: float = CKA_THRESHOLD) -> list[bool]:
    """Head ``k`` is redundant when some earlier head ``j < k`` has ``CKA(j, k) > threshold``
    (DESIGN §1.3: heads ``k > j`` with ``CKA(j, k) > 0.9`` are redundant with ``j``).
    Head 0 is never redundant."""
    c = np.asarray(cka, np.float64)
    h = c.shape[0]
    return [bool(k > 0 and np.any(c[:k, k] > threshold)) for k in range(h)]


def reduced_head_count(cka: Any, width: int, threshold: float = CKA_THRESHOLD,
                       allowed: Iterable[int] | None = None) -> int:
    """The new head count: ``n`` = number of non-redundant heads (:func:`redundant_heads`),
    reduced to the largest divisor ``d`` of the attention ``width`` with ``d <= n`` (and
    ``d`` in ``allowed`` when given, e.g. the search space's head menu). At least 1; when
    ``allowed`` has no divisor ``<= n``, its smallest divisor of ``width`` (so the result is
    always allowed), and 1 if it has none at all."""
    n = max(1, sum(1 for r in redundant_heads(cka, threshold) if not r))
    divs = [d for d in range(1, int(width) + 1) if width % d == 0]
    if allowed is not None:
        allowed = {int(a) for a in allowed}
        divs = [d for d in divs if d in allowed]
    if not divs:
        return 1
    below = [d for d in divs if d <= n]
    return max(below) if below else min(divs)


def mean_offdiag_cka(cka: Any) -> float:
    """Mean of the off-diagonal entries ``sum_{j != k} CKA[j, k] / (h (h - 1))`` (host
    float, for logging); NaN for fewer than two heads."""
    c = np.asarray(cka, np.float64)
    h = c.shape[0]
    if h < 2:
        return float("nan")
    return float((c.sum() - np.trace(c)) / (h * (h - 1)))


def cka_head_counts(model: DenseLM, batches: list[dict], threshold: float = 0.9,
                    allowed: tuple[int, ...] | None = None) -> list[dict]:
    """DESIGN §1.3 on a dense model: per layer, linear CKA between its heads' contexts over the
    given batches' examples; heads ``k > j`` with ``CKA(j, k) > threshold`` are redundant and the
    new head count is the number of non-redundant heads reduced to a divisor of the width."""
    ctxs = [model(b["inputs"], b["mask"], b["segment_ids"], return_internals=True).head_ctx
            for b in batches]
    out = []
    for i, spec in enumerate(model.cfg.blocks):
        ctx = jax.numpy.concatenate([c[i] for c in ctxs])  # [N, S, heads, d]
        mask = jax.numpy.concatenate([jax.numpy.asarray(b["mask"]) for b in batches])
        ctx = ctx.reshape(*ctx.shape[:2], -1)
        cka = np.asarray(head_cka_matrix(ctx, spec.heads, mask))
        width = model.cfg.hidden if spec.family != "mobilebert" else model.cfg.inner
        new = reduced_head_count(cka, width, threshold, allowed)
        out.append({"layer": i, "heads": spec.heads, "new_heads": min(new, spec.heads),
                    "mean_offdiag_cka": mean_offdiag_cka(cka)})
    return out


# ----------------------------------------------------------------------------------
# Block CKA: how alike the candidate blocks of a layer compute (logged by the supernet stage)
# ----------------------------------------------------------------------------------

def block_cka_matrix(net: Supernet, embedding: jax.Array, block_outs_L: jax.Array,
                     widths: jax.Array, mask_BxS: jax.Array | None = None) -> jax.Array:
    """Per layer, the linear CKA between the *contributions* of every pair of candidate blocks.

    At layer ``l`` every candidate block on the menu (every family in ``net.families`` order,
    candidates ``0 .. T-1`` within each: index ``i = family position * T + candidate``), at its
    current width (``widths``, the ``[L, 2, T]`` widths state) and the full base head count,
    runs on the same input ``x_l``: the layer's input under the sampled architecture (the
    embedding for layer 0, else ``block_outs_L[l - 1]``). Its contribution is what it adds to
    the residual stream, ``C_i = block_i(x_l) - x_l``, an ``[N, H]`` matrix over the ``N`` real
    (``mask == 1``) tokens. With ``Cc_i`` = ``C_i`` with its columns centred over those tokens::

        CKA_l[i, j] = ||Cc_j^T Cc_i||_F^2 / (||Cc_i^T Cc_i||_F ||Cc_j^T Cc_j||_F)

    (:func:`cka_matrix`). It is 1 when two candidates' contributions are the
    same up to a rotation and an isotropic scale (e.g. shared weights at the same width) and
    near 0 when they are unrelated; it compares the structure of what the candidates add over
    the tokens, not its size. The input ``x_l`` that every output carries through the residual
    connection is subtracted, so it does not count as similarity (an uncentred cosine between
    the outputs ``block_i(x_l)`` is close to 1 whenever ``x_l`` dominates them, whatever the
    candidates compute). Caveat: a post-LN BERT block's output is a LayerNorm of
    ``x_l + update``, not ``x_l + update``, so its contribution also holds LayerNorm's change
    of ``x_l``, which is partly common to all BERT candidates.

    Returns:
      float32 ``[L, C, C]`` with ``C = len(net.families) * T``; symmetric, ones on the diagonal
      (0 for a candidate whose contribution has no variance).
    """
    space, t = net.space, net.template
    amask = attention_mask(mask_BxS, embedding.shape[1], t.causal)
    tok = (None if mask_BxS is None else jnp.asarray(mask_BxS).reshape(-1))
    inputs = jnp.concatenate([embedding[None], block_outs_L[:-1]], axis=0)  # [L, B, S, H]
    stacked = {f: {k: v[...] for k, v in net.blocks[f].p.items()} for f in net.families}
    heads = jnp.asarray(space.base_heads, jnp.int32)
    widths = jnp.asarray(widths, jnp.int32)

    def layer(carry, xs):
        x, p_all, w = xs  # [B, S, H], {family: {name: [T, ...]}}, [2, T]
        contribs = []
        for f in net.families:
            def one(p, width, f=f):
                y = BLOCK_FNS[f](p, x, amask, width, heads, space.base_heads, t.ln_eps)[0]
                return y.astype(jnp.float32) - x.astype(jnp.float32)
            contribs.append(jax.vmap(one)(p_all[f], w[FAMILY_INDEX[f]]))  # [T, B, S, H]
        c = jnp.concatenate(contribs)
        return carry, cka_matrix(c.reshape(c.shape[0], -1, c.shape[-1]), tok)

    _, cka = jax.lax.scan(layer, None, (inputs, stacked, widths))
    return cka


def mean_offdiag(cka_LxCxC: jax.Array) -> jax.Array:
    """``sum_{i != j} CKA[..., i, j] / (C (C - 1))`` over the last two axes (NaN for ``C < 2``)."""
    c = cka_LxCxC.shape[-1]
    off = jnp.sum(cka_LxCxC, axis=(-2, -1)) - jnp.trace(cka_LxCxC, axis1=-2, axis2=-1)
    return off / (c * (c - 1)) if c > 1 else jnp.full(off.shape, jnp.nan, jnp.float32)


def block_cka(net: Supernet, embedding: jax.Array, block_outs_L: jax.Array,
              widths: jax.Array, mask_BxS: jax.Array | None = None) -> jax.Array:
    """Per layer, the mean off-diagonal :func:`block_cka_matrix`: the mean linear CKA between
    the contributions ``block_i(x_l) - x_l`` of every pair of distinct candidate blocks on the
    same input. Higher = the candidates compute more alike functions (1: all the same up to
    rotation and scale); lower = more distinguishable, which the relational distillation loss
    is meant to protect (DESIGN §1.4). Float32 ``[L]``."""
    return mean_offdiag(block_cka_matrix(net, embedding, block_outs_L, widths, mask_BxS))
