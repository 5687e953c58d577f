"""How much of the search's ranking is signal: the fitness's standard error from its own rows.

The fitness of a candidate is the ratio estimator ``L = sum_i l_i / sum_i w_i`` over the rows ``i``
of the fixed search batches (``l_i`` a row's summed token loss, ``w_i`` its number of scored
tokens). Taking rows as the independent units, by the delta method, with residuals
``e_i = l_i - L w_i`` over ``R`` rows::

    se(L) = sqrt(R / (R - 1) * sum_i e_i^2) / sum_i w_i

Every candidate is scored on the *same* rows, so a row that is hard for one is hard for all; the
noise that decides a ranking is that of a difference, paired over rows (``d_i = e_a,i - e_b,i``,
the same ``w_i`` for both)::

    se(L_a - L_b) = sqrt(R / (R - 1) * sum_i d_i^2) / sum_i w_i

:func:`population_noise` summarises a set of scored candidates: ``spread`` (the sample sd of
their fitness), ``se`` (the median of ``se(L)``), ``paired_se`` (the median over the others of
``se(L_p - L_best)``) and ``ratio = spread / paired_se``: a search whose candidates differ by
many paired standard errors ranks signal; at a ratio near 1 it ranks noise. :func:`loss_gain`
gives one model's loss below another's (or below the trivial answer's, rows ``[R, 2]``) with
the paired error and its normal interval, for the evaluate stage and the report. Neighbouring rows of
one long document are not quite independent, so these errors are, if anything, a little small.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np


def _residuals(rows_Rx3: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(e [R], L, sum w)`` of one candidate's ``[R, 3]`` rows ``(loss_sum, weight_sum, correct_sum)``;
    rows without a scored token contribute ``e_i = 0`` and do not count in ``R``."""
    rows = np.asarray(rows_Rx3, np.float64)
    loss, weight = rows[:, 0], rows[:, 1]
    total = float(weight.sum())
    if total <= 0:
        raise ValueError("no scored tokens in the rows")
    L = float(loss.sum()) / total
    return loss - L * weight, L, total


def _se(e: np.ndarray, weight: np.ndarray, total: float) -> float:
    r = int((weight > 0).sum())
    if r < 2:
        return float("nan")
    return float(np.sqrt(r / (r - 1) * np.sum(e ** 2)) / total)


def fitness_se(rows_Rx3: np.ndarray) -> float:
    """Standard error of one candidate's fitness ``sum l / sum w`` (module docstring)."""
    e, _, total = _residuals(rows_Rx3)
    return _se(e, np.asarray(rows_Rx3)[:, 1], total)


def paired_se(rows_a: np.ndarray, rows_b: np.ndarray) -> float:
    """Standard error of the difference of two candidates' fitness on the same rows."""
    if np.asarray(rows_a).shape != np.asarray(rows_b).shape or not np.allclose(
            np.asarray(rows_a)[:, 1], np.asarray(rows_b)[:, 1]):
        raise ValueError("a paired standard error needs the same rows (the same scored tokens) for both")
    ea, _, total = _residuals(rows_a)
    eb, _, _ = _residuals(rows_b)
    return _se(ea - eb, np.asarray(rows_a)[:, 1], total)


def loss_gain(rows_a: np.ndarray, rows_b: np.ndarray, level: float = 0.9) -> dict[str, Any]:
    """How much lower ``a``'s loss is than ``b``'s on the same rows, with its paired error:
    ``{gain, se, lo, hi, level, verdict}``, ``gain = L_b - L_a`` (``b`` a baseline or the trivial
    answer), ``se`` = :func:`paired_se`, the normal interval ``gain -/+ z se`` at ``level`` and
    ``verdict`` ``'lower'`` (``lo > 0``: ``a`` beats ``b`` beyond the noise), ``'higher'``
    (``hi < 0``) or ``'within noise'``. Rows are ``[R, 3]`` (or ``[R, 2]``) sums
    ``(loss_sum, weight_sum[, correct_sum])``."""
    a, b = (np.asarray(r, np.float64)[:, :2] for r in (rows_a, rows_b))
    gain = _residuals(b)[1] - _residuals(a)[1]
    se = paired_se(a, b)
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    lo, hi = gain - z * se, gain + z * se
    verdict = "lower" if lo > 0 else "higher" if hi < 0 else "within noise"
    return {"gain": float(gain), "se": float(se), "lo": float(lo), "hi": float(hi), "level": float(level),
            "verdict": verdict}


def population_noise(rows_PxRx3: np.ndarray) -> dict[str, Any]:
    """``{candidates, rows, spread, range, se, paired_se, ratio}`` of ``P`` candidates' rows
    (module docstring); ``ratio`` is ``None`` when fewer than 2 candidates or no paired noise."""
    rows = np.asarray(rows_PxRx3, np.float64)
    if rows.ndim != 3 or rows.shape[-1] != 3 or rows.shape[0] < 1:
        raise ValueError(f"expected rows [P, R, 3], got shape {rows.shape}")
    # a canonical order (lexicographic in the rows): the summary is a function of the *set* of
    # candidates, bit for bit, whatever order a (resumed) search lists them in
    rows = rows[np.lexsort(rows.reshape(rows.shape[0], -1).T[::-1])]
    fit = np.array([_residuals(r)[1] for r in rows])
    best = int(np.argmin(fit))
    se = [fitness_se(r) for r in rows]
    pse = [paired_se(rows[p], rows[best]) for p in range(len(rows)) if p != best]
    spread = float(np.std(fit, ddof=1)) if len(fit) > 1 else 0.0
    med_pse = float(np.median(pse)) if pse else float("nan")
    return {"candidates": int(rows.shape[0]), "rows": int((rows[0, :, 1] > 0).sum()),
            "spread": spread, "range": float(fit.max() - fit.min()),
            "se": float(np.median(se)), "paired_se": med_pse,
            "ratio": spread / med_pse if pse and med_pse > 0 else None}
