"""Statistics for the replication (RESULTS.md): rank correlations and mean/std summaries.

The rank correlations wrap SciPy (``scipy.stats``; pinned in ``requirements.txt``):

* :func:`kendall_tau` is ``scipy.stats.kendalltau(x, y, variant="b")``, Kendall's tau-b
  ``(C - D) / sqrt((n0 - n1) (n0 - n2))`` over pairs ``i < j``, with ``C``/``D`` the concordant/discordant
  pairs, ``n0 = n (n - 1) / 2`` and ``n1``, ``n2`` the pairs tied in ``x`` and in ``y``.
* :func:`spearman_rho` is ``scipy.stats.spearmanr(x, y)``, the Pearson correlation of the
  average-tie ranks (:func:`average_ranks`, ``scipy.stats.rankdata(x, method="average")``).

Only the statistic is returned (not SciPy's p-value). The edge cases are decided here, before SciPy is
called, so they stay quiet (no ``ConstantInputWarning``/``SmallSampleWarning``): two sequences that are
not 1-D or not of one length raise ``ValueError``; fewer than two points, or a constant sequence, give
NaN; a NaN in either input gives NaN (SciPy's ``nan_policy="propagate"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def _paired(name: str, x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray, bool]:
    """``x``, ``y`` as float64 1-D arrays, and whether the correlation is undefined (NaN).

    Raises ``ValueError`` unless both are 1-D and of one length. Undefined: fewer than two points, or
    either sequence constant (a NaN is not "constant": it propagates through SciPy).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"{name} needs two 1-D sequences of one length, got {x.shape}, {y.shape}")
    undefined = len(x) < 2 or bool(np.all(x == x[0])) or bool(np.all(y == y[0]))
    return x, y, undefined


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long 1-D sequences: ``scipy.stats.kendalltau(x, y, variant="b")``.

    NaN when either sequence is constant or has fewer than two points; ``ValueError`` on bad shapes.
    """
    x, y, undefined = _paired("kendall_tau", x, y)
    if undefined:
        return float("nan")
    return float(stats.kendalltau(x, y, variant="b").statistic)


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span.

    ``scipy.stats.rankdata(x, method="average")`` (a NaN in ``x`` makes every rank NaN).
    """
    return np.asarray(stats.rankdata(np.asarray(x, np.float64), method="average"), np.float64)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average-tie ranks): ``scipy.stats.spearmanr``.

    NaN when either sequence is constant or has fewer than two points; ``ValueError`` on bad shapes.
    """
    x, y, undefined = _paired("spearman_rho", x, y)
    if undefined:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


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
