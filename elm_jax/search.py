"""Evolutionary architecture search over the trained supernet (DESIGN §1.6, §2, §4).

Pieces, in the order the search stage uses them:

- :class:`PopulationScorer`: ONE compiled call scores a whole population. Architectures enter as
  stacked :class:`~elm_jax.arch.ArchArrays` ``[C, L]`` (``C`` a fixed capacity, a multiple of the
  device count, padded with copies of the first architecture), split over every device of the
  mesh with ``jax.shard_map``; parameters and the fixed validation batches ``[K, B, S]`` are
  replicated. Each device runs ``jax.lax.map`` over its architectures and over the batches, so
  the supernet's ``lax.switch`` stays a real branch per architecture (a ``vmap`` would turn it
  into a select that runs every family). The fitness is the validation loss of the inherited
  weights, the token mean cross-entropy ``sum_k loss_sum_k / sum_k weight_sum_k`` over the
  fixed batches (CLM perplexity = ``exp(loss)``, the same ranking). :meth:`PopulationScorer.
  score_one` is the reference: the extracted dense model evaluated on the same batches.
- :class:`Constraints`: a budget (``min_/max_`` ``params``, ``flops`` per sequence of
  ``data.seq_len``, ``latency_ms``) as ``ok(arch)`` and a relative ``violation(arch)``;
  :func:`check_feasible` rejects impossible budgets before any compute, naming the reachable
  range.
- :func:`evolutionary_search`: population of legal random architectures; per generation score
  the unscored ones (cache keyed by the canonical ``arch_id``), keep the top ``parents``, add
  ``mutations`` mutated and ``crossovers`` crossed-over legal children, refill with random legal
  architectures. All randomness comes from ``np.random.default_rng([seed, generation, salt])``
  and the state is written atomically after every generation, so a restarted search continues
  from the next generation and ends with exactly the result of an uninterrupted one.
- :func:`pareto_front` / :func:`pareto_sets` / :func:`plot_pareto`: the multi-objective output
  (loss vs. parameters, and vs. latency when a latency table exists).
- :func:`run_search_stage`: the ``search`` stage (``WORKDIR/search/result.json``,
  ``pareto.png``, per-budget state files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elm_jax import arch as arch_lib
from elm_jax.arch import Arch, ArchArrays, SearchSpace, stack_arrays
from elm_jax.fileio import atomic_write_bytes, atomic_write_json
from elm_jax.losses import weighted_cross_entropy

BATCH_KEYS = ("inputs", "targets", "weights", "mask", "segment_ids")
BOUND_KEYS = tuple(f"{m}_{q}" for q in ("params", "flops", "latency_ms") for m in ("min", "max"))
STATE_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class SearchError(ValueError):
    """A search that cannot run as configured (impossible budget, no legal architecture, a state
    file of a different search); the message names the budget or field and what to change."""


# ----------------------------------------------------------------------------------
# Population scoring
# ----------------------------------------------------------------------------------

def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` built from a host array every process holds
    in full (works on one host and across hosts, unlike ``device_put`` of a local array)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _stack_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{key: [K, B, S]}`` from ``K`` batches of ``[B, S]`` arrays (``mask`` defaults to ones,
    ``segment_ids`` to zeros); every batch must have the same shape."""
    if not batches:
        raise SearchError("the population scorer needs at least one validation batch")
    shape = np.shape(batches[0]["inputs"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in BATCH_KEYS}
    for i, b in enumerate(batches):
        for k in ("inputs", "targets", "weights"):
            if k not in b:
                raise SearchError(f"validation batch {i} lacks {k!r}; it has {sorted(b)}")
        if np.shape(b["inputs"]) != shape or len(shape) != 2:
            raise SearchError(f"validation batch {i} has inputs of shape {np.shape(b['inputs'])}; "
                              f"every batch must be [B, S] = {shape}")
        out["inputs"].append(np.asarray(b["inputs"], np.int32))
        out["targets"].append(np.asarray(b["targets"], np.int32))
        out["weights"].append(np.asarray(b["weights"], np.float32))
        out["mask"].append(np.asarray(b["mask"], np.int32) if b.get("mask") is not None
                           else np.ones(shape, np.int32))
        out["segment_ids"].append(np.asarray(b["segment_ids"], np.int32)
                                  if b.get("segment_ids") is not None else np.zeros(shape, np.int32))
    stacked = {k: np.stack(v) for k, v in out.items()}
    for k, v in stacked.items():
        if v.shape != stacked["inputs"].shape:
            raise SearchError(f"validation batches: {k!r} has shape {v.shape[1:]}, inputs {shape}")
    if stacked["weights"].sum() <= 0:
        raise SearchError("the validation batches carry no target tokens (all weights are 0)")
    return stacked


def _head_positions(stacked: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The scored positions of fixed batches, for evaluating the LM head only there.

    ``positions [NB, B, K]`` lists each row's positions of non-zero weight (padded with
    position 0 at weight 0), ``K`` the largest count of any row; ``targets_k`` / ``weights_k``
    are gathered likewise. The summed loss is unchanged (padded slots weigh 0), and an MLM
    batch (~15% of positions scored) then spends ~1/5 of the head's FLOPs. ``None`` when
    some row is scored at every position, where gathering would save nothing.
    """
    w = stacked["weights"]
    scored = w > 0
    k = int(scored.sum(-1).max())
    if k >= w.shape[-1]:
        return None
    k = max(k, 1)
    # stable sort puts scored positions first, in position order
    order = np.argsort(~scored, axis=-1, kind="stable")[..., :k].astype(np.int32)
    keep = np.take_along_axis(scored, order, axis=-1)
    return {"positions": np.where(keep, order, 0).astype(np.int32),
            "targets_k": np.where(keep, np.take_along_axis(stacked["targets"], order, -1), 0).astype(np.int32),
            "weights_k": np.where(keep, np.take_along_axis(w, order, -1), 0).astype(np.float32)}


def _metrics_from_sums(sums: np.ndarray, task: str) -> dict[str, np.ndarray]:
    """``loss = loss_sum / weight_sum``, ``accuracy = correct_sum / weight_sum`` (and
    ``perplexity = exp(loss)`` for CLM) from ``[P, 3]`` sums."""
    sums = np.asarray(sums, np.float64)
    w = np.maximum(sums[:, 1], 1e-12)
    out = {"loss": sums[:, 0] / w, "accuracy": sums[:, 2] / w}
    if task == "clm":
        out["perplexity"] = np.exp(out["loss"])
    return out


class PopulationScorer:
    """Scores populations of architectures of a supernet with ONE compiled function.

    Args:
      net: the trained :class:`~elm_jax.models.elastic.Supernet`.
      widths: its widths state ``int32 [L, 2, T]``.
      batches: the fixed validation batches (dicts of ``[B, S]`` numpy arrays ``inputs``,
        ``targets``, ``weights``, ``mask``, ``segment_ids``); every candidate sees the same ones.
      mesh: the device mesh (default: all devices on one axis). Architectures are split over
        ALL its axes; parameters and batches are replicated (compact LMs fit on one device).
      capacity: architectures per compiled call, rounded up to a multiple of the device count.
        ``None``: fixed by the first call. A larger population is scored in several calls of the
        same capacity, so the function compiles exactly once.

    The score of an architecture is its validation loss
    ``sum_k loss_sum_k / sum_k weight_sum_k`` (token-mean cross-entropy over all batches).
    """

    def __init__(self, net: Any, widths: Any, batches: Sequence[Mapping[str, Any]],
                 mesh: Mesh | None = None, *, capacity: int | None = None):
        self.net = net
        self.space: SearchSpace = net.space
        self.widths = self.space.validate_widths(widths)
        if mesh is None:
            mesh = jax.make_mesh((jax.device_count(),), ("data",),
                                 axis_types=(jax.sharding.AxisType.Auto,))
        self.mesh = mesh
        self.num_devices = int(mesh.devices.size)
        self._axes = tuple(mesh.axis_names)
        self._batches_np = _stack_batches(batches)
        self._capacity = None if capacity is None else self._round_up(int(capacity))
        self._graphdef, state = nnx.split(net)
        rep = NamedSharding(mesh, P())
        self._arch_sharding = NamedSharding(mesh, P(self._axes))
        self._state = jax.tree.map(lambda x: _global_array(np.asarray(x), rep), state)
        self._gathered = _head_positions(self._batches_np)
        device_batches = self._batches_np if self._gathered is None else {
            k: v for k, v in self._batches_np.items() if k not in ("targets", "weights")} | self._gathered
        self._batches = {k: _global_array(v, rep) for k, v in device_batches.items()}
        self._fn = jax.jit(self._build())
        self.calls = 0
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ compiled function

    def _build(self) -> Callable:
        graphdef, axes = self._graphdef, self._axes

        def per_device(state: Any, arrays: ArchArrays, batches: dict) -> jax.Array:
            model = nnx.merge(graphdef, state)

            def one_arch(arch: ArchArrays) -> jax.Array:
                def one_batch(b: dict) -> jax.Array:
                    if "positions" in b:  # LM head only at the scored positions
                        out = model(b["inputs"], arch, b["mask"], b["segment_ids"],
                                    head_positions_BxK=b["positions"])
                        s = weighted_cross_entropy(out.logits, b["targets_k"], b["weights_k"])
                    else:
                        out = model(b["inputs"], arch, b["mask"], b["segment_ids"])
                        s = weighted_cross_entropy(out.logits, b["targets"], b["weights"])
                    return jnp.stack([s["loss_sum"], s["weight_sum"], s["correct_sum"]])

                return jax.lax.map(one_batch, batches).sum(axis=0)  # [3]

            local = jax.lax.map(one_arch, arrays)  # [C / devices, 3], one switch path per arch
            return jax.lax.all_gather(local, axes, tiled=True)  # [C, 3] on every device

        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(axes), P()),
                             out_specs=P(), check_vma=False)

    def _round_up(self, n: int) -> int:
        n = max(int(n), 1)
        return -(-n // self.num_devices) * self.num_devices

    @property
    def capacity(self) -> int | None:
        """Architectures per compiled call (a multiple of the device count), once fixed."""
        return self._capacity

    def compilations(self) -> int:
        """How many times the scoring function has been compiled (expected: 1)."""
        return int(self._fn._cache_size())

    # ------------------------------------------------------------------ scoring

    def sums(self, archs: Sequence[Arch]) -> np.ndarray:
        """``float64 [P, 3]``: ``(loss_sum, weight_sum, correct_sum)`` of each architecture over
        all batches, in the order given (padded slots dropped)."""
        archs = list(archs)
        if not archs:
            return np.zeros((0, 3), np.float64)
        if self._capacity is None:
            self._capacity = self._round_up(len(archs))
        cap = self._capacity
        out = []
        for start in range(0, len(archs), cap):
            chunk = archs[start:start + cap]
            padded = chunk + [chunk[0]] * (cap - len(chunk))
            arrays = stack_arrays([self.space.to_arrays(a, self.widths) for a in padded])
            arrays = jax.tree.map(lambda x: _global_array(x, self._arch_sharding), arrays)
            res = np.asarray(self._fn(self._state, arrays, self._batches), np.float64)
            self.calls += 1
            out.append(res[:len(chunk)])
        return np.concatenate(out)

    def evaluate(self, archs: Sequence[Arch]) -> dict[str, np.ndarray]:
        """``{loss, accuracy[, perplexity]}`` arrays ``[P]`` for a population."""
        return _metrics_from_sums(self.sums(archs), self.space.task)

    def scores(self, archs: Sequence[Arch]) -> np.ndarray:
        """Validation loss ``[P]`` of each architecture (lower is better)."""
        return self.evaluate(archs)["loss"]

    def score_one(self, arch: Arch) -> float:
        """Reference score: the extracted dense model (:func:`~elm_jax.models.elastic.extract`)
        evaluated on the same batches; equals :meth:`scores` up to float tolerance."""
        from elm_jax.models.elastic import extract

        dense = extract(self.net, self.widths, arch)
        b = self._batches_np
        tot = np.zeros(3, np.float64)
        for k in range(b["inputs"].shape[0]):
            out = dense(b["inputs"][k], b["mask"][k], b["segment_ids"][k])
            s = weighted_cross_entropy(out.logits, b["targets"][k], b["weights"][k])
            tot += [float(s["loss_sum"]), float(s["weight_sum"]), float(s["correct_sum"])]
        return float(_metrics_from_sums(tot[None], self.space.task)["loss"][0])

    def fingerprint(self) -> str:
        """sha256 (16 hex) of what determines every score: the space, the widths, the
        supernet parameters and the validation batches (computed once). A state file of
        another fingerprint belongs to a different search."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self.space), sort_keys=True, default=str).encode())
        h.update(self.widths.tobytes())
        for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(self.net)),
                                 key=lambda t: jax.tree_util.keystr(t[0])):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        for k in BATCH_KEYS:
            h.update(self._batches_np[k].tobytes())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


# ----------------------------------------------------------------------------------
# Constraints
# ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Constraints:
    """A budget: optional lower / upper bounds on parameters (of the extracted model), FLOPs
    (forward, one sequence of ``seq_len`` tokens, :func:`~elm_jax.arch.count_flops`) and latency
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
        optional ``min_/max_`` ``params``, ``flops``, ``latency_ms``)."""
        if not hasattr(budget, "keys") or "name" not in budget:
            raise SearchError(f"a budget must be a dict with a 'name', got {budget!r}")
        name = budget["name"]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SearchError(f"budget name {name!r} must be a non-empty string of letters, digits, "
                              f"'_', '.' or '-' (it names files)")
        bad = sorted(set(budget) - {"name", *BOUND_KEYS})
        if bad:
            raise SearchError(f"budget {name!r}: unknown keys {bad}; allowed: name, "
                              f"{', '.join(BOUND_KEYS)}")
        bounds: dict[str, float] = {}
        for k in BOUND_KEYS:
            v = budget.get(k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise SearchError(f"budget {name!r}: {k}={v!r} must be a non-negative number")
            bounds[k] = float(v)
        for q in ("params", "flops", "latency_ms"):
            lo, hi = bounds.get(f"min_{q}"), bounds.get(f"max_{q}")
            if lo is not None and hi is not None and lo > hi:
                raise SearchError(f"budget {name!r}: min_{q}={lo:g} exceeds max_{q}={hi:g}")
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
            m = {"params": arch_lib.count_params(self.space, arch, self.widths),
                 "flops": arch_lib.count_flops(self.space, arch, self.widths, self.seq_len)}
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


def _extreme_arch(space: SearchSpace, widths: np.ndarray, block_cost: Callable[[str, int], int],
                  largest: bool) -> Arch:
    """The architecture minimising (or maximising) an additive per-block cost: per layer the
    (family, candidate) of least (most) cost; with elastic depth the minimum keeps only the
    ``min_layers`` cheapest layers active (costs are positive), the maximum all layers."""
    choices, costs = [], []
    for l in range(space.layers):
        opts = [(block_cost(f, int(widths[l, arch_lib.FAMILY_INDEX[f], j])), f, j)
                for f in space.families for j in range(space.candidates)]
        c, f, j = (max if largest else min)(opts, key=lambda o: o[0])
        choices.append((f, j))
        costs.append(c)
    if largest or not space.elastic_depth:
        on = set(range(space.layers))
    else:
        on = set(sorted(range(space.layers), key=lambda l: (costs[l], l))[:space.min_layers])
    heads = space.head_choices[-1] if largest else space.head_choices[0]
    return space.validate(Arch(tuple(arch_lib.LayerChoice(f, j, heads, l in on)
                                     for l, (f, j) in enumerate(choices))))


def reachable_ranges(space: SearchSpace, widths: Any, seq_len: int,
                     latency_fn: Callable[[Arch], float] | None = None) -> dict[str, tuple[float, float]]:
    """``{params: (lo, hi), flops: (lo, hi)}``: the exact extremes over the whole space (both
    are additive over active blocks), plus ``latency_ms`` evaluated at the FLOPs extremes (an
    estimate: the latency table is not assumed additive) when ``latency_fn`` is given."""
    w = space.validate_widths(widths)
    out: dict[str, tuple[float, float]] = {
        "params": (arch_lib.count_params(space, space.smallest(w), w),
                   arch_lib.count_params(space, space.largest(w), w))}
    fl = lambda f, ffn: arch_lib.block_flops(space, f, ffn, seq_len)
    lo_a, hi_a = _extreme_arch(space, w, fl, False), _extreme_arch(space, w, fl, True)
    out["flops"] = (arch_lib.count_flops(space, lo_a, w, seq_len),
                    arch_lib.count_flops(space, hi_a, w, seq_len))
    if latency_fn is not None:
        a, b = float(latency_fn(lo_a)), float(latency_fn(hi_a))
        out["latency_ms"] = (min(a, b), max(a, b))
    return out


def check_feasible(space: SearchSpace, widths: Any,
                   constraints: Constraints) -> dict[str, tuple[float, float]]:
    """Raises :class:`SearchError` naming the budget and the reachable range when a params or
    FLOPs bound cannot be met by any architecture (exact: both are additive, so the extremes are
    computable), before any search compute; returns the reachable ranges. Latency bounds are
    checked by the search itself (random legal architectures must exist)."""
    ranges = reachable_ranges(space, widths, constraints.seq_len)
    for q in ("params", "flops"):
        lo, hi = ranges[q]
        bmin, bmax = constraints.bounds.get(f"min_{q}"), constraints.bounds.get(f"max_{q}")
        if bmax is not None and bmax < lo:
            raise SearchError(
                f"budget {constraints.name!r} is impossible: max_{q}={bmax:,.0f} is below the "
                f"smallest architecture's {q} {lo:,.0f}; reachable {q}: [{lo:,.0f}, {hi:,.0f}]")
        if bmin is not None and bmin > hi:
            raise SearchError(
                f"budget {constraints.name!r} is impossible: min_{q}={bmin:,.0f} is above the "
                f"largest architecture's {q} {hi:,.0f}; reachable {q}: [{lo:,.0f}, {hi:,.0f}]")
    return ranges


# ----------------------------------------------------------------------------------
# Evolutionary search
# ----------------------------------------------------------------------------------

class ScoreCache:
    """Scores by canonical ``arch_id`` (``scores``) with the architectures themselves
    (``archs``); budgets of one search stage share one cache, so an architecture is scored once."""

    def __init__(self) -> None:
        self.scores: dict[str, float] = {}
        self.archs: dict[str, Arch] = {}

    def __contains__(self, arch_id: str) -> bool:
        return arch_id in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def add(self, arch: Arch, score: float) -> None:
        self.scores[arch.arch_id] = float(score)
        self.archs[arch.arch_id] = arch

    def update_from_state(self, scores: Mapping[str, float], archs: Mapping[str, Any]) -> None:
        for k, v in scores.items():
            self.scores.setdefault(k, float(v))
            if k not in self.archs:
                self.archs[k] = Arch.from_dict(archs[k])


@dataclasses.dataclass
class SearchResult:
    """The outcome of one budget's search: the best legal architecture (minimum score over every
    scored architecture that satisfies the budget), its score and cost, the scored architectures
    ``{arch_id: score}`` (the cache as this search ended) and the per-generation history."""

    budget: str
    best: Arch
    score: float
    params: int
    flops: int
    latency_ms: float | None
    scored: dict[str, float]
    history: list[dict[str, Any]]
    generations_done: int
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "arch": self.best.to_dict(), "arch_id": self.best.arch_id,
                "describe": self.best.describe(), "score": self.score, "params": self.params,
                "flops": self.flops, "latency_ms": self.latency_ms, "scored": dict(self.scored),
                "history": list(self.history), "generations_done": self.generations_done,
                "complete": self.complete}


def _cfg_get(cfg: Any, key: str) -> Any:
    try:
        return cfg[key]
    except (KeyError, TypeError):
        try:
            return getattr(cfg, key)
        except AttributeError:
            raise SearchError(f"search config lacks {key!r}") from None


def _search_params(search_cfg: Any) -> dict[str, Any]:
    """The integer / float settings of ``cfg.search``, checked (clear errors naming the field)."""
    p = {k: _cfg_get(search_cfg, k) for k in ("population", "generations", "parents", "mutations",
                                              "crossovers", "mutation_prob")}
    for k in ("population", "generations", "parents", "mutations", "crossovers"):
        if isinstance(p[k], bool) or not isinstance(p[k], (int, np.integer)):
            raise SearchError(f"search.{k} must be an integer, got {p[k]!r}")
        p[k] = int(p[k])
    for k in ("population", "generations", "parents"):
        if p[k] < 1:
            raise SearchError(f"search.{k} must be >= 1, got {p[k]}")
    for k in ("mutations", "crossovers"):
        if p[k] < 0:
            raise SearchError(f"search.{k} must be >= 0, got {p[k]}")
    if p["parents"] + p["mutations"] + p["crossovers"] > p["population"]:
        raise SearchError(
            f"search.parents + search.mutations + search.crossovers = {p['parents']} + "
            f"{p['mutations']} + {p['crossovers']} exceeds search.population={p['population']}")
    p["mutation_prob"] = float(p["mutation_prob"])
    if not 0.0 <= p["mutation_prob"] <= 1.0:
        raise SearchError(f"search.mutation_prob must be in [0, 1], got {p['mutation_prob']}")
    return p


def _salt(name: str) -> int:
    """A stable 32-bit integer of the budget name (separates the budgets' random streams)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


class _Evolution:
    """One budget's evolutionary search (the state machine behind :func:`evolutionary_search`)."""

    def __init__(self, space: SearchSpace, constraints: Constraints, params: dict[str, Any],
                 seed: int, max_tries: int):
        self.space, self.constraints, self.p = space, constraints, params
        self.seed, self.max_tries = int(seed), int(max_tries)
        self.proposed = 0

    def rng(self, generation: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, generation, _salt(self.constraints.name), purpose])

    def _legal_new(self, arch: Arch, taken: set[str]) -> Arch | None:
        """The canonical form of ``arch`` if it is legal and not yet in the population."""
        self.proposed += 1
        arch = self.space.canonical(arch)
        if arch.arch_id in taken or not self.constraints.ok(arch):
            return None
        return arch

    def random_fill(self, pop: list[Arch], target: int, rng: np.random.Generator) -> list[Arch]:
        """Adds distinct random legal architectures until ``target`` (at most ``max_tries``
        draws per missing member)."""
        taken = {a.arch_id for a in pop}
        budget = self.max_tries * max(target - len(pop), 0)
        while len(pop) < target and budget > 0:
            budget -= 1
            a = self._legal_new(self.space.sample(rng), taken)
            if a is not None:
                pop.append(a)
                taken.add(a.arch_id)
        return pop

    def initial(self) -> list[Arch]:
        pop = self.random_fill([], self.p["population"], self.rng(0, 0))
        if not pop:
            raise SearchError(
                f"budget {self.constraints.describe()}: no legal architecture in "
                f"{self.max_tries * self.p['population']} random draws; the budget admits only a "
                f"tiny corner of the search space (or none): widen it")
        if len(pop) < self.p["population"]:
            warnings.warn(f"budget {self.constraints.describe()}: only {len(pop)} distinct legal "
                          f"architectures found for a population of {self.p['population']}; the "
                          f"budget is narrow")
        return pop

    def next_population(self, ranked: list[Arch], generation: int) -> list[Arch]:
        """Top-``parents`` survivors + mutated children + crossed-over children + random refill,
        all legal and distinct (a child that fails ``max_tries`` times is dropped)."""
        parents = ranked[:self.p["parents"]]
        pop = list(parents)
        taken = {a.arch_id for a in pop}
        rng = self.rng(generation, 1)
        for kind, count in (("mutation", self.p["mutations"]), ("crossover", self.p["crossovers"])):
            for _ in range(count):
                for _ in range(self.max_tries):
                    if kind == "mutation":
                        parent = parents[int(rng.integers(len(parents)))]
                        child = self.space.mutate(parent, self.p["mutation_prob"], rng)
                    else:
                        i, j = rng.choice(len(parents), size=2, replace=len(parents) < 2)
                        child = self.space.crossover(parents[int(i)], parents[int(j)], rng)
                    child = self._legal_new(child, taken)
                    if child is not None:
                        pop.append(child)
                        taken.add(child.arch_id)
                        break
        return self.random_fill(pop, self.p["population"], rng)


def _rank(pop: Iterable[Arch], cache: ScoreCache) -> list[Arch]:
    """By score, ties (and NaN, which ranks last) broken by ``arch_id``: deterministic."""
    def key(a: Arch) -> tuple:
        s = cache.scores[a.arch_id]
        return (not math.isfinite(s), s if math.isfinite(s) else 0.0, a.arch_id)

    return sorted(pop, key=key)


def _state_key(scorer_fp: str, constraints: Constraints, params: dict[str, Any], seed: int) -> str:
    blob = json.dumps({"scorer": scorer_fp, "budget": constraints.name, "bounds": constraints.bounds,
                       "seq_len": constraints.seq_len, "search": params, "seed": int(seed),
                       "version": STATE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evolutionary_search(space: SearchSpace, widths: Any, scorer: Any, constraints: Constraints,
                        search_cfg: Any, seed: int, state_path: str | os.PathLike | None = None,
                        progress: bool = True, *, cache: ScoreCache | None = None,
                        max_generations: int | None = None,
                        callback: Callable[[int, dict[str, Any]], None] | None = None,
                        max_tries: int = 50, write_state: bool = True) -> SearchResult:
    """Evolutionary search for the best (lowest score) architecture under ``constraints``.

    Generation 0 is ``population`` distinct legal random architectures (rejection sampling,
    ``max_tries`` draws per member; :class:`SearchError` if none is legal). Every generation
    scores its unscored members in one ``scorer.scores`` call (cache by canonical ``arch_id``),
    ranks them, records ``history`` and writes the state; the next generation keeps the top
    ``parents``, adds ``mutations`` children (``space.mutate(parent, mutation_prob)`` of a random
    parent) and ``crossovers`` children (``space.crossover`` of two random parents), each legal
    and new (``max_tries`` retries, else dropped), then refills with random legal architectures.
    Generation ``g`` draws from ``np.random.default_rng([seed, g, salt(budget), purpose])``.

    Args:
      space, widths: the supernet's search space and widths state.
      scorer: anything with ``scores(list[Arch]) -> [P]`` (a :class:`PopulationScorer`) and
        optionally ``fingerprint() -> str`` (guards a resumed state against a changed supernet).
      constraints: the budget (:class:`Constraints`).
      search_cfg: ``cfg.search`` (population, generations, parents, mutations, crossovers,
        mutation_prob).
      seed: the run seed.
      state_path: JSON state written atomically after every generation (generation, population,
        score cache, history); if it exists the search continues from the next generation and
        ends with the same result as an uninterrupted run.
      progress: show a tqdm bar over generations.
      cache: a :class:`ScoreCache` shared across budgets (default: a fresh one).
      max_generations: stop after this many generations in total (an interrupted run, for tests
        and time limits); the result then has ``complete=False``.
      callback: ``callback(generation, state)`` after each generation's state is written.
      max_tries: draws per needed legal architecture / child.
      write_state: False on processes other than 0 in multi-host runs.

    Returns:
      :class:`SearchResult`; ``best`` is the minimum-score architecture among ALL cached
      architectures that satisfy the constraints (including those scored for other budgets).
    """
    from tqdm.auto import tqdm

    p = _search_params(search_cfg)
    widths = space.validate_widths(widths)
    if space != constraints.space or not np.array_equal(widths, constraints.widths):
        raise SearchError("the constraints were built for a different space or widths state")
    cache = ScoreCache() if cache is None else cache
    evo = _Evolution(space, constraints, p, seed, max_tries)
    fp = scorer.fingerprint() if hasattr(scorer, "fingerprint") else ""
    key = _state_key(fp, constraints, p, seed)
    total = p["generations"] if max_generations is None else min(p["generations"], int(max_generations))

    history: list[dict[str, Any]] = []
    start, pop = 0, None
    path = Path(state_path) if state_path is not None else None
    state = None
    if path is not None and path.is_file():
        try:  # written atomically, so damage comes from outside: redo (deterministic) this budget
            state = json.loads(path.read_text())
            if not isinstance(state, dict) or not {"key", "cache", "archs", "history", "population",
                                                   "generation"} <= set(state):
                raise ValueError("fields are missing")
        except (OSError, ValueError) as e:
            warnings.warn(f"search state {path} is unreadable ({type(e).__name__}: {e}); the search of "
                          f"budget {constraints.name!r} starts over (same seed, same result)")
            state = None
    if state is not None:
        if state.get("key") != key:
            raise SearchError(
                f"search state {path} belongs to a different search (supernet, validation batches, "
                f"budget {constraints.name!r}, search settings or seed changed); delete it to start "
                f"this budget's search over")
        cache.update_from_state(state["cache"], state["archs"])
        history = list(state["history"])
        pop = [Arch.from_dict(d) for d in state["population"]]
        start = int(state["generation"]) + 1

    bar = tqdm(range(start, total), desc=f"search {constraints.name}", disable=not progress,
               leave=False, unit="gen")
    for g in bar:
        pop = evo.initial() if g == 0 else evo.next_population(_rank(pop, cache), g)
        todo = [a for a in pop if a.arch_id not in cache]
        if todo:
            for a, s in zip(todo, np.asarray(scorer.scores(todo), np.float64)):
                cache.add(a, float(s))
        ranked = _rank(pop, cache)
        best = ranked[0]
        pop_scores = [cache.scores[a.arch_id] for a in pop]
        prev = history[-1]["best_so_far"] if history else math.inf
        history.append({
            "generation": g, "best_score": cache.scores[best.arch_id], "best_arch_id": best.arch_id,
            "best_so_far": min(prev, cache.scores[best.arch_id]),
            "mean_score": float(np.mean(pop_scores)), "population": len(pop),
            "new_scored": len(todo), "cache_size": len(cache)})
        state = {"version": STATE_VERSION, "key": key, "budget": constraints.name, "generation": g,
                 "population": [a.to_dict() for a in pop], "cache": dict(cache.scores),
                 "archs": {k: a.to_dict() for k, a in cache.archs.items()}, "history": history}
        if path is not None and write_state:
            atomic_write_json(path, state)
        bar.set_postfix(best=f"{history[-1]['best_so_far']:.4f}", scored=len(cache))
        if callback is not None:
            callback(g, state)
    bar.close()

    legal = [(s, k) for k, s in cache.scores.items()
             if math.isfinite(s) and constraints.ok(cache.archs[k])]
    if not legal:
        raise SearchError(f"budget {constraints.describe()}: no legal architecture was scored "
                          f"(every score non-finite?)")
    score, best_id = min(legal)
    best = cache.archs[best_id]
    m = constraints.measures(best)
    return SearchResult(budget=constraints.name, best=best, score=score, params=int(m["params"]),
                        flops=int(m["flops"]), latency_ms=m.get("latency_ms"),
                        scored=dict(cache.scores), history=history,
                        generations_done=len(history), complete=len(history) >= p["generations"])


# ----------------------------------------------------------------------------------
# Pareto sets
# ----------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------
# The search stage
# ----------------------------------------------------------------------------------

def _budget_entry(res: SearchResult, task: str) -> dict[str, Any]:
    e = {"arch": res.best.to_dict(), "arch_id": res.best.arch_id, "describe": res.best.describe(),
         "score": res.score, "loss": res.score, "params": res.params, "flops": res.flops,
         "latency_ms": res.latency_ms, "history": res.history, "scored": len(res.scored)}
    if task == "clm":
        e["perplexity"] = math.exp(res.score)
    return e


def run_search_stage(cfg: Any, workdir: str | os.PathLike, data: Any,
                     latency_fn: Callable[[Arch], float] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """The ``search`` stage: one evolutionary search per budget over the trained supernet.

    Loads ``WORKDIR/supernet/final``, scores candidates on the first ``search.eval_batches``
    validation batches with one compiled :class:`PopulationScorer` (mesh from ``cfg.mesh``),
    checks every budget's feasibility before searching, runs the budgets in order (state files
    ``WORKDIR/search/state_<name>.json``, one shared score cache), and writes
    ``WORKDIR/search/pareto.png`` and ``WORKDIR/search/result.json`` (per budget: arch, id,
    describe, score = loss, perplexity for CLM, params, flops, latency; the Pareto sets over all
    scored architectures; ``budget_names`` keeps the config order, since the JSON keys are
    sorted). A complete result.json for the same budget names is returned as is; an interrupted
    stage resumes each budget from its state file. A SIGTERM (preemption notice) stops the search
    after the generation in flight, whose state is on disk, with :class:`~elm_jax.preemption.Preempted`.
    """
    from elm_jax import preemption, sharding
    from elm_jax.supernet import load_supernet

    out = Path(workdir) / "search"
    result_path = out / "result.json"
    budgets = [dict(b) for b in cfg.search.budgets]
    names = [b.get("name") for b in budgets]
    if len(set(names)) != len(names):
        raise SearchError(f"search.budgets: budget names must be unique, got {names}")
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("complete") and done.get("budget_names") == names:
            print(f"[search] complete already: {result_path}")
            return done
    final = Path(workdir) / "supernet" / "final"
    if not (final / "widths.json").is_file():
        raise FileNotFoundError(f"{final} is missing: run the supernet stage first (--stages=supernet)")
    net, widths, _ = load_supernet(final)
    space = net.space
    if space.task != cfg.task:
        raise SearchError(f"the supernet in {final} is a {space.task!r} model but config.task is "
                          f"{cfg.task!r}")
    seq_len = int(cfg.data.seq_len)
    wants_latency = any(k.endswith("latency_ms") for b in budgets for k in b)
    if latency_fn is None and (wants_latency or cfg.latency.predict):
        from elm_jax.latency import load_or_build

        table = load_or_build(space, cfg.latency, seq_len)
        latency_fn = lambda arch: table.predict_ms(space, arch, widths)  # noqa: E731
    constraints = [Constraints.from_budget(b, space, widths, seq_len, latency_fn) for b in budgets]
    for c in constraints:
        check_feasible(space, widths, c)

    n_batches = min(int(cfg.search.eval_batches), len(data.eval))
    batches = [data.eval.global_batch(k) for k in range(n_batches)]
    mesh = sharding.make_mesh(cfg.mesh)
    n_dev = int(mesh.devices.size)
    capacity = -(-int(cfg.search.population) // n_dev) * n_dev
    scorer = PopulationScorer(net, widths, batches, mesh, capacity=capacity)
    print(f"[search] {len(budgets)} budget(s), population {cfg.search.population} x "
          f"{cfg.search.generations} generations; {n_batches} validation batches; "
          f"{capacity} architectures per compiled call over {n_dev} device(s)")

    writer = jax.process_index() == 0
    cache = ScoreCache()
    results: dict[str, SearchResult] = {}
    for c in constraints:
        def stop_if_preempted(generation: int, state: Mapping[str, Any], budget: str = c.name) -> None:
            if preemption.agreed():  # this generation's state is already written
                raise preemption.Preempted(generation, (
                    f"search: preempted (SIGTERM) after generation {generation} of budget "
                    f"{budget!r}; its state is saved in {out}; rerun the same command to resume"))

        res = evolutionary_search(space, widths, scorer, c, cfg.search, int(cfg.seed),
                                  out / f"state_{c.name}.json", progress=progress and writer,
                                  cache=cache, write_state=writer, callback=stop_if_preempted)
        results[c.name] = res
        ppl = f", perplexity {math.exp(res.score):.2f}" if space.task == "clm" else ""
        lat = f", {res.latency_ms:.3f} ms" if res.latency_ms is not None else ""
        print(f"[search] {c.describe()} -> {res.best.describe()}  loss {res.score:.4f}{ppl}, "
              f"{res.params:,} params, {res.flops:,} FLOPs{lat} ({len(res.scored)} scored)")

    # every scored architecture of every budget, with its costs
    measure = Constraints.from_budget({"name": "all"}, space, widths, seq_len, latency_fn)
    best_for: dict[str, list[str]] = {}
    for name, r in results.items():
        best_for.setdefault(r.best.arch_id, []).append(name)
    entries = []
    for k in sorted(cache.scores):
        a = cache.archs[k]
        m = measure.measures(a)
        entries.append({"arch_id": k, "describe": a.describe(), "score": cache.scores[k],
                        "params": int(m["params"]), "flops": int(m["flops"]),
                        "latency_ms": m.get("latency_ms"), "best_for": best_for.get(k, [])})
    fronts = pareto_sets(entries)
    pareto = {cost: [entries[i] | {"arch": cache.archs[entries[i]["arch_id"]].to_dict()}
                     for i in idx] for cost, idx in fronts.items()}
    result = {"task": space.task, "complete": True, "seq_len": seq_len, "eval_batches": n_batches,
              "budget_names": names,
              "budgets": {n: _budget_entry(r, space.task) for n, r in results.items()},
              "pareto": pareto, "scored": entries,
              "scorer": {"capacity": capacity, "devices": n_dev, "calls": scorer.calls,
                         "compilations": scorer.compilations()}}
    if writer:
        tmp_png = out / ".pareto.tmp.png"  # atomic like every stage output (matplotlib infers .png)
        plot_pareto(entries, tmp_png)
        os.replace(tmp_png, out / "pareto.png")
        atomic_write_json(result_path, result)
    print(f"[search] Pareto set (loss vs params): {len(fronts['params'])} of {len(entries)} scored "
          f"architectures; {scorer.calls} scoring calls, {scorer.compilations()} compilation(s) "
          f"-> {result_path}")
    return result


__all__ = [
    "Constraints",
    "PopulationScorer",
    "ScoreCache",
    "SearchError",
    "SearchResult",
    "check_feasible",
    "evolutionary_search",
    "pareto_front",
    "pareto_sets",
    "plot_pareto",
    "reachable_ranges",
    "run_search_stage",
]
