"""elm_jax.search.rerank: the search's k best re-ranked by a short standalone KD training scored on
the search split; the random control re-ranked alike."""

from __future__ import annotations

import json

import pytest

from elm_jax.arch import Arch
from elm_jax.search.rerank import rerank, top_candidates


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


def test_rerank_takes_the_lowest_short_loss_ties_by_fitness():
    scores = {"a": 4.1, "b": 4.2, "c": 4.3}
    archs = {k: _A(k, 1) for k in scores}
    short = {"a": 4.5, "b": 4.4, "c": 4.4}
    names = []

    def loss(arch, name):
        names.append(name)
        return short[arch.name]

    best, rows = rerank(["a", "b", "c"], scores, archs, loss)
    assert best == "b"  # b and c tie on the short loss: b has the better fitness
    assert [(r["arch_id"], r["fitness"], r["short_loss"]) for r in rows] == [
        ("a", 4.1, 4.5), ("b", 4.2, 4.4), ("c", 4.3, 4.4)]
    assert len(set(names)) == 3  # each candidate its own run
    with pytest.raises(ValueError, match="no candidate"):
        rerank([], scores, archs, loss)


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
    chosen = min(rr["candidates"], key=lambda r: (r["short_loss"], r["fitness"]))
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
    assert rnd["arch_id"] == min(rnd["rerank"]["candidates"], key=lambda r: (r["short_loss"], r["fitness"]))["arch_id"]
    assert "re-ranked" in capsys.readouterr().out
    # re-ranking trains with the retraining recipe: the search stage's fingerprint holds it then
    fields = stage_fields(cfg, BY_NAME["search"])
    assert "retrain.train.lr" in fields and "search.rerank_steps" in fields
    cfg.search.rerank_top = 0
    assert "retrain.train.lr" not in stage_fields(cfg, BY_NAME["search"])
