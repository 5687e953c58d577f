"""Evolutionary search over architectures under constraints (DESIGN §1.6).

:func:`evolutionary_search`: population of legal random architectures; per generation score
  the unscored ones (cache keyed by the canonical ``arch_id``), keep the top ``parents``, add
  ``mutations`` mutated and ``crossovers`` crossed-over legal children, refill with random legal
  architectures. All randomness comes from ``np.random.default_rng([seed, generation, salt])``
  and the state is written atomically after every generation, so a restarted search continues
  from the next generation and ends with exactly the result of an uninterrupted one.
:func:`random_search`: the control it must beat (issue 31), as many distinct legal random
  architectures as the evolution evaluated, scored by the same scorer; its best is exported and
  retrained beside the found model (kind :data:`RANDOM_KIND`).
"""


from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from elm_jax.arch import Arch
from elm_jax.fields import get as get_field
from elm_jax.fileio import atomic_write_json
from elm_jax.search.constraints import Constraints, SearchError, field_error
from elm_jax.space import SearchSpace

STATE_VERSION = 2  # 2: the population keeps raw genes (canonical ids only as cache keys)


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
    #: canonical ids of the distinct architectures in this budget's populations (what this search
    #: spent its scoring on; ``scored`` is the whole cache, shared across budgets)
    evaluated: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, **_best_fields(self), "scored": dict(self.scored),
                "history": list(self.history), "generations_done": self.generations_done,
                "complete": self.complete, "evaluated": list(self.evaluated)}


def _best_fields(r: SearchResult | RandomResult) -> dict[str, Any]:
    """A search's best architecture with its score and costs, as JSON."""
    return {"arch": r.best.to_dict(), "arch_id": r.best.arch_id, "describe": r.best.describe(),
            "score": r.score, "params": r.params, "flops": r.flops, "latency_ms": r.latency_ms}


#: The settings of ``cfg.search`` the evolution uses (and the state key hashes).
EVOLUTION_PARAMS = ("population", "generations", "parents", "mutations", "crossovers", "mutation_prob")
#: Every numeric setting of ``cfg.search`` (``eval_batches``: the search stage's).
SEARCH_PARAMS = ("population", "generations", "parents", "eval_batches", "mutations", "crossovers",
                 "mutation_prob")


def _cfg_get(cfg: Any, key: str, field: str) -> Any:
    try:
        return get_field(cfg, key)
    except KeyError:
        raise SearchError(f"{field}: missing field", field=field, reason="missing field") from None


def check_search_params(search_cfg: Any, keys: Iterable[str] = EVOLUTION_PARAMS,
                        prefix: str = "search") -> dict[str, Any]:
    """THE check of the numeric ``cfg.search`` settings (``keys``, a subset of
    :data:`SEARCH_PARAMS`, in that order): ``population``, ``generations``, ``parents``,
    ``eval_batches`` integers >= 1; ``mutations``, ``crossovers`` integers >= 0;
    ``mutation_prob`` a number in [0, 1]; ``parents + mutations + crossovers <= population``.
    Returns ``{key: value}`` (ints, ``mutation_prob`` a float). Raises :class:`SearchError`
    for the first bad field, ``"<prefix>.<key>: <reason> (got <value!r>)"``
    (:func:`~elm_jax.search.constraints.field_error`); ``config.validate`` re-raises it as
    ``config.<message>``."""
    keys = set(keys)
    p: dict[str, Any] = {}
    for k in SEARCH_PARAMS:
        if k not in keys:
            continue
        f = f"{prefix}.{k}"
        v = _cfg_get(search_cfg, k, f)
        if k == "mutation_prob":
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise field_error(f, "must be a number", v)
            if not v >= 0.0:  # NaN too
                raise field_error(f, "must be >= 0.0", v)
            if not v <= 1.0:
                raise field_error(f, "must be <= 1.0", v)
            p[k] = float(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise field_error(f, "must be an integer", v)
        lo = 0 if k in ("mutations", "crossovers") else 1
        if v < lo:
            raise field_error(f, f"must be >= {lo}", v)
        p[k] = int(v)
    if {"population", "parents", "mutations", "crossovers"} <= keys and \
            p["parents"] + p["mutations"] + p["crossovers"] > p["population"]:
        raise field_error(f"{prefix}.population", f"must be >= parents + mutations + crossovers = "
                          f"{p['parents']} + {p['mutations']} + {p['crossovers']}", p["population"])
    return p


def _search_params(search_cfg: Any) -> dict[str, Any]:
    """The settings of ``cfg.search`` the evolution uses, checked (:func:`check_search_params`)."""
    return check_search_params(search_cfg, EVOLUTION_PARAMS)


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

    def key(self, arch: Arch) -> str:
        """The cache and de-duplication key: the canonical ``arch_id`` (architectures that
        extract to the same model share it). The population keeps the raw genes (DESIGN 1.6):
        writing the canonical form back would reset a skipped layer's hidden genes, and a
        re-activated layer would come back as the first family, candidate 0, fewest heads."""
        return self.space.canonical(arch).arch_id

    def _legal_new(self, arch: Arch, taken: set[str]) -> Arch | None:
        """``arch`` (raw genes) if it is legal and its canonical form is not yet in the
        population."""
        self.proposed += 1
        if self.key(arch) in taken or not self.constraints.ok(arch):
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
                taken.add(self.key(a))
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
        taken = {self.key(a) for a in pop}
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
                        taken.add(self.key(child))
                        break
        return self.random_fill(pop, self.p["population"], rng)


def _rank(pop: Iterable[Arch], cache: ScoreCache, key: Callable[[Arch], str]) -> list[Arch]:
    """By score, ties (and NaN, which ranks last) broken by the canonical id ``key(a)``:
    deterministic."""
    def order(a: Arch) -> tuple:
        k = key(a)
        s = cache.scores[k]
        return (not math.isfinite(s), s if math.isfinite(s) else 0.0, k)

    return sorted(pop, key=order)


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
    evaluated: dict[str, None] = {}  # insertion-ordered set of canonical ids
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
        evaluated = dict.fromkeys(state.get("evaluated", [evo.key(a) for a in pop]))
        start = int(state["generation"]) + 1

    bar = tqdm(range(start, total), desc=f"search {constraints.name}", disable=not progress,
               leave=False, unit="gen")
    for g in bar:
        pop = evo.initial() if g == 0 else evo.next_population(_rank(pop, cache, evo.key), g)
        evaluated.update(dict.fromkeys(evo.key(a) for a in pop))
        todo = [a for a in pop if evo.key(a) not in cache]
        if todo:
            for a, s in zip(todo, np.asarray(scorer.scores(todo), np.float64)):
                cache.add(space.canonical(a), float(s))
        ranked = _rank(pop, cache, evo.key)
        best_id = evo.key(ranked[0])
        pop_scores = [cache.scores[evo.key(a)] for a in pop]
        prev = history[-1]["best_so_far"] if history else math.inf
        history.append({
            "generation": g, "best_score": cache.scores[best_id], "best_arch_id": best_id,
            "best_so_far": min(prev, cache.scores[best_id]),
            "mean_score": float(np.mean(pop_scores)), "population": len(pop),
            "new_scored": len(todo), "cache_size": len(cache)})
        state = {"version": STATE_VERSION, "key": key, "budget": constraints.name, "generation": g,
                 "population": [a.to_dict() for a in pop], "cache": dict(cache.scores),
                 "archs": {k: a.to_dict() for k, a in cache.archs.items()}, "history": history,
                 "evaluated": list(evaluated)}
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
                        generations_done=len(history), complete=len(history) >= p["generations"],
                        evaluated=tuple(evaluated))


# ----------------------------------------------------------------------------------
# The random-search control
# ----------------------------------------------------------------------------------

#: The rng ``purpose`` of the random-search control's draws (0: generation 0, 1: children), so
#: its sample is independent of the evolution's generation 0 under the same seed.
RANDOM_PURPOSE = 2
#: The kind of the random search's best in ``export/result.json`` and ``evaluate/result.json``.
RANDOM_KIND = "random_best"


@dataclasses.dataclass(frozen=True)
class RandomResult:
    """The random-search control of one budget: ``sample`` ``{arch_id: score}`` of the distinct
    legal architectures drawn, ``best`` the minimum-score one among them (and only them);
    ``archs`` the drawn architectures themselves by id (not in :meth:`to_dict`: the search's
    re-ranking reads them)."""

    budget: str
    best: Arch
    score: float
    params: int
    flops: int
    latency_ms: float | None
    sample: dict[str, float]
    archs: dict[str, Arch] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {**_best_fields(self), "sampled": len(self.sample), "sample": dict(self.sample)}


def random_search(space: SearchSpace, scorer: Any, constraints: Constraints, n: int, seed: int, *,
                  cache: ScoreCache | None = None, max_tries: int = 50) -> RandomResult:
    """The control an evolutionary search must beat: ``n`` distinct legal architectures drawn
    like the evolution's generation 0 (``space.sample`` with rejection by ``constraints``,
    ``max_tries`` draws per member, distinct canonical ``arch_id``) from their own stream
    ``np.random.default_rng([seed, 0, salt(budget), RANDOM_PURPOSE])``, scored by the same
    ``scorer`` (one ``scorer.scores`` call), best = ``argmin`` over the sample only.

    ``cache`` (the evolution's scores, same scorer and batches) is read, never written: an
    architecture it holds keeps its score (scoring is deterministic, so the figure is the same),
    and a random draw never becomes another budget's evolutionary best. The widths state is the
    constraints' own (``constraints.widths``). Fewer than ``n`` legal architectures (a narrow
    budget) warn; none raises :class:`SearchError`."""
    if space != constraints.space:
        raise SearchError("the constraints were built for a different space")
    if int(n) < 1:
        raise SearchError(f"random search of budget {constraints.name!r}: n must be >= 1, got {n!r}")
    evo = _Evolution(space, constraints, {}, seed, max_tries)
    sample = evo.random_fill([], int(n), evo.rng(0, RANDOM_PURPOSE))
    if not sample:
        raise SearchError(f"budget {constraints.describe()}: no legal architecture in "
                          f"{max_tries * int(n)} random draws (random search)")
    if len(sample) < int(n):
        warnings.warn(f"budget {constraints.describe()}: the random search found {len(sample)} "
                      f"distinct legal architectures of the {n} asked for; the budget is narrow")
    known = {} if cache is None else cache.scores
    canon = [space.canonical(a) for a in sample]
    todo = [a for a in canon if a.arch_id not in known]
    new = dict(zip([a.arch_id for a in todo], np.asarray(scorer.scores(todo), np.float64).tolist())) \
        if todo else {}
    scores = {a.arch_id: float(known[a.arch_id] if a.arch_id in known else new[a.arch_id]) for a in canon}
    finite = [(s, k) for k, s in scores.items() if math.isfinite(s)]
    if not finite:
        raise SearchError(f"budget {constraints.describe()}: every random architecture scored "
                          f"non-finite")
    score, best_id = min(finite)
    best = next(a for a in canon if a.arch_id == best_id)
    m = constraints.measures(best)
    return RandomResult(budget=constraints.name, best=best, score=score, params=int(m["params"]),
                        flops=int(m["flops"]), latency_ms=m.get("latency_ms"), sample=scores,
                        archs={a.arch_id: a for a in canon})
