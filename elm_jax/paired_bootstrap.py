"""Paired bootstrap intervals for the difference of two classifiers scored on the same test examples.

Each side is a matrix of per-example scores ``[S, N]``: ``S`` runs (fine-tuning seeds; a
deterministic method such as the bag-of-words regression has ``S = 1``) on the same ``N`` test
examples (1 where the example is classified correctly, else 0). The statistic is the difference
of mean accuracies::

    delta = mean_{s, i} a[s, i] - mean_{t, i} b[t, i]

Its sampling distribution is estimated by resampling what varies: the test examples (one index
draw ``i*`` shared by both sides, which is what makes the comparison *paired*: an example that
is hard for one model is hard for both) and each side's runs (``s*``, ``t*``, drawn independently
with replacement), ``n_boot`` times::

    delta* = mean(a[s*][:, i*]) - mean(b[t*][:, i*])

The interval is the percentile interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of ``delta*``.
With one run per side this is the ordinary paired bootstrap over examples, whose standard error
tends to ``sd(a_i - b_i) / sqrt(N)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_runs(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name}: expected per-example scores [runs, examples], got shape {np.shape(x)}")
    return a


def paired_difference(a: Any, b: Any, *, level: float = 0.9, n_boot: int = 4000,
                      seed: int = 0) -> dict[str, Any]:
    """``{diff, lo, hi, level, verdict, n_boot, examples, runs_a, runs_b}``: the difference of
    mean accuracies ``a - b``, its paired bootstrap percentile interval (module docstring) and
    ``verdict``: ``'higher'`` (``lo > 0``), ``'lower'`` (``hi < 0``) or ``'unresolved'``.

    ``a`` ``[S, N]`` and ``b`` ``[T, N]`` (or ``[N]`` for one run) hold per-example scores on the
    same ``N`` examples in the same order."""
    a, b = _as_runs(a, "a"), _as_runs(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a paired comparison needs the same examples: {a.shape[1]} != {b.shape[1]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    # per-run sums over a resampled set of examples: counts[i] = times example i was drawn
    for k in range(n_boot):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        sa = a[rng.integers(0, a.shape[0], a.shape[0])] @ counts
        sb = b[rng.integers(0, b.shape[0], b.shape[0])] @ counts
        diffs[k] = (sa.mean() - sb.mean()) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    verdict = "higher" if lo > 0 else "lower" if hi < 0 else "unresolved"
    return {"diff": float(a.mean() - b.mean()), "lo": float(lo), "hi": float(hi), "level": level,
            "verdict": verdict, "n_boot": n_boot, "examples": n, "runs_a": int(a.shape[0]),
            "runs_b": int(b.shape[0])}
