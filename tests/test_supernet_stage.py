"""Supernet stage: distillation from the frozen teacher, PCA growth, resume equals uninterrupted."""

import json

import numpy as np
import pytest


from elm_jax.config import load_config
from elm_jax.data.prepare import prepare_data
from elm_jax.dynamic import PCAAccumulator
from elm_jax.models.extract import extract
from elm_jax.stages.supernet import SupernetHooks
from elm_jax.models.io import load_supernet
from elm_jax.stages.supernet import run as run_supernet_stage
from elm_jax.stages.teacher import run as run_teacher_stage
from elm_jax.models.io import flat_params as _flat


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/mlm.py:test")  # 8 test devices, one row of the batch each


@pytest.fixture(scope="module")
def data(cfg):
    return prepare_data(cfg)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, cfg, data):
    wd = tmp_path_factory.mktemp("teacher")
    run_teacher_stage(cfg, wd, data)
    return wd


def _workdir_with_teacher(teacher_dir, tmp_path):
    import shutil

    shutil.copytree(teacher_dir / "teacher" / "model", tmp_path / "teacher" / "model")
    (tmp_path / "teacher" / "result.json").write_text("{}")
    return tmp_path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cfg, data, teacher_dir):
    wd = _workdir_with_teacher(teacher_dir, tmp_path_factory.mktemp("sn_a"))
    return wd, run_supernet_stage(cfg, wd, data)


@pytest.mark.fidelity
def test_no_width_growth_after_the_final_step(uninterrupted, cfg):
    """Every width increment is followed by training steps (DESIGN 1.2): no growth event at or
    after the last step, although the last step is an epoch end (12 steps, epoch_steps=6)."""
    _, result = uninterrupted
    total = cfg.supernet.train.steps
    assert total % cfg.supernet.epoch_steps == 0
    steps = [e["step"] for e in result["growth"]]
    assert steps and max(steps) < total, steps


def test_widths_grow_where_the_pca_statistic_is_largest(uninterrupted, cfg):
    wd, result = uninterrupted
    history = result["growth"]
    assert [e["step"] for e in history] == [6]  # epoch_steps=6, 12 steps: none after the last
    net, widths, info = load_supernet(wd / "supernet" / "final")
    w, cap = net.space.initial_widths(), net.space.max_widths()
    for event in history:
        mean_k = np.asarray(event["mean_k"])  # -1 where never measured
        grown = {(l, f, c) for l, f, c, _, _ in event["grown"]}
        assert len(grown) == min(cfg.supernet.num_add, int(((mean_k >= 0) & (w < cap)).sum()))
        others = [mean_k[e] for e in zip(*np.nonzero((mean_k >= 0) & (w < cap)))
                  if tuple(int(i) for i in e) not in grown]
        if grown and others:
            assert min(mean_k[g] for g in grown) >= max(others)
        for l, f, c, old, new in event["grown"]:
            assert old == w[l, f, c] and new == min(old + cfg.space.f0, cap[l, f, c])
            w[l, f, c] = new
    assert (w == widths).all() and widths.tolist() == result["widths"] == info["widths"]
    assert (widths > net.space.initial_widths()).any()


def test_trained_supernet_extracts_and_distils(uninterrupted, data, cfg):
    wd, result = uninterrupted
    net, widths, _ = load_supernet(wd / "supernet" / "final")
    arch = net.space.largest(widths)
    dense = extract(net, widths, arch)
    b = data.train.batch(0)
    out = dense(b["inputs"], b["mask"])
    assert np.isfinite(np.asarray(out.logits)).all()
    ev = result["eval_largest"]
    assert np.isfinite(ev["kd"]) and ev["kd"] > 0
    rows = [json.loads(x) for x in (wd / "supernet" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]  # the distillation loss goes down
    assert result["train_step_compilations"] == 1  # 12 steps of sampled architectures, one compile
    disc = result["block_discrimination"]
    assert len(disc) == cfg.space.layers and all(-1.0 <= d <= 1.0 for d in disc)


def test_teacher_is_not_in_the_checkpoint(uninterrupted):
    wd, _ = uninterrupted
    meta = json.loads((wd / "supernet" / "checkpoints" / "12" / "state" / "_METADATA").read_text())
    paths = [tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()]
    assert {p[0] for p in paths} == {"params", "other", "opt_state", "step", "rng"}
    assert {p[1] for p in paths if p[0] == "params"} == {"net", "proj"}  # the student only
    assert not any("teacher" in str(k) for p in paths for k in p)


class _Crash(Exception):
    pass


def test_killed_run_resumes_to_the_same_supernet(uninterrupted, cfg, data, teacher_dir, tmp_path,
                                                 monkeypatch):
    wd_a, result_a = uninterrupted
    wd = _workdir_with_teacher(teacher_dir, tmp_path)
    real = SupernetHooks.after_step

    def crash_at_9(self, done, *a):
        real(self, done, *a)
        if done == 9:
            raise _Crash()

    monkeypatch.setattr(SupernetHooks, "after_step", crash_at_9)
    with pytest.raises(_Crash):
        run_supernet_stage(cfg, wd, data)
    monkeypatch.setattr(SupernetHooks, "after_step", real)
    result_b = run_supernet_stage(cfg, wd, data)  # resumes from the step-6 checkpoint
    assert result_b["train"]["resumed_from"] == 6
    assert result_b["widths"] == result_a["widths"] and result_b["growth"] == result_a["growth"]
    a = _flat(load_supernet(wd_a / "supernet" / "final")[0])
    b = _flat(load_supernet(wd / "supernet" / "final")[0])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_accumulator_round_trips_through_checkpoint_meta(cfg, data):
    acc = PCAAccumulator(2, 2)
    state = acc.state_dict()
    again = PCAAccumulator.from_state_dict({k: np.asarray(v).tolist() for k, v in state.items()})
    assert all(np.array_equal(np.asarray(again.state_dict()[k]), np.asarray(v)) for k, v in state.items())
