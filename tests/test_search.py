"""Search: one-compile population scoring == extracted dense models, constraints, feasibility,
Pareto fronts, resume == uninterrupted, and the search stage end to end."""

from __future__ import annotations

import itertools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from elm_jax.engine import sharding
from elm_jax.engine.losses import weighted_cross_entropy
from elm_jax.arch import Arch, LayerChoice
from elm_jax.accounting import count_flops, count_params
from elm_jax.models.elastic import init_supernet
from elm_jax.search.constraints import Constraints, SearchError, check_feasible
from elm_jax.search.scoring import PopulationScorer
from elm_jax.search.evolution import ScoreCache, evolutionary_search, random_search
from elm_jax.search.pareto import pareto_front
from elm_jax.search.pareto import plot_pareto
from elm_jax.accounting import reachable_ranges
from elm_jax.stages.search import run as run_search_stage
from elm_jax.space import SearchSpace

VOCAB, SEQ, CAPACITY = 97, 12, 8


def make_space(task: str) -> SearchSpace:
    base = {"layers": 3, "hidden": 24, "inner": 12, "embed_size": 8, "candidates": 3, "f0": 4,
            "base_heads": 4, "families": ("bert", "mobilebert"), "elastic_depth": True,
            "min_layers": 1, "max_ffn": {"bert": 20, "mobilebert": 16}}
    return SearchSpace.from_config(ConfigDict(base), vocab_size=VOCAB, max_len=SEQ, task=task)


def grown_widths(space: SearchSpace, rng: np.random.Generator) -> np.ndarray:
    w = space.initial_widths() + space.f0 * rng.integers(0, 3, space.initial_widths().shape)
    return np.minimum(w, space.max_widths()).astype(np.int32)


def random_supernet(space: SearchSpace, seed: int):
    """A supernet with large random weights: its architectures' losses differ clearly (the
    default init gives near-uniform logits, every loss ~ log V)."""
    net = init_supernet(space, seed=seed)
    rng = np.random.default_rng(seed)
    state = nnx.state(net, nnx.Param)
    state = jax.tree.map(lambda v: jnp.asarray(np.asarray(v) + 0.3 * rng.standard_normal(v.shape)
                                               .astype(v.dtype)), state)
    nnx.update(net, state)
    return net


def make_batches(task: str, rng: np.random.Generator, k: int = 2, b: int = 4) -> list[dict]:
    out = []
    for _ in range(k):
        ids = rng.integers(5, VOCAB, (b, SEQ)).astype(np.int32)
        mask = np.ones((b, SEQ), np.int32)
        mask[1, 8:] = 0
        mask[3, 5:] = 0
        if task == "clm":
            targets = np.roll(ids, -1, axis=1)
            weights = mask * np.roll(mask, -1, axis=1)
            weights[:, -1] = 0
        else:
            targets = rng.integers(5, VOCAB, (b, SEQ)).astype(np.int32)
            weights = (rng.random((b, SEQ)) < 0.4) * mask
        out.append({"inputs": ids, "targets": targets.astype(np.int32),
                    "weights": weights.astype(np.float32), "mask": mask,
                    "segment_ids": np.zeros((b, SEQ), np.int32)})
    return out


SEARCH_CFG = ConfigDict({"population": 8, "generations": 4, "parents": 3, "mutations": 3,
                         "crossovers": 2, "mutation_prob": 0.3, "eval_batches": 2})


@pytest.fixture(scope="module")
def mlm():
    space = make_space("mlm")
    rng = np.random.default_rng(0)
    widths = grown_widths(space, rng)
    net = random_supernet(space, seed=3)
    mesh = sharding.make_mesh(ConfigDict({"data": 4, "fsdp": 2}))  # archs split over both axes
    scorer = PopulationScorer(net, widths, make_batches("mlm", rng), mesh, capacity=CAPACITY)
    return space, widths, scorer


def test_population_scores_equal_extracted_dense_models(mlm):
    space, widths, scorer = mlm
    rng = np.random.default_rng(1)
    archs = [space.sample(rng) for _ in range(7)] + [space.largest(widths), space.smallest(widths)]
    got = scorer.scores(archs)  # 9 > capacity 8: two calls, the second padded
    assert got.shape == (len(archs),) and np.isfinite(got).all()
    ref = np.array([scorer.score_one(a) for a in archs])  # dense model, head at every position
    assert scorer._gathered is not None  # the scorer evaluated the head at scored positions only
    assert scorer._gathered["positions"].shape[-1] < SEQ
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.ptp(got) > 0.1 and len(set(np.round(got, 3))) > 5  # architectures really differ
    assert scorer.compilations() == 1


def test_row_sums_are_each_rows_loss_under_the_dense_model(mlm):
    """The per-row sums behind the fitness's standard error: each row's loss, token count and
    correct count equal the extracted dense model's on that row alone, and they add up to the
    fitness."""
    from elm_jax.models.extract import extract

    space, widths, scorer = mlm
    rng = np.random.default_rng(5)
    archs = [space.sample(rng) for _ in range(3)]
    rows = scorer.rows_of(archs)
    b = scorer._batches_np
    assert rows.shape == (3, b["inputs"].shape[0] * b["inputs"].shape[1], 3)
    for a, got in zip(archs, rows):
        dense = extract(scorer.net, widths, a)
        ref = []
        for k in range(b["inputs"].shape[0]):
            out = dense(b["inputs"][k], b["mask"][k], b["segment_ids"][k])
            for r in range(b["inputs"].shape[1]):
                s = weighted_cross_entropy(out.logits[r:r + 1], b["targets"][k][r:r + 1], b["weights"][k][r:r + 1])
                ref.append([float(s["loss_sum"]), float(s["weight_sum"]), float(s["correct_sum"])])
        np.testing.assert_allclose(got, np.array(ref), atol=2e-4, rtol=1e-5)
    np.testing.assert_allclose(rows[:, :, 0].sum(1) / rows[:, :, 1].sum(1), scorer.scores(archs), rtol=1e-12)
    calls = scorer.calls
    np.testing.assert_array_equal(scorer.rows_of(archs[::-1]), rows[::-1])  # kept, not rescored
    assert scorer.calls == calls


def test_clm_scores_and_perplexity():
    space = make_space("clm")
    rng = np.random.default_rng(2)
    widths = grown_widths(space, rng)
    scorer = PopulationScorer(random_supernet(space, seed=4), widths, make_batches("clm", rng, k=1),
                              sharding.make_mesh(ConfigDict({"data": -1, "fsdp": 1})))
    archs = [space.sample(rng) for _ in range(4)]
    ev = scorer.evaluate(archs)
    assert scorer.capacity == 8  # first call fixed it: 4 rounded up to the 8 devices
    np.testing.assert_allclose(ev["loss"], [scorer.score_one(a) for a in archs], atol=1e-4)
    np.testing.assert_allclose(ev["perplexity"], np.exp(ev["loss"]), rtol=1e-12)


def test_one_compilation_for_any_population(mlm):
    space, _widths, scorer = mlm
    rng = np.random.default_rng(3)
    fixed = space.sample(rng)
    seen = []
    for n in (1, 3, 8, 5, 13):
        pop = [space.sample(rng) for _ in range(n - 1)] + [fixed]
        rng.shuffle(pop)
        s = scorer.scores(pop)
        seen.append(s[[a is fixed for a in pop].index(True)])
    assert scorer.compilations() == 1
    np.testing.assert_allclose(seen, seen[0], atol=1e-6)  # position and company do not matter


def test_constraints_measures_and_violation(mlm):
    space, widths, _ = mlm
    rng = np.random.default_rng(4)
    lo, hi = reachable_ranges(space, widths, SEQ)["params"]
    mid = (lo + hi) / 2
    c = Constraints.from_budget({"name": "mid", "min_params": lo + 0.1 * (hi - lo), "max_params": mid,
                                 "max_flops": 1e12}, space, widths, SEQ)
    seen = {True: 0, False: 0}
    for _ in range(200):
        a = space.sample(rng)
        p = count_params(space, a, widths)
        assert c.measures(a) == {"params": p, "flops": count_flops(space, a, widths, SEQ)}
        want = max(0.0, (p - mid) / mid) + max(0.0, (lo + 0.1 * (hi - lo) - p) / (lo + 0.1 * (hi - lo)))
        assert c.violation(a) == pytest.approx(want)
        assert c.ok(a) == (lo + 0.1 * (hi - lo) <= p <= mid)
        seen[c.ok(a)] += 1
    assert seen[True] and seen[False]
    with pytest.raises(SearchError, match="latency table"):
        Constraints.from_budget({"name": "fast", "max_latency_ms": 1.0}, space, widths, SEQ)
    with pytest.raises(SearchError, match="unknown keys"):
        Constraints.from_budget({"name": "x", "max_param": 1}, space, widths, SEQ)
    with pytest.raises(SearchError, match="exceeds max_params"):
        Constraints.from_budget({"name": "x", "min_params": 2, "max_params": 1}, space, widths, SEQ)


def _all_archs(space: SearchSpace):
    """Every canonical architecture of the (small) space."""
    per_layer = [LayerChoice(f, j, h, True) for f in space.families
                 for j in range(space.candidates) for h in space.head_choices]
    per_layer.append(LayerChoice(space.families[0], 0, space.head_choices[0], False))
    for layers in itertools.product(per_layer, repeat=space.layers):
        if sum(lc.active for lc in layers) >= space.min_layers:
            yield Arch(layers)


def test_reachable_ranges_are_exact_and_impossible_budgets_raise(mlm):
    space, widths, _ = mlm
    params, flops = [], []
    for a in _all_archs(space):
        params.append(count_params(space, a, widths))
        flops.append(count_flops(space, a, widths, SEQ))
    r = reachable_ranges(space, widths, SEQ)
    assert r["params"] == (min(params), max(params)) and r["flops"] == (min(flops), max(flops))
    lo, hi = r["params"]
    rng_text = f"[{lo:,.0f}, {hi:,.0f}]"
    for budget, what in (({"name": "tiny", "max_params": lo - 1}, "max_params"),
                         ({"name": "huge", "min_params": hi + 1}, "min_params"),
                         ({"name": "cheap", "max_flops": r["flops"][0] / 2}, "max_flops")):
        c = Constraints.from_budget(budget, space, widths, SEQ)
        with pytest.raises(SearchError) as e:
            check_feasible(space, widths, c)
        msg = str(e.value)
        assert budget["name"] in msg and what in msg and "reachable" in msg
        if "params" in what:
            assert rng_text in msg
    # feasible bounds pass; an exactly unreachable value passes the range check but the search
    # finds no legal architecture and says so
    ok = Constraints.from_budget({"name": "edge", "max_params": lo}, space, widths, SEQ)
    check_feasible(space, widths, ok)
    never = Constraints.from_budget({"name": "never", "min_params": lo + 0.5, "max_params": lo + 0.5},
                                    space, widths, SEQ)
    check_feasible(space, widths, never)
    with pytest.raises(SearchError, match="no legal architecture"):
        evolutionary_search(space, widths, None, never, SEARCH_CFG, seed=0, progress=False)


class Recording:
    """Wraps a scorer; records every architecture it is asked to score."""

    def __init__(self, scorer):
        self.scorer, self.seen = scorer, []

    def scores(self, archs):
        self.seen.extend(archs)
        return self.scorer.scores(archs)

    def fingerprint(self):
        return self.scorer.fingerprint()


@pytest.fixture(scope="module")
def budget(mlm):
    space, widths, _ = mlm
    lo, hi = reachable_ranges(space, widths, SEQ)["params"]
    return Constraints.from_budget({"name": "half", "max_params": lo + 0.5 * (hi - lo)},
                                   space, widths, SEQ)


@pytest.fixture(scope="module")
def uninterrupted(mlm, budget, tmp_path_factory):
    space, widths, scorer = mlm
    rec = Recording(scorer)
    pops = []
    path = tmp_path_factory.mktemp("search") / "state_half.json"
    res = evolutionary_search(space, widths, rec, budget, SEARCH_CFG, seed=7, state_path=path,
                              progress=False, callback=lambda g, st: pops.append(st["population"]))
    return res, rec, pops, path


def test_search_respects_constraints_and_finds_the_best_scored(uninterrupted, mlm, budget):
    space, widths, scorer = mlm
    res, rec, pops, path = uninterrupted
    assert len(pops) == SEARCH_CFG.generations and res.complete
    assert rec.seen and all(budget.ok(a) for a in rec.seen)
    ids = [a.arch_id for a in rec.seen]
    assert len(ids) == len(set(ids)) == len(res.scored)  # every arch scored once (cache)
    raw_genes = 0
    for pop in pops:
        archs = [Arch.from_dict(d) for d in pop]
        assert len(archs) == SEARCH_CFG.population
        assert len({space.canonical(a).arch_id for a in archs}) == len(archs)  # distinct models
        assert all(budget.ok(a) for a in archs)
        raw_genes += sum(space.canonical(a) != a for a in archs)
    assert raw_genes > 0  # skipped layers keep their genes (the canonical form is only a key)
    assert budget.ok(res.best) and res.params <= budget.bounds["max_params"]
    assert res.score == min(res.scored.values())
    assert res.score == pytest.approx(scorer.score_one(res.best), abs=1e-4)
    assert res.params == count_params(space, res.best, widths)
    best = [h["best_so_far"] for h in res.history]
    assert best == sorted(best, reverse=True) and best[-1] == res.score
    state = json.loads(path.read_text())
    assert state["generation"] == SEARCH_CFG.generations - 1 and state["cache"] == res.scored


def test_resume_after_interrupt_gives_the_same_result(uninterrupted, mlm, budget, tmp_path):
    space, widths, scorer = mlm
    res = uninterrupted[0]
    # stopped after 2 generations, then resumed from the state file
    path = tmp_path / "state_half.json"
    part = evolutionary_search(space, widths, scorer, budget, SEARCH_CFG, seed=7, state_path=path,
                               progress=False, max_generations=2)
    assert not part.complete and json.loads(path.read_text())["generation"] == 1
    rec = Recording(scorer)
    resumed = evolutionary_search(space, widths, rec, budget, SEARCH_CFG, seed=7, state_path=path,
                                  progress=False)
    assert resumed.to_dict() == res.to_dict()
    assert not {a.arch_id for a in rec.seen} & set(part.scored)  # nothing scored twice
    # a crash inside generation 2 (after its state was written), then a restart
    path2 = tmp_path / "crash.json"

    def crash(g, state):
        if g == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evolutionary_search(space, widths, scorer, budget, SEARCH_CFG, seed=7, state_path=path2,
                            progress=False, callback=crash)
    again = evolutionary_search(space, widths, scorer, budget, SEARCH_CFG, seed=7, state_path=path2,
                                progress=False)
    assert again.to_dict() == res.to_dict()
    # a state of another search is refused, not silently reused
    other = Constraints.from_budget({"name": "half", "max_params": budget.bounds["max_params"] - 1},
                                    space, widths, SEQ)
    with pytest.raises(SearchError, match="different search"):
        evolutionary_search(space, widths, scorer, other, SEARCH_CFG, seed=7, state_path=path2,
                            progress=False)


def test_evolution_records_the_architectures_it_evaluated(uninterrupted, mlm):
    space, _, _ = mlm
    res, rec, pops, _ = uninterrupted
    in_pops = {space.canonical(Arch.from_dict(d)).arch_id for pop in pops for d in pop}
    assert set(res.evaluated) == in_pops and len(res.evaluated) == len(in_pops)
    # on its own cache every population member was scored by this search
    assert in_pops == {space.canonical(a).arch_id for a in rec.seen}


def test_random_search_control_is_the_best_of_its_own_legal_draws(uninterrupted, mlm, budget):
    space, widths, scorer = mlm
    res = uninterrupted[0]
    n = len(res.evaluated)
    rec = Recording(scorer)
    r = random_search(space, rec, budget, n, seed=7)
    assert len(r.sample) == n and len(set(r.sample)) == n
    drawn = [space.canonical(a) for a in rec.seen]
    assert {a.arch_id for a in drawn} == set(r.sample) and all(budget.ok(a) for a in drawn)
    # its best is the minimum of its own sample, each score the extracted model's loss
    assert r.score == min(r.sample.values()) and r.best.arch_id in r.sample
    for a in drawn[:4]:
        assert r.sample[a.arch_id] == pytest.approx(scorer.score_one(a), abs=1e-4)
    assert r.params == count_params(space, r.best, widths) <= budget.bounds["max_params"]
    # deterministic, its own stream (not the evolution's generation 0), seed-dependent
    assert random_search(space, scorer, budget, n, seed=7).to_dict() == r.to_dict()
    gen0 = {space.canonical(Arch.from_dict(d)).arch_id for d in uninterrupted[2][0]}
    assert set(r.sample) != gen0
    assert set(random_search(space, scorer, budget, n, seed=8).sample) != set(r.sample)
    # the evolution's cache is read (same scores, nothing rescored), never written
    cache = ScoreCache()
    known = drawn[:3]
    for a in known:
        cache.add(a, r.sample[a.arch_id])
    rec2 = Recording(scorer)
    again = random_search(space, rec2, budget, n, seed=7, cache=cache)
    assert again.sample == r.sample and len(cache) == 3
    assert {a.arch_id for a in rec2.seen} == set(r.sample) - {a.arch_id for a in known}
    with pytest.raises(SearchError, match="n must be"):
        random_search(space, scorer, budget, 0, seed=7)


def test_shared_cache_and_latency_budgets(mlm, budget):
    space, widths, scorer = mlm
    latency = lambda a: 0.01 * a.num_active + 1e-6 * count_params(space, a, widths)
    c = Constraints.from_budget({"name": "fast", "max_latency_ms": 0.025}, space, widths, SEQ,
                                latency_fn=latency)
    cache = ScoreCache()
    cfg = ConfigDict(SEARCH_CFG.to_dict() | {"generations": 2})
    r1 = evolutionary_search(space, widths, scorer, budget, cfg, seed=1, progress=False, cache=cache)
    n1 = len(cache)
    rec = Recording(scorer)
    r2 = evolutionary_search(space, widths, rec, c, cfg, seed=1, progress=False, cache=cache)
    assert r2.latency_ms is not None and r2.latency_ms <= 0.025 and r1.latency_ms is None
    assert all(latency(a) <= 0.025 for a in rec.seen)
    assert len(cache) == n1 + len(rec.seen)  # the second budget reuses the first's scores
    legal = [s for k, s in cache.scores.items() if c.ok(cache.archs[k])]
    assert r2.score == min(legal)


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(5)
    for trial in range(60):
        n = int(rng.integers(1, 40))
        pts = [(float(q), float(c)) for q, c in rng.integers(0, 6 if trial % 2 else 1000, (n, 2))]
        if trial % 7 == 0:
            pts.append((math.nan, 0.0))
        brute = [i for i, (q, c) in enumerate(pts)
                 if math.isfinite(q) and not any(
                     (q2 <= q and c2 <= c and (q2 < q or c2 < c)) for q2, c2 in pts
                     if math.isfinite(q2))]
        got = pareto_front(pts)
        assert sorted(got) == brute
        costs = [pts[i][1] for i in got]
        assert costs == sorted(costs)
        qs = [pts[i][0] for i in got]
        assert qs == sorted(qs, reverse=True)  # cheaper points on the front are worse
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 2.0), (1.0, 2.0)]) == [0, 1]  # identical: neither dominates


def test_plot_pareto_writes_a_png(tmp_path):
    rng = np.random.default_rng(6)
    entries = [{"score": float(s), "params": int(p), "latency_ms": float(p) / 1e5,
                "best_for": ["small"] if i == 3 else []}
               for i, (s, p) in enumerate(zip(rng.random(30) + 3, rng.integers(1e4, 1e5, 30)))]
    out = plot_pareto(entries, tmp_path / "pareto.png")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.fidelity
def test_search_stage_end_to_end(tmp_path, capsys):
    from elm_jax.config import load_config
    from elm_jax.lm import lm_eval_fn
    from elm_jax.models.extract import extract
    from elm_jax.data.prepare import prepare_data
    from elm_jax.models.io import save_supernet
    from elm_jax.stages.supernet import space_of

    cfg = load_config("configs/mlm.py:test")
    data = prepare_data(cfg)
    space = space_of(cfg, data.tokenizer.vocab_size)
    widths = space.initial_widths()
    save_supernet(tmp_path / "supernet" / "final", init_supernet(space, seed=0), widths, history=[])
    lo, hi = reachable_ranges(space, widths, cfg.data.seq_len)["params"]
    cfg.search.update(population=8, generations=2, parents=3, mutations=3, crossovers=2,
                      eval_batches=2)
    cfg.search.budgets = [{"name": "small", "max_params": int(lo + 0.4 * (hi - lo))},
                          {"name": "any"}]
    cfg.search.random_control = True
    result = run_search_stage(cfg, tmp_path, data, progress=False)
    out = tmp_path / "search"
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "pareto.png").stat().st_size > 1000
    assert (out / "state_small.json").is_file() and (out / "state_any.json").is_file()
    assert result["complete"] and list(result["budgets"]) == ["small", "any"]
    small, anyb = result["budgets"]["small"], result["budgets"]["any"]
    assert small["params"] <= lo + 0.4 * (hi - lo)
    assert Arch.from_dict(small["arch"]).arch_id == small["arch_id"]
    assert anyb["score"] == min(e["score"] for e in result["scored"])  # shared cache
    assert anyb["score"] <= small["score"]
    front = result["pareto"]["params"]
    assert front and all(e["arch_id"] for e in front)
    assert [e["params"] for e in front] == sorted(e["params"] for e in front)
    assert result["scorer"]["compilations"] == 1
    # the fitness is the extracted model's loss on the SEARCH split's first batches, which is not
    # the validation split the final models are compared on (DESIGN 1.6)
    assert result["eval_split"] == "search"
    dense = extract(init_supernet(space, seed=0), widths, Arch.from_dict(anyb["arch"]))
    sums = [lm_eval_fn(dense, data.search.global_batch(k)) for k in range(2)]
    want = sum(float(x["loss_sum"]) for x in sums) / sum(float(x["weight_sum"]) for x in sums)
    assert anyb["score"] == pytest.approx(want, rel=1e-5)
    val = [lm_eval_fn(dense, data.eval.global_batch(k)) for k in range(2)]
    assert abs(anyb["score"] - sum(float(x["loss_sum"]) for x in val)
               / sum(float(x["weight_sum"]) for x in val)) > 1e-3
    out_text = capsys.readouterr().out
    lines = [l for l in out_text.splitlines() if " loss " in l and "FLOPs" in l]
    assert len(lines) == 2
    # the fitness noise of each budget's scored candidates, printed and kept
    noise = anyb["noise"]
    assert noise["candidates"] == anyb["scored"] and noise["rows"] > 0
    assert noise["range"] == pytest.approx(max(e["score"] for e in result["scored"]) - anyb["score"], rel=1e-6)
    assert 0 < noise["paired_se"] and noise["ratio"] == pytest.approx(noise["spread"] / noise["paired_se"])
    assert sum("fitness spread" in l and "paired SE" in l for l in out_text.splitlines()) == 2
    # the random-search control: as many random legal architectures as the evolution evaluated,
    # scored on the same batches; its best is the minimum of its own sample
    for b, bound in ((small, lo + 0.4 * (hi - lo)), (anyb, math.inf)):
        rnd = b["random"]
        assert rnd["sampled"] == len(rnd["sample"]) == b["evaluated"] >= SEARCH_CFG.population
        assert rnd["score"] == min(rnd["sample"].values()) and rnd["params"] <= bound
        assert rnd["score"] >= b["score"] or b is small  # 'any' searched everything scored
    dense = extract(init_supernet(space, seed=0), widths, Arch.from_dict(small["random"]["arch"]))
    sums = [lm_eval_fn(dense, data.search.global_batch(k)) for k in range(2)]
    assert small["random"]["score"] == pytest.approx(
        sum(float(x["loss_sum"]) for x in sums) / sum(float(x["weight_sum"]) for x in sums), rel=1e-5)
    assert sum("random-search control" in l for l in out_text.splitlines()) == 2
    # a complete result is reused, not recomputed
    assert run_search_stage(cfg, tmp_path, data, progress=False) == json.loads(
        (out / "result.json").read_text())
    assert "complete already" in capsys.readouterr().out
    # ... unless it lacks the random control now asked for: the evolution resumes (finished) from
    # its state files and the control is added, the same figures
    bare = json.loads((out / "result.json").read_text())
    for b in bare["budgets"].values():
        del b["random"]
    (out / "result.json").write_text(json.dumps(bare))
    again = run_search_stage(cfg, tmp_path, data, progress=False)
    assert "complete already" not in capsys.readouterr().out
    want = json.loads(json.dumps(result))
    assert {k: v for k, v in again.items() if k != "scorer"} == {
        k: v for k, v in want.items() if k != "scorer"}  # scorer: its calls differ


BAD_BUDGETS = [
    {"name": "x", "max_parms": 1},
    {"name": "x", "max_params": "16k"},
    {"name": "x", "max_flops": -1},
    {"name": "x", "max_params": float("nan")},
    {"name": "x", "min_flops": True},
    {"name": "a b"},
    {"name": "teacher"},
    {"name": 3},
    {"max_params": 10},
    {"name": "x", "min_params": 2, "max_params": 1},
    {"name": "x", "min_latency_ms": 2.0, "max_latency_ms": 1.5},
]


@pytest.mark.parametrize("bad", BAD_BUDGETS, ids=[repr(b) for b in BAD_BUDGETS])
def test_config_and_constraints_reject_a_bad_budget_with_the_same_reason(mlm, bad):
    """One parser: config.validate and Constraints.from_budget give the same field, reason and
    value for every bad budget (the config prefixes ``config.search.budgets[i]``)."""
    from elm_jax.config import ConfigError, load_config, validate
    from elm_jax.search.constraints import budget_field

    space, widths, _ = mlm
    with pytest.raises(SearchError) as e:
        Constraints.from_budget(bad, space, widths, SEQ)
    err = e.value
    lone = budget_field(bad)
    assert err.reason and err.field.startswith(lone) and str(err).startswith(f"{err.field}: {err.reason}")
    cfg = load_config("configs/mlm.py:test")
    cfg.search.budgets = [{"name": "fine", "max_params": 10**9}, bad]
    with pytest.raises(ConfigError) as c:
        validate(cfg, ["search"])
    want = f"config.search.budgets[1]{err.field[len(lone):]}: {err.reason}"
    assert str(c.value) == want + ("" if err.got is None else f" (got {err.got})")


def test_budget_list_checks_and_one_reachability_test(mlm):
    from elm_jax.search.constraints import check_reachable, parse_budgets

    space, widths, _ = mlm
    assert parse_budgets([{"name": "a", "max_params": 5}, {"name": "b"}]) == [
        ("a", {"max_params": 5.0}), ("b", {})]
    for budgets, needle in (([], "search.budgets: must be a non-empty list of dicts"),
                            ([{"name": "a"}, {"name": "a"}], "search.budgets: budget names must be unique"),
                            ([{"name": "a"}, {"name": "b", "max_flop": 1}], "search.budgets[1]: unknown keys")):
        with pytest.raises(SearchError, match="^" + re.escape(needle)):
            parse_budgets(budgets)
    # None is an absent bound, for the config and the constraints alike
    assert parse_budgets([{"name": "a", "max_params": None}]) == [("a", {})]
    # check_feasible is check_reachable at one widths state
    r = reachable_ranges(space, widths, SEQ)
    lo = r["params"][0]
    c = Constraints.from_budget({"name": "tiny", "max_params": lo - 1}, space, widths, SEQ)
    with pytest.raises(SearchError) as a:
        check_feasible(space, widths, c)
    with pytest.raises(SearchError) as b:
        check_reachable("tiny", c.bounds, r, r, field="search.budgets[0]")
    assert a.value.reason == b.value.reason and a.value.got == b.value.got == f"{lo - 1:,}"
    assert a.value.field == "budgets['tiny'].max_params" and b.value.field == "search.budgets[0].max_params"


BAD_SEARCH = [("population", 5), ("population", 0), ("generations", 2.0), ("parents", True),
              ("mutations", -1), ("crossovers", "2"), ("mutation_prob", 1.5), ("mutation_prob", -0.1),
              ("mutation_prob", "0.3"), ("eval_batches", 0)]


@pytest.mark.parametrize("key,value", BAD_SEARCH, ids=[f"{k}={v!r}" for k, v in BAD_SEARCH])
def test_config_and_search_reject_bad_search_settings_with_the_same_message(key, value):
    from elm_jax.config import ConfigError, load_config, validate
    from elm_jax.search.evolution import SEARCH_PARAMS, _search_params, check_search_params

    search = ConfigDict(SEARCH_CFG.to_dict())
    with search.ignore_type():
        search[key] = value
    with pytest.raises(SearchError) as e:
        check_search_params(search, SEARCH_PARAMS)
    assert e.value.field == f"search.{key}" and e.value.got == repr(value)
    if key != "eval_batches":  # the evolution's own check is the same one
        with pytest.raises(SearchError) as e2:
            _search_params(search)
        assert str(e2.value) == str(e.value)
    cfg = load_config("configs/mlm.py:test")
    cfg.search.update(SEARCH_CFG.to_dict())
    with cfg.search.ignore_type():
        cfg.search[key] = value
    with pytest.raises(ConfigError) as c:
        validate(cfg, ["search"])
    assert str(c.value) == f"config.{e.value}"
    assert str(c.value).startswith(f"config.search.{key}: ")


def test_search_params_are_the_evolution_settings():
    from elm_jax.search.evolution import _search_params

    p = _search_params(SEARCH_CFG)
    assert p == {"population": 8, "generations": 4, "parents": 3, "mutations": 3, "crossovers": 2,
                 "mutation_prob": 0.3}
    assert list(p) == ["population", "generations", "parents", "mutations", "crossovers", "mutation_prob"]
    with pytest.raises(SearchError, match=r"^search\.mutation_prob: missing field"):
        _search_params({k: v for k, v in SEARCH_CFG.items() if k != "mutation_prob"})
