"""The multi-objective output of the search: Pareto fronts and sets of the found architectures
(loss vs. parameters, and vs. latency when a latency table exists).
"""


from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elm_jax.fileio import atomic_write_bytes


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points, lower is better in both coordinates
    ``(quality, cost)``, sorted by cost (then quality, then index).

    A point is on the front iff no other point is ``<=`` in both coordinates and ``<`` in at
    least one (identical points are all on it). Non-finite points are never on it.
    Sweep in ``O(n log n)``: after sorting by ``(cost, quality)``, point ``i`` is on the front
    iff its quality is the minimum of its equal-cost group and strictly below the best quality
    of all cheaper points.
    """
    pts = [(float(q), float(c), i) for i, (q, c) in enumerate(points)
           if math.isfinite(float(q)) and math.isfinite(float(c))]
    pts.sort(key=lambda t: (t[1], t[0], t[2]))
    front: list[int] = []
    best_cheaper = math.inf
    k = 0
    while k < len(pts):
        cost = pts[k][1]
        group_min = pts[k][0]  # sorted: the first of the group has its min quality
        j = k
        while j < len(pts) and pts[j][1] == cost:
            q, _, i = pts[j]
            if q == group_min and q < best_cheaper:
                front.append(i)
            j += 1
        best_cheaper = min(best_cheaper, group_min)
        k = j
    return front


def pareto_sets(entries: Sequence[Mapping[str, Any]], quality: str = "score") -> dict[str, list[int]]:
    """``{cost_key: front indices}`` of ``entries`` (dicts with ``quality`` and the costs) for
    ``params`` and, when every entry has one, ``latency_ms``."""
    out = {"params": pareto_front([(e[quality], e["params"]) for e in entries])}
    if entries and all(e.get("latency_ms") is not None for e in entries):
        out["latency_ms"] = pareto_front([(e[quality], e["latency_ms"]) for e in entries])
    return out


def plot_pareto(entries: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                quality: str = "score", ylabel: str = "validation loss") -> Path:
    """Writes a PNG (atomically): per cost (parameters, and latency when every entry has one)
    every scored architecture as a grey dot, the Pareto front as a step line, and each budget's
    best (entries with a non-empty ``best_for`` list of budget names) as a labelled star."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(entries)
    costs = ["params"] + (["latency_ms"] if entries and all(e.get("latency_ms") is not None
                                                            for e in entries) else [])
    fig, axes = plt.subplots(1, len(costs), figsize=(6.4 * len(costs), 4.6), squeeze=False)
    fronts = pareto_sets(entries, quality)
    for ax, cost in zip(axes[0], costs):
        x = np.array([e[cost] for e in entries], np.float64)
        y = np.array([e[quality] for e in entries], np.float64)
        ax.scatter(x, y, s=12, c="0.65", label=f"scored ({len(entries)})", zorder=1)
        idx = fronts[cost]
        if idx:
            ax.step(x[idx], y[idx], where="post", c="C0", lw=1.5, marker="o", ms=4,
                    label=f"Pareto front ({len(idx)})", zorder=2)
        for n, e in enumerate(entries):
            for name in e.get("best_for") or ():
                ax.scatter([x[n]], [y[n]], marker="*", s=180, zorder=3, edgecolors="k",
                           label=f"best: {name}")
                ax.annotate(name, (x[n], y[n]), textcoords="offset points", xytext=(6, 6), fontsize=8)
        ax.set_xlabel("parameters" if cost == "params" else "predicted latency (ms)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ELM search: quality vs. cost")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
