"""Hand-designed baselines of a budget, like for like with the found model (DESIGN 8).

A baseline is a **uniform** model: every active layer the same block ``family`` with all base
heads, the first ``depth`` layers active, and one FFN width ``ffn`` (a multiple of ``f0``, or the
family's cap) on every active layer. Two per family and budget:

- ``baseline_largest``: the uniform model with the most parameters that satisfies **every** bound
  of the budget (parameters, FLOPs and latency), read by the search's own checker
  (:class:`~elm_jax.search.constraints.Constraints`); what a practitioner would hand-design to
  fill a budget.
- ``baseline_matched``: the uniform model satisfying every bound whose parameter count is nearest
  to the found model's, ``argmin |params - params_found|`` (ties: fewer parameters), so a found
  model wins or loses by its architecture, not its size. ``param_gap = params - params_found``
  is recorded beside every comparison.

Both are realised with the supernet's weights, like the found model (same inherited
initialisation, same retraining): layer ``l`` takes the candidate of ``family`` with the smallest
grown width ``>= ffn`` (its first ``ffn`` hidden units were all trained; the widest one when none
is that wide) and the widths state gets that candidate's entry set to ``ffn``, so
``extract(net, baseline.widths, baseline.arch)`` is the model and ``count_params(space, arch,
widths)`` its exact size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from elm_jax.arch import FAMILY_INDEX, Arch, LayerChoice
from elm_jax.search.constraints import Constraints
from elm_jax.space import SearchSpace

#: The baseline kinds, as written to ``export/result.json`` (``kind``) and read by the report.
KINDS = ("baseline_largest", "baseline_matched")

#: ``widths -> (arch -> predicted latency ms)``: the latency table's prediction at a widths state,
#: or ``None`` when no table is available (then a budget with latency bounds is refused).
LatencyFor = Callable[[np.ndarray], Callable[[Arch], float]]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """One uniform model: ``arch`` extracted at ``widths``, ``measures`` its ``params``,
    ``flops`` (and ``latency_ms``), ``depth`` and ``ffn`` the hand-designed choice."""

    kind: str
    family: str
    depth: int
    ffn: int
    arch: Arch
    widths: np.ndarray
    measures: dict[str, float]

    @property
    def params(self) -> int:
        return int(self.measures["params"])


def ffn_choices(space: SearchSpace, family: str) -> tuple[int, ...]:
    """The FFN widths a uniform baseline may take: ``f0, 2 f0, ...`` up to the family's cap,
    and the cap itself (the widths a widths state may hold)."""
    cap = space.max_ffn_of(family)
    return tuple(sorted(set(range(space.f0, cap + 1, space.f0)) | {cap}))


def uniform(space: SearchSpace, widths: Any, family: str, depth: int, ffn: int) -> tuple[Arch, np.ndarray]:
    """The uniform ``family`` architecture of ``depth`` active layers at FFN width ``ffn``, and
    the widths state it is extracted at (see the module docstring for the candidate choice)."""
    w = np.array(space.validate_widths(widths), copy=True)
    f = FAMILY_INDEX[family]
    layers = []
    for l in range(space.layers):
        grown = w[l, f]
        wide_enough = np.flatnonzero(grown >= ffn)
        j = int(wide_enough[np.argmin(grown[wide_enough])]) if wide_enough.size else int(np.argmax(grown))
        if l < depth:
            w[l, f, j] = ffn
        layers.append(LayerChoice(family, j, space.base_heads, l < depth))
    return space.validate(Arch(tuple(layers))), space.validate_widths(w)


def _feasible(space: SearchSpace, widths: Any, family: str, budget: Mapping[str, Any], seq_len: int,
              latency_for: LatencyFor | None, kind: str) -> list[Baseline]:
    """Every uniform model of ``family`` that satisfies every bound of ``budget``."""
    lo = space.min_layers if space.elastic_depth else space.layers
    out = []
    for depth in range(lo, space.layers + 1):
        for ffn in ffn_choices(space, family):
            arch, w = uniform(space, widths, family, depth, ffn)
            lat = latency_for(w) if latency_for is not None else None
            c = Constraints.from_budget(budget, space, w, seq_len, latency_fn=lat)
            if c.ok(arch):
                out.append(Baseline(kind, family, depth, ffn, arch, w, dict(c.measures(arch))))
    return out


def _budget(budget: Mapping[str, Any], family: str) -> dict[str, Any]:
    b = dict(budget)
    b.setdefault("name", f"uniform_{family}")  # ``{}``: a budget no longer in the config
    return b


def largest_uniform(space: SearchSpace, widths: Any, family: str, budget: Mapping[str, Any],
                    seq_len: int, latency_for: LatencyFor | None = None) -> Baseline | None:
    """The ``baseline_largest`` of ``budget`` (most parameters; ties: shallower, then narrower),
    or ``None`` when no uniform ``family`` model satisfies every bound or ``family`` is not on
    the menu. A budget with latency bounds needs ``latency_for`` (else
    :class:`~elm_jax.search.constraints.SearchError`, as in the search)."""
    if family not in space.families:
        return None
    found = _feasible(space, widths, family, _budget(budget, family), seq_len, latency_for,
                      "baseline_largest")
    return max(found, key=lambda b: (b.params, -b.depth, -b.ffn), default=None)


def matched_uniform(space: SearchSpace, widths: Any, family: str, budget: Mapping[str, Any],
                    seq_len: int, target_params: int,
                    latency_for: LatencyFor | None = None) -> Baseline | None:
    """The ``baseline_matched`` of ``budget``: the uniform ``family`` model satisfying every
    bound with ``|params - target_params|`` smallest (ties: fewer parameters, then shallower),
    or ``None`` as for :func:`largest_uniform`."""
    if family not in space.families:
        return None
    found = _feasible(space, widths, family, _budget(budget, family), seq_len, latency_for,
                      "baseline_matched")
    return min(found, key=lambda b: (abs(b.params - int(target_params)), b.params, b.depth), default=None)
