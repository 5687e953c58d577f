"""Budgets as constraints: THE parser of ``search.budgets`` and THE feasibility test.

:func:`parse_budget` / :func:`parse_budgets`: the one reading of a budget entry (a dict with a
  directory-safe ``name`` and optional non-negative ``min_/max_`` ``params``, ``flops`` per
  sequence of ``data.seq_len``, ``latency_ms``; ``min <= max``) and of the list (non-empty,
  unique names). ``config.validate``, ``preflight.check_budgets``, :meth:`Constraints.from_budget`
  and the search stage all call them, so a budget is read by one piece of code and rejected
  with one reason.
:func:`check_reachable`: the one test of params / FLOPs bounds against reachable ranges, used
  by :func:`check_feasible` (the search, at the supernet's widths) and the preflight check (the
  initial widths' lows and the maximum widths' highs, before the supernet exists).
:class:`Constraints`: a budget as ``ok(arch)`` and a relative ``violation(arch)``.

Every :class:`SearchError` raised here carries ``field`` (e.g. ``search.budgets[0].max_params``,
or ``budgets['small'].max_params`` for a lone budget), ``reason`` and ``got`` (the offending value
as text, or ``None``); its message is ``"<field>: <reason> (got <got>)"``, so the config
validation re-raises it as ``config.<message>``.
"""


from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from elm_jax import arch as arch_lib
from elm_jax.accounting import count_flops, count_params, reachable_ranges
from elm_jax.arch import Arch
from elm_jax.space import SearchSpace

QUANTITIES = ("params", "flops", "latency_ms")
BOUND_KEYS = tuple(f"{m}_{q}" for q in QUANTITIES for m in ("min", "max"))
#: Names a budget may not take: its outputs would collide with the teacher's
#: (``evaluate/result.json``, ``retrain/<name>``, ...).
RESERVED_NAMES = ("teacher",)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_NAME_RULE = "must be a directory-safe name (letters, digits, '_', '.', '-'), not 'teacher'"


class SearchError(ValueError):
    """A search that cannot run as configured (impossible budget, no legal architecture, a state
    file of a different search); the message names the budget or field and what to change.

    Raised for one field (:func:`field_error`), it has ``field``, ``reason`` and ``got`` (the
    value as text, ``None`` when there is none to show) and the message
    ``"<field>: <reason> (got <got>)"``; otherwise those three are ``None``."""

    def __init__(self, message: str, *, field: str | None = None, reason: str | None = None,
                 got: str | None = None) -> None:
        super().__init__(message)
        self.field, self.reason, self.got = field, reason, got


_NO_VALUE = object()


def field_error(field: str, reason: str, value: Any = _NO_VALUE, *, got: str | None = None) -> SearchError:
    """The :class:`SearchError` of one bad field: ``"<field>: <reason> (got <value!r>)"``
    (``got`` overrides the ``repr``; neither: no ``(got ...)``)."""
    if got is None and value is not _NO_VALUE:
        got = repr(value)
    return SearchError(f"{field}: {reason}" + ("" if got is None else f" (got {got})"),
                       field=field, reason=reason, got=got)


def _num(v: float) -> str:
    """A bound as text: ``1,000`` for integral values, else ``1,234.5``."""
    v = float(v)
    return f"{int(v):,}" if v.is_integer() else f"{v:,}"


def budget_field(budget: Any) -> str:
    """The field a lone budget's errors are reported under: ``budgets['<name>']`` (``budget``
    when it has no string name)."""
    name = budget.get("name") if hasattr(budget, "keys") else None
    return f"budgets[{name!r}]" if isinstance(name, str) else "budget"


def parse_budget(budget: Any, field: str | None = None) -> tuple[str, dict[str, float]]:
    """THE parser of one budget entry: ``(name, bounds)``, ``bounds`` the given (not ``None``)
    ``min_/max_`` ``params`` / ``flops`` / ``latency_ms`` as floats.

    Raises :class:`SearchError` naming ``field`` (default :func:`budget_field`) or its key
    (``<field>.max_params``) when the entry is not a dict with a ``name``, the name is not
    directory-safe or is reserved (:data:`RESERVED_NAMES`), a key is unknown, a bound is not a
    non-negative number (NaN and -inf included), a minimum is infinite, or a minimum exceeds
    its maximum. ``max_<q>=inf`` is accepted and means no upper bound: it is dropped from
    ``bounds``, exactly as if the key were left out (so no infinity reaches the search or its
    JSON outputs)."""
    field = budget_field(budget) if field is None else field
    if not hasattr(budget, "keys") or "name" not in budget:
        raise field_error(field, "must be a dict with a 'name'", budget)
    name = budget["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in RESERVED_NAMES:
        raise field_error(f"{field}.name", _NAME_RULE, name)
    allowed = {"name", *BOUND_KEYS}
    bad = sorted(set(budget) - allowed)
    if bad:
        raise field_error(field, f"unknown keys {bad}; allowed: {sorted(allowed)}", dict(budget))
    bounds: dict[str, float] = {}
    for k in BOUND_KEYS:
        v = budget.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not v >= 0:  # NaN and -inf too
            raise field_error(f"{field}.{k}", "must be a non-negative number", v)
        if math.isinf(v):
            if k.startswith("min_"):
                raise field_error(f"{field}.{k}", "must be finite (an infinite minimum admits no "
                                  "architecture)", v)
            continue  # max_<q>=inf: no upper bound, the same as leaving the key out
        bounds[k] = float(v)
    for q in QUANTITIES:
        lo, hi = bounds.get(f"min_{q}"), bounds.get(f"max_{q}")
        if lo is not None and hi is not None and lo > hi:
            raise field_error(f"{field}.min_{q}", f"exceeds max_{q}={_num(hi)}", got=_num(lo))
    return name, bounds


def parse_budgets(budgets: Any, field: str = "search.budgets") -> list[tuple[str, dict[str, float]]]:
    """THE parser of ``cfg.search.budgets``: a non-empty list (or tuple) of budget entries with
    unique names, each through :func:`parse_budget` (errors name ``<field>[i]...``); returns
    ``[(name, bounds), ...]`` in order."""
    if not isinstance(budgets, (list, tuple)) or not budgets:
        raise field_error(field, "must be a non-empty list of dicts", budgets)
    parsed = [parse_budget(b, f"{field}[{i}]") for i, b in enumerate(budgets)]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise field_error(field, "budget names must be unique", names)
    return parsed


def check_reachable(name: str, bounds: Mapping[str, float], low: Mapping[str, tuple[float, float]],
                    high: Mapping[str, tuple[float, float]] | None = None,
                    field: str | None = None) -> None:
    """THE feasibility test of a budget's params / FLOPs bounds: raises :class:`SearchError`
    (field ``<field>.max_<q>`` / ``<field>.min_<q>``, default field ``budgets['<name>']``)
    naming the reachable range when a maximum is below the smallest architecture's value
    ``low[q][0]`` or a minimum above the largest's ``high[q][1]`` (``high`` defaults to ``low``:
    the ranges at one widths state; the preflight check passes the initial widths' ranges as
    ``low`` and the maximum widths' as ``high``). Latency bounds are not checked here (they
    need a latency table; the search finds out whether legal architectures exist)."""
    high = low if high is None else high
    field = f"budgets[{name!r}]" if field is None else field
    for q in ("params", "flops"):
        lo, hi = low[q][0], high[q][1]
        rng = f"reachable {q}: [{lo:,.0f}, {hi:,.0f}]"
        bmin, bmax = bounds.get(f"min_{q}"), bounds.get(f"max_{q}")
        if bmax is not None and bmax < lo:
            raise field_error(f"{field}.max_{q}", f"budget {name!r} is impossible, the smallest "
                              f"architecture has {lo:,.0f} {q}; {rng}", got=_num(bmax))
        if bmin is not None and bmin > hi:
            raise field_error(f"{field}.min_{q}", f"budget {name!r} is impossible, the largest "
                              f"architecture has {hi:,.0f} {q}; {rng}", got=_num(bmin))


@dataclasses.dataclass
class Constraints:
    """A budget: optional lower / upper bounds on parameters (of the extracted model), FLOPs
    (forward, one sequence of ``seq_len`` tokens, :func:`~elm_jax.accounting.count_flops`) and latency
    (ms, from ``latency_fn``, e.g. the per-device latency table's prediction).

    ``violation(arch) = sum_bounds max(0, (lo - v) / lo)`` or ``max(0, (v - hi) / hi)``: the
    relative amount by which each bound is missed (0 iff the architecture is legal), so bounds
    in different units add up.
    """

    name: str
    space: SearchSpace
    widths: np.ndarray
    seq_len: int
    bounds: dict[str, float]
    latency_fn: Callable[[Arch], float] | None = None
    _measures: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_budget(cls, budget: Mapping[str, Any], space: SearchSpace, widths: Any, seq_len: int,
                    latency_fn: Callable[[Arch], float] | None = None) -> Constraints:
        """Builds the constraints of one ``cfg.search.budgets`` entry (keys ``name`` and
        optional ``min_/max_`` ``params``, ``flops``, ``latency_ms``), read by
        :func:`parse_budget` (errors name ``budgets['<name>'].<key>``). Latency bounds need
        ``latency_fn``."""
        name, bounds = parse_budget(budget)
        if latency_fn is None and any(k.endswith("latency_ms") for k in bounds):
            raise SearchError(
                f"budget {name!r} bounds latency ({', '.join(k for k in bounds if 'latency' in k)}) "
                f"but no latency table is available: measure the per-device latency table first "
                f"(it provides latency_fn) or drop the latency bounds")
        seq_len = arch_lib._as_int("seq_len", seq_len)
        if not 1 <= seq_len <= space.max_len:
            raise SearchError(f"seq_len={seq_len} for FLOPs must be in [1, max_len={space.max_len}]")
        return cls(name=name, space=space, widths=space.validate_widths(widths), seq_len=seq_len,
                   bounds=bounds, latency_fn=latency_fn)

    def measures(self, arch: Arch) -> dict[str, float]:
        """``{params, flops[, latency_ms]}`` of ``arch`` (cached by canonical id)."""
        key = self.space.canonical(arch).arch_id
        m = self._measures.get(key)
        if m is None:
            m = {"params": count_params(self.space, arch, self.widths),
                 "flops": count_flops(self.space, arch, self.widths, self.seq_len)}
            if self.latency_fn is not None:
                m["latency_ms"] = float(self.latency_fn(arch))
            self._measures[key] = m
        return m

    def violation(self, arch: Arch) -> float:
        """Sum of relative bound violations (0.0 iff legal)."""
        m = self.measures(arch)
        total = 0.0
        for k, bound in self.bounds.items():
            kind, q = k.split("_", 1)
            v = m[q]
            if kind == "min" and v < bound:
                total += (bound - v) / max(bound, 1e-12)
            elif kind == "max" and v > bound:
                total += (v - bound) / max(bound, 1e-12)
        return float(total)

    def ok(self, arch: Arch) -> bool:
        """Whether ``arch`` satisfies every bound."""
        return self.violation(arch) == 0.0

    def describe(self) -> str:
        """E.g. ``small: params <= 450,000``."""
        parts = []
        for q in ("params", "flops", "latency_ms"):
            lo, hi = self.bounds.get(f"min_{q}"), self.bounds.get(f"max_{q}")
            if lo is not None or hi is not None:
                parts.append(f"{lo:,.6g} <= {q}" if hi is None else
                             f"{q} <= {hi:,.6g}" if lo is None else f"{lo:,.6g} <= {q} <= {hi:,.6g}")
        return f"{self.name}: " + (", ".join(parts) if parts else "unconstrained")


def check_feasible(space: SearchSpace, widths: Any,
                   constraints: Constraints) -> dict[str, tuple[float, float]]:
    """Raises :class:`SearchError` naming the budget and the reachable range when a params or
    FLOPs bound cannot be met by any architecture at ``widths`` (exact: both are additive, so
    the extremes are computable; :func:`check_reachable`), before any search compute; returns
    the reachable ranges. Latency bounds are checked by the search itself (random legal
    architectures must exist)."""
    ranges = reachable_ranges(space, widths, constraints.seq_len)
    check_reachable(constraints.name, constraints.bounds, ranges)
    return ranges
