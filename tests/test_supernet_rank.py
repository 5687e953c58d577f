"""bench/supernet_rank.py: the architectures chosen (a near-equal group and a spread), the rank
statistics against scipy and their identities, and one run on the tiny CLM config whose logged
figures are the search's and the retraining's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import supernet_rank  # noqa: E402


def _items(params, scores):
    return [{"arch_id": f"a{i}", "arch": {}, "score": s, "params": p}
            for i, (p, s) in enumerate(zip(params, scores))]


def test_select_takes_a_near_equal_group_and_spreads_both_over_fitness():
    rng = np.random.default_rng(0)
    params = [100_000, 101_000, 102_000, 103_000, 104_000, 104_500, 150_000, 200_000, 250_000,
              300_000, 90_000, 60_000, 70_000, 80_000]
    items = _items(params, rng.random(len(params)).tolist())
    close, rest = supernet_rank.select(items, 8, 4, 0.05)
    assert len(close) == 4 and len(rest) == 4
    ps = [e["params"] for e in close]
    assert max(ps) <= 1.05 * min(ps)
    window = [e for e in items if 100_000 <= e["params"] <= 105_000]  # the fullest 5% window
    scores = sorted(e["score"] for e in window)
    assert {e["score"] for e in close} >= {scores[0], scores[-1]}  # best and worst of it
    assert not {e["arch_id"] for e in close} & {e["arch_id"] for e in rest}
    others = sorted(e["score"] for e in items if e["arch_id"] not in {c["arch_id"] for c in close})
    assert {e["score"] for e in rest} >= {others[0], others[-1]}
    assert supernet_rank.select(items, 8, 4, 0.05) == (close, rest)  # deterministic
    with pytest.raises(SystemExit, match="within"):
        supernet_rank.select(items, 8, 7, 0.05)
    with pytest.raises(SystemExit, match="scored 14"):
        supernet_rank.select(items, 20, 4, 0.05)


def test_rank_stats_are_scipy_s_with_bootstrap_intervals():
    rng = np.random.default_rng(1)
    loss = rng.random(12)
    fitness = loss + 0.3 * rng.random(12)
    params = rng.integers(1000, 2000, 12)
    s = supernet_rank.rank_stats(fitness, loss, params, boot=300)
    assert s["n"] == 12
    assert s["kendall_fitness"]["value"] == pytest.approx(stats.kendalltau(fitness, loss).statistic)
    assert s["spearman_fitness"]["value"] == pytest.approx(stats.spearmanr(fitness, loss).statistic)
    assert s["kendall_params"]["value"] == pytest.approx(stats.kendalltau(-params, loss).statistic)
    for k in ("kendall_fitness", "spearman_fitness", "kendall_params"):
        assert s[k]["lo"] <= s[k]["value"] <= s[k]["hi"] and 0 < s[k]["resamples"] <= 300
    # identities: the same order is +1, the reverse -1; more parameters, lower loss: +1
    same = supernet_rank.rank_stats(loss, loss, -loss * 1000, boot=50)
    assert same["kendall_fitness"]["value"] == pytest.approx(1.0)
    assert same["spearman_fitness"]["value"] == pytest.approx(1.0)
    assert same["kendall_params"]["value"] == pytest.approx(1.0)
    assert supernet_rank.rank_stats(-loss, loss, params, boot=50)["kendall_fitness"]["value"] == pytest.approx(-1.0)


def test_one_run_retrains_the_searched_architectures(tmp_path):
    wd = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run = subprocess.run([sys.executable, "-m", "elm_jax.main", "--config=configs/clm.py:test",
                          f"--workdir={wd}", "--stages=data,teacher,supernet,search"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rec = supernet_rank.run_one("configs/clm.py:test", wd, None, 6, 2, 0.10, ["retrain.train.eval_every=3"],
                                tmp_path, boot=50)
    state = json.loads((wd / "search" / "state_small.json").read_text())
    assert rec["budget"] == "small" and rec["candidates"] == len(state["evaluated"])
    copy = rec["workdir"]
    retrain = json.loads(open(os.path.join(copy, "retrain", "result.json")).read())
    exported = json.loads(open(os.path.join(copy, "export", "result.json")).read())
    assert len(rec["archs"]) == 6 and sum(a["near"] for a in rec["archs"]) == 2
    for i, a in enumerate(rec["archs"]):
        name = f"r{i:02d}"
        assert a["fitness"] == state["cache"][a["arch_id"]]  # the search's own score
        assert exported[name]["arch_id"] == a["arch_id"] and exported[name]["params"] == a["params"]
        assert exported[name]["heads"] is not None and a["retrained_loss"] == pytest.approx(
            retrain[name]["after"]["loss"], rel=1e-6)  # the retraining's own validation loss
    near = [a["params"] for a in rec["archs"] if a["near"]]
    assert max(near) <= 1.10 * min(near)
    assert rec["all"]["kendall_fitness"]["value"] == pytest.approx(stats.kendalltau(
        [a["fitness"] for a in rec["archs"]], [a["retrained_loss"] for a in rec["archs"]]).statistic)
    for a in rec["archs"]:  # the retraining's own evaluations, the last one its final loss
        assert a["retrain_curve"] and a["retrain_curve"][-1][1] == pytest.approx(a["retrained_loss"], rel=1e-6)
    assert rec["early_step"] == 3  # the first of the retraining's two evaluations
    assert rec["all"]["kendall_early"]["value"] == pytest.approx(stats.kendalltau(
        [a["retrain_curve"][0][1] for a in rec["archs"]], [a["retrained_loss"] for a in rec["archs"]]).statistic)
    again = supernet_rank.collect(rec, boot=50)  # recomputed from the copy: the same line
    assert {k: v for k, v in again.items() if k != "load_1m"} == {k: v for k, v in rec.items() if k != "load_1m"}
    assert supernet_rank.TITLE in supernet_rank.render([rec])
    assert not (wd / "export").exists()  # the source run is untouched
