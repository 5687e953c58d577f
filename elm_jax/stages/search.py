"""The ``search`` stage: evolutionary search of every budget over the trained supernet.

Loads ``WORKDIR/supernet/final``, the per-device latency table when latency is predicted, and
scores candidates with :class:`~elm_jax.search.scoring.PopulationScorer` inside
:func:`~elm_jax.search.evolution.evolutionary_search` for each budget of ``search.budgets``
(:mod:`elm_jax.search.constraints`). Writes ``WORKDIR/search/result.json`` (per budget the best
architecture, its score and measures, ``noise``: the fitness spread of the scored candidates and
its standard errors (:func:`~elm_jax.search.fitness_noise.population_noise`), also printed,
``evaluated``: how many distinct architectures its populations held, with ``search.random_control``
``random``: the random-search control's best of as many random legal architectures, scored by the
same scorer (:func:`~elm_jax.search.evolution.random_search`; exported and retrained as kind
``random_best``), and the Pareto sets of :mod:`elm_jax.search.pareto`),
``pareto.png`` and per-budget state files, so a restarted search resumes at the next generation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from elm_jax import latency as latency_lib
from elm_jax.arch import Arch
from elm_jax.distributed import is_main_process
from elm_jax.fileio import atomic_write_json
from elm_jax.search.constraints import Constraints, SearchError, check_feasible, parse_budgets
from elm_jax.search.fitness_noise import population_noise
from elm_jax.search.evolution import (RandomResult, ScoreCache, SearchResult, evolutionary_search,
                                      random_search)
from elm_jax.search.pareto import pareto_sets, plot_pareto
from elm_jax.search.rerank import ShortTraining, rerank, top_candidates
from elm_jax.search.scoring import PopulationScorer

# ----------------------------------------------------------------------------------
# The search stage
# ----------------------------------------------------------------------------------

def _budget_entry(res: SearchResult, task: str, noise: Mapping[str, Any],
                  rnd: RandomResult | None = None,
                  reranked: Mapping[str, Any] | None = None) -> dict[str, Any]:
    e = {"arch": res.best.to_dict(), "arch_id": res.best.arch_id, "describe": res.best.describe(),
         "score": res.score, "params": res.params, "flops": res.flops,
         "latency_ms": res.latency_ms, "history": res.history, "scored": len(res.scored),
         "evaluated": len(res.evaluated), "noise": dict(noise)}
    if reranked and "found" in reranked:
        e["rerank"] = reranked["found"]
    if rnd is not None:
        e["random"] = rnd.to_dict()
        if reranked and "random" in reranked:
            e["random"]["rerank"] = reranked["random"]
    if task == "clm":
        e["perplexity"] = math.exp(res.score)
        if rnd is not None:
            e["random"]["perplexity"] = math.exp(rnd.score)
    return e


def _describe_noise(n: Mapping[str, Any]) -> str:
    """One line: the fitness spread of the scored candidates beside its paired standard error."""
    ratio = "n/a" if n["ratio"] is None else f"{n['ratio']:.1f}x"
    verdict = ("" if n["ratio"] is None else "  (ranks signal)" if n["ratio"] >= 5
               else "  RANKS MOSTLY NOISE: more search batches (search.eval_batches) sharpen it")
    return (f"fitness spread (sd over {n['candidates']} scored) {n['spread']:.4f} nats, range "
            f"{n['range']:.4f}; standard error on {n['rows']} rows: {n['se']:.4f} per candidate, "
            f"{n['paired_se']:.4f} paired against the best; spread / paired SE = {ratio}{verdict}")


def _reranked(res: SearchResult | RandomResult, pool: Mapping[str, float], archs: Mapping[str, Arch],
              c: Constraints, k: int, short: ShortTraining, runs: str):
    """``res`` with its best replaced by the lowest short-training loss among the ``k``
    best-scoring legal architectures of ``pool`` (``{arch_id: fitness}``, the architectures in
    ``archs``; :mod:`elm_jax.search.rerank`; the trainings under ``rerank/<runs>/``), and the
    record of that re-ranking (``fitness_best``: the architecture the fitness alone chose)."""
    ids = top_candidates(pool, archs, c.ok, k)
    best_id, rows = rerank(ids, pool, archs, lambda a, name: short.rows(a, f"{runs}/{name}"),
                           tie_level=short.tie_level)
    best = archs[best_id]
    m = c.measures(best)
    out = dataclasses.replace(res, best=best, score=float(pool[best_id]), params=int(m["params"]),
                              flops=int(m["flops"]), latency_ms=m.get("latency_ms"))
    return out, {"candidates": rows, "fitness_best": res.best.arch_id, "split": "search"}


def run(cfg: Any, workdir: str | os.PathLike, data: Any,
                     latency_fn: Callable[[Arch], float] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """The ``search`` stage: one evolutionary search per budget over the trained supernet.

    Loads ``WORKDIR/supernet/final``, scores candidates on the first ``search.eval_batches``
    batches of the SEARCH split (``data.search``, disjoint from train and from the validation
    split on which the final models are compared, DESIGN 1.6) with one compiled
    :class:`PopulationScorer` (mesh from ``cfg.mesh``), checks every budget's feasibility before
    searching, runs the budgets in order (state files ``WORKDIR/search/state_<name>.json``, one
    shared score cache), and writes
    ``WORKDIR/search/pareto.png`` and ``WORKDIR/search/result.json`` (per budget: arch, id,
    describe, score = loss, perplexity for CLM, params, flops, latency; the Pareto sets over all
    scored architectures; ``budget_names`` keeps the config order, since the JSON keys are
    sorted). A complete result.json for the same budget names is returned as is; an interrupted
    stage resumes each budget from its state file. A SIGTERM (preemption notice) stops the search
    after the generation in flight, whose state is on disk, with :class:`~elm_jax.preemption.Preempted`.
    """
    from elm_jax import preemption
    from elm_jax.engine import sharding
    from elm_jax.models.io import load_supernet

    out = Path(workdir) / "search"
    result_path = out / "result.json"
    budgets = [dict(b) for b in cfg.search.budgets]
    names = [name for name, _ in parse_budgets(budgets)]  # the config's own check, repeated
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        controls = not cfg.search.random_control or all(
            "random" in b for b in done.get("budgets", {}).values())
        if done.get("complete") and done.get("budget_names") == names and controls:
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
    if latency_fn is None and latency_lib.wanted(cfg):  # latency bounds or latency.predict
        table = latency_lib.load_or_build(space, cfg.latency, seq_len)
        latency_fn = lambda arch: table.predict_ms(space, arch, widths)  # noqa: E731
    constraints = [Constraints.from_budget(b, space, widths, seq_len, latency_fn) for b in budgets]
    for c in constraints:
        check_feasible(space, widths, c)

    n_batches = min(int(cfg.search.eval_batches), len(data.search))
    batches = [data.search.global_batch(k) for k in range(n_batches)]
    mesh = sharding.make_mesh(cfg.mesh)
    n_dev = int(mesh.devices.size)
    capacity = -(-int(cfg.search.population) // n_dev) * n_dev
    scorer = PopulationScorer(net, widths, batches, mesh, capacity=capacity)
    print(f"[search] {len(budgets)} budget(s), population {cfg.search.population} x "
          f"{cfg.search.generations} generations; {n_batches} search-split batches; "
          f"{capacity} architectures per compiled call over {n_dev} device(s)")

    writer = is_main_process()
    k_rerank = int(cfg.search.get("rerank_top", 0))
    short = None
    if k_rerank:
        from elm_jax.lm import load_teacher

        short = ShortTraining(cfg, load_teacher(workdir), data, mesh, out / "rerank", net, widths)
        print(f"[search] re-ranking each budget's {k_rerank} best by {cfg.search.rerank_steps} steps of "
              f"standalone KD training, scored on the search split; short losses within the "
              f"{cfg.search.rerank_tie_level:.0%} paired interval of the lowest tie, the fitness decides")
    reranked: dict[str, dict[str, Any]] = {}
    cache = ScoreCache()
    results: dict[str, SearchResult] = {}
    noise: dict[str, dict[str, Any]] = {}
    randoms: dict[str, RandomResult] = {}
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
        noise[c.name] = population_noise(scorer.rows_of([cache.archs[k] for k in res.scored]))
        ppl = f", perplexity {math.exp(res.score):.2f}" if space.task == "clm" else ""
        lat = f", {res.latency_ms:.3f} ms" if res.latency_ms is not None else ""
        print(f"[search] {c.describe()} -> {res.best.describe()}  loss {res.score:.4f}{ppl}, "
              f"{res.params:,} params, {res.flops:,} FLOPs{lat} ({len(res.scored)} scored)")
        print(f"[search] {c.name}: {_describe_noise(noise[c.name])}")
        if short is not None:
            res, rr = _reranked(res, res.scored, cache.archs, c, k_rerank, short, c.name)
            results[c.name] = res
            reranked.setdefault(c.name, {})["found"] = rr
            print(f"[search] {c.name}: re-ranked " + ", ".join(
                f"{r['describe']} {r['fitness']:.4f} -> {r['short_loss']:.4f}"
                + (" (tied with the lowest)" if r["tied"] else "") for r in rr["candidates"])
                  + f"; best {res.best.describe()}")
        if cfg.search.random_control:  # as many random legal architectures, the same scorer
            rnd = randoms[c.name] = random_search(space, scorer, c, len(res.evaluated), int(cfg.seed),
                                                  cache=cache)
            if short is not None:  # the control re-ranked as the evolution's best was
                rnd, rr = _reranked(rnd, rnd.sample, rnd.archs, c, k_rerank, short, f"{c.name}_random")
                randoms[c.name] = rnd
                reranked.setdefault(c.name, {})["random"] = rr
            print(f"[search] {c.name}: random-search control, best of {len(rnd.sample)} random "
                  f"legal architectures: {rnd.best.describe()} loss {rnd.score:.4f} "
                  f"({rnd.params:,} params); random minus evolution {rnd.score - res.score:+.4f} nats "
                  f"on the search split")

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
              "eval_split": data.search.split,
              "budget_names": names,
              "budgets": {n: _budget_entry(r, space.task, noise[n], randoms.get(n), reranked.get(n))
                          for n, r in results.items()},
              "pareto": pareto, "scored": entries,
              "scorer": {"capacity": capacity, "devices": n_dev, "calls": scorer.calls,
                         "compilations": scorer.compilations()}}
    if writer:
        plot_pareto(entries, out / "pareto.png")  # written atomically
        atomic_write_json(result_path, result)
    print(f"[search] Pareto set (loss vs params): {len(fronts['params'])} of {len(entries)} scored "
          f"architectures; {scorer.calls} scoring calls, {scorer.compilations()} compilation(s) "
          f"-> {result_path}")
    return result

