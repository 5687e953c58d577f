"""elm_jax.search.rerank: the search's k best re-ranked by a short standalone KD training scored on
the search split; the random control re-ranked alike."""

from __future__ import annotations

import json

import os
import sys

import numpy as np
import pytest

from elm_jax.arch import Arch
from elm_jax.search.rerank import rerank, top_candidates

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


class _A:
    def __init__(self, name: str, params: int):
        self.name, self.params = name, params

    def describe(self) -> str:
        return self.name


def test_top_candidates_are_the_k_best_legal_finite_scores():
    scores = {"a": 4.3, "b": 4.1, "c": float("nan"), "d": 4.2, "e": 4.0, "f": 4.2}
    archs = {k: _A(k, 10 if k != "e" else 99) for k in scores}
    ok = lambda a: a.params < 50  # noqa: E731  ("e", the best score, breaks the budget)
    assert top_candidates(scores, archs, ok, 3) == ["b", "d", "f"]  # ties by id
    assert top_candidates(scores, archs, ok, 10) == ["b", "d", "f", "a"]


def _rows(losses, weights):
    """``[R, 3]`` rows with these per-row loss sums and token counts."""
    return np.stack([np.asarray(losses, float), np.asarray(weights, float), np.zeros(len(weights))], 1)


def test_rerank_plain_argmin_at_level_zero_ties_by_fitness():
    scores = {"a": 4.1, "b": 4.2, "c": 4.3}
    archs = {k: _A(k, 1) for k in scores}
    w = np.full(6, 10.0)
    short = {"a": _rows(w * 4.5, w), "b": _rows(w * 4.4, w), "c": _rows(w * 4.4, w)}
    names = []

    def rows(arch, name):
        names.append(name)
        return short[arch.name]

    best, out = rerank(["c", "a", "b"], scores, archs, rows, tie_level=0.0)
    assert best == "b"  # b and c tie on the short loss: b has the better fitness
    assert [(r["arch_id"], r["fitness"], r["short_loss"], r["tied"]) for r in out] == [
        ("a", 4.1, pytest.approx(4.5), False), ("b", 4.2, pytest.approx(4.4), True),
        ("c", 4.3, pytest.approx(4.4), True)]  # in fitness order, whatever order came in
    assert len(set(names)) == 3  # each candidate its own run
    with pytest.raises(ValueError, match="no candidate"):
        rerank([], scores, archs, rows)
    with pytest.raises(ValueError, match="tie_level"):
        rerank(["a"], scores, archs, rows, tie_level=1.0)


def test_rerank_ties_inside_the_paired_noise_go_to_the_fitness():
    rng = np.random.default_rng(0)
    R = 400
    w = rng.integers(5, 15, R).astype(float)
    base = w * 4.3 + rng.normal(0, 2.0, R)  # row difficulty, shared by every candidate

    def own(sd=0.5):  # a candidate's own row noise, summing to 0 (its loss moves by the shift alone)
        e = rng.normal(0, sd, R)
        return e - e.mean()

    short = {"a": _rows(base, w),                               # the fitness's pick
             "b": _rows(base + own() - 0.001 * w, w),           # lower by 0.001, less than its noise
             "c": _rows(base + own() + 0.05 * w, w)}            # clearly higher
    scores = {"a": 4.10, "b": 4.11, "c": 4.12}
    archs = {k: _A(k, 1) for k in scores}
    best, out = rerank(["a", "b", "c"], scores, archs, lambda a, n: short[a.name], tie_level=0.9)
    by = {r["arch_id"]: r for r in out}
    # an independent paired standard error: the delta method on the row differences
    L = {k: v[:, 0].sum() / w.sum() for k, v in short.items()}
    assert L["b"] == pytest.approx(L["a"] - 0.001) and min(L, key=L.get) == "b"
    d = (short["a"][:, 0] - L["a"] * w) - (short["b"][:, 0] - L["b"] * w)
    se = np.sqrt(R / (R - 1) * np.sum(d ** 2)) / w.sum()
    assert by["a"]["short_se"] == pytest.approx(se) and by["b"]["short_se"] == 0.0
    assert abs(L["a"] - L["b"]) < 1.645 * se  # a is inside b's noise: tied, and the better fitness
    assert by["a"]["tied"] and by["b"]["tied"] and not by["c"]["tied"]
    assert best == "a"
    # the plain argmin takes b
    assert rerank(["a", "b", "c"], scores, archs, lambda a, n: short[a.name], tie_level=0.0)[0] == "b"
    # and a clear winner wins at any level
    short["b"] = _rows(base + own() - 0.05 * w, w)
    assert rerank(["a", "b", "c"], scores, archs, lambda a, n: short[a.name], tie_level=0.9)[0] == "b"


def test_arch_of_a_description_extracts_the_same_layers():
    import rerank_rule
    from elm_jax.arch import LayerChoice

    a = Arch((LayerChoice("bert", 2, 4), LayerChoice("mobilebert", 1, 2, False), LayerChoice("mobilebert", 0, 1)))
    b = rerank_rule.arch_of(a.describe(), ["bert", "mobilebert"])
    assert b.describe() == a.describe() == "b2h4 - m0h1"
    assert [x for x in b.layers if x.active] == [x for x in a.layers if x.active]


def test_the_tie_level_is_part_of_the_search_fingerprint_only_when_reranking():
    from elm_jax.config import load_config
    from elm_jax.pipeline import BY_NAME
    from elm_jax.workdir import stage_fields

    cfg = load_config("configs/mlm.py:test")
    assert "search.rerank_tie_level" not in stage_fields(cfg, BY_NAME["search"])
    assert "search.eval_batches" in stage_fields(cfg, BY_NAME["search"])
    cfg.search.rerank_top = 2
    assert stage_fields(cfg, BY_NAME["search"])["search.rerank_tie_level"] == 0.9


def test_search_stage_reranks_its_best_and_the_random_controls(tmp_path, capsys):
    from elm_jax.config import load_config
    from elm_jax.data.prepare import prepare_data
    from elm_jax.engine import sharding
    from elm_jax.lm import dense_config_from, load_teacher, teacher_dir
    from elm_jax.models.dense import init_dense
    from elm_jax.models.elastic import init_supernet
    from elm_jax.models.io import load_supernet, save_model, save_supernet
    from elm_jax.search.rerank import ShortTraining
    from elm_jax.stages.search import run as run_search_stage
    from elm_jax.stages.supernet import space_of
    from elm_jax.workdir import stage_fields
    from elm_jax.pipeline import BY_NAME

    cfg = load_config("configs/mlm.py:test")
    data = prepare_data(cfg)
    space = space_of(cfg, data.tokenizer.vocab_size)
    save_supernet(tmp_path / "supernet" / "final", init_supernet(space, seed=0), space.initial_widths(),
                  history=[])
    save_model(teacher_dir(tmp_path) / "model", init_dense(dense_config_from(cfg, data.tokenizer.vocab_size), 1))
    cfg.search.update(population=8, generations=2, parents=3, mutations=3, crossovers=2, eval_batches=2,
                      random_control=True, rerank_top=2, rerank_steps=2)
    result = run_search_stage(cfg, tmp_path, data, progress=False)
    b = result["budgets"]["small"]
    state = json.loads((tmp_path / "search" / "state_small.json").read_text())
    bound = cfg.search.budgets[0]["max_params"]
    params = {e["arch_id"]: e["params"] for e in result["scored"]}
    legal = sorted((k for k in state["cache"] if params[k] <= bound), key=lambda k: (state["cache"][k], k))
    rr = b["rerank"]
    assert [r["arch_id"] for r in rr["candidates"]] == legal[:2]  # the fitness's 2 best legal ones
    assert rr["fitness_best"] == legal[0] and rr["split"] == "search"
    # the fitness's best among the short losses tied with the lowest (rows in fitness order)
    lowest = min(rr["candidates"], key=lambda r: (r["short_loss"], r["fitness"]))
    assert lowest["tied"] and lowest["short_se"] == 0.0
    chosen = next(r for r in rr["candidates"] if r["tied"])
    assert b["arch_id"] == chosen["arch_id"] and b["score"] == state["cache"][chosen["arch_id"]]
    assert Arch.from_dict(b["arch"]).arch_id == b["arch_id"] and b["params"] == params[b["arch_id"]]
    # the short loss is a real training's search-split loss: a fresh one elsewhere gives it again
    net, widths, _ = load_supernet(tmp_path / "supernet" / "final")
    again = ShortTraining(cfg, load_teacher(tmp_path), data, sharding.make_mesh(cfg.mesh), tmp_path / "again",
                          net, widths)
    assert again.loss(Arch.from_dict(b["arch"]), "x") == pytest.approx(chosen["short_loss"], rel=1e-5)
    assert all(r["short_loss"] != r["fitness"] for r in rr["candidates"])  # trained, not the fitness
    # the random control: its own sample's 2 best, re-ranked the same way
    rnd = b["random"]
    top = sorted(rnd["sample"], key=lambda k: (rnd["sample"][k], k))[:2]
    assert [r["arch_id"] for r in rnd["rerank"]["candidates"]] == top
    assert rnd["arch_id"] == next(r for r in rnd["rerank"]["candidates"] if r["tied"])["arch_id"]
    assert "re-ranked" in capsys.readouterr().out
    # bench/rerank_rule.py re-applies the rule to these trainings without training again
    import rerank_rule

    line = {"workdir": str(tmp_path), "config": "configs/mlm.py:test", "seed": int(cfg.seed),
            "overrides": ["search.rerank_steps=2"]}
    again = rerank_rule.reapply(line, [0.0, 0.9])
    assert again["max_abs_short_loss_diff"] < 1e-5  # the very trainings, evaluated again
    at = {lv: again["levels"][lv]["small"] for lv in ("0.0", "0.9")}
    assert at["0.9"]["found"]["same_as_run"] and at["0.9"]["random"]["same_as_run"]  # the stage's level
    assert at["0.0"]["found"]["pick"] == lowest["arch_id"]  # level 0: the plain argmin
    # re-ranking trains with the retraining recipe: the search stage's fingerprint holds it then
    fields = stage_fields(cfg, BY_NAME["search"])
    assert "retrain.train.lr" in fields and "search.rerank_steps" in fields
    cfg.search.rerank_top = 0
    assert "retrain.train.lr" not in stage_fields(cfg, BY_NAME["search"])
