"""Statistics for the replication (RESULTS.md): rank correlations and mean/std summaries.

Both rank correlations are the textbook definitions, written out so the replication has no
SciPy dependency:

* Kendall's tau-b over pairs ``i < j``:
  ``tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))`` with ``C``/``D`` concordant/discordant pairs,
  ``n0 = n (n - 1) / 2`` and ``n1``, ``n2`` the pairs tied in ``x`` and in ``y``.
* Spearman's rho: the Pearson correlation of the (average-tie) ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences (NaN when either is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-D sequences of one length, got {x.shape}, {y.shape}")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = len(i)
    n1, n2 = int(np.sum(dx == 0)), int(np.sum(dy == 0))
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float(np.sum(dx * dy) / denom) if denom > 0 else float("nan")


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    start = 0
    for k in range(1, len(x) + 1):
        if k == len(x) or sx[k] != sx[start]:
            ranks[order[start:k]] = (start + 1 + k) / 2.0
            start = k
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average-tie ranks)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.shape != ry.shape:
        raise ValueError("spearman_rho needs two sequences of one length")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and count, NaNs dropped."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std (n=k)`` (just ``mean (n=1)`` for one value), or ``-`` when nothing finished."""
    m, s, n = mean_std(values)
    if n == 0:
        return "-"
    if digits == 0:
        return f"{m:,.0f}" + (f" ± {s:,.0f}" if n > 1 else "") + f" (n={n})"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if n > 1 else "") + f" (n={n})"
