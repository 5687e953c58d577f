"""Supernet stage: distillation from the frozen teacher, PCA growth, resume equals uninterrupted."""

import json

import numpy as np
import pytest

from elm_jax.arch import FAMILY_INDEX
from elm_jax.config import load_config
from elm_jax.data.arch_batches import ArchBatches, local_arch
from elm_jax.data.prepare import prepare_data
from elm_jax.engine import sharding
from elm_jax.engine.sharding import BATCH_AXES
from elm_jax.dynamic import block_cka
from elm_jax.models.extract import extract
from elm_jax.models.io import flat_params as _flat
from elm_jax.models.io import load_supernet
from elm_jax.stages.supernet import SupernetHooks
from elm_jax.stages.supernet import run as run_supernet_stage
from elm_jax.stages.teacher import run as run_teacher_stage


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


def _num_devices(cfg):
    mesh = sharding.make_mesh(cfg.mesh)
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))


def _train_batches(cfg, data, space, widths):
    return ArchBatches(data.train, space, widths, mode=cfg.supernet.sample_per,
                       num_devices=_num_devices(cfg), seed=cfg.seed, sandwich=cfg.supernet.sandwich)


@pytest.mark.fidelity
def test_saved_block_cka_is_the_final_supernets_on_the_last_statistics_batch(uninterrupted, cfg, data):
    """result.json's block_cka = block_cka of the saved supernet on the final step's batch (the
    last statistics step: 12 % calc_every == 0), each device on its rows and its architecture,
    averaged over the devices; the hook feeds each layer the sampled path's input."""
    wd, result = uninterrupted
    total = cfg.supernet.train.steps
    assert total % cfg.supernet.calc_every == 0
    net, widths, _ = load_supernet(wd / "supernet" / "final")
    b = _train_batches(cfg, data, net.space, widths).batch(total - 1)
    n = _num_devices(cfg)
    rows = len(b["inputs"]) // n
    per_device = []
    for d in range(n):
        part = {k: v[d * rows:(d + 1) * rows] for k, v in b.items()}
        out = net(part["inputs"], local_arch(part), part["mask"], part["segment_ids"])
        per_device.append(np.asarray(block_cka(net, out.embedding, out.layers.block, widths, part["mask"])))
    want = np.mean(per_device, axis=0)
    assert len(result["block_cka"]) == cfg.space.layers
    np.testing.assert_allclose(result["block_cka"], want, atol=1e-4)
    assert ((want > 0.0) & (want < 0.999)).all(), want  # distinct candidates, some shared structure


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


@pytest.mark.fidelity
def test_hooks_state_round_trips_through_the_final_checkpoint(uninterrupted, cfg, data):
    """The step-12 checkpoint's hook meta holds the statistics of steps 8, 10 and 12 (the
    accumulator was reset by the growth at step 6), restores into fresh hooks, and saves back
    unchanged. (The resume test restores step 6, whose accumulator is all zero; test_dynamic
    round-trips PCAAccumulator.state_dict in memory only, not through the JSON meta.)"""
    from types import SimpleNamespace

    wd, result = uninterrupted
    total, every, epoch = cfg.supernet.train.steps, cfg.supernet.calc_every, cfg.supernet.epoch_steps
    meta = wd / "supernet" / "checkpoints" / str(total) / "meta" / "metadata"  # orbax JsonSave
    saved = json.loads(meta.read_text())["hooks"]
    net, widths, _ = load_supernet(wd / "supernet" / "final")
    space = net.space
    trainer = SimpleNamespace(mesh=sharding.make_mesh(cfg.mesh), graphdef=None)  # stats never run
    hooks = SupernetHooks(cfg, space, trainer, epoch)
    hooks.on_restore(saved)
    # expected counts: every (statistics step after the last growth, device) adds its
    # architecture's active layers
    src, n = _train_batches(cfg, data, space, widths), _num_devices(cfg)
    counts = np.zeros_like(hooks.acc.counts)
    last_growth = max(e["step"] for e in result["growth"])
    for done in range(last_growth + every, total + 1, every):
        archs = src.archs(done - 1)
        for a in archs * (n // len(archs)):
            for l, lc in enumerate(a.layers):
                if lc.active:
                    counts[l, FAMILY_INDEX[lc.family], lc.candidate] += 1
    assert counts.sum() > 0
    np.testing.assert_array_equal(hooks.acc.counts, counts)
    mean_k, seen = hooks.acc.mean(), counts > 0
    assert (mean_k[seen] >= 1).all() and (mean_k[seen] <= widths[seen]).all()  # 1 <= k <= width
    np.testing.assert_array_equal(hooks.widths, widths)
    assert hooks.history == result["growth"] and hooks.block_cka == result["block_cka"]
    assert json.loads(json.dumps(hooks.meta())) == saved
