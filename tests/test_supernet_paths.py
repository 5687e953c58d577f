"""supernet.paths_per_device: several architectures per device per step, so the sandwich rule
(largest, smallest, random) runs on one device. The step's loss and gradient are the same sums
however the paths are laid over devices: G paths on one device equal one path on each of G."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from elm_jax.config import ConfigError, load_config, validate
from elm_jax.data.arch_batches import ArchBatches
from elm_jax.data.pipeline import LMBatches
from elm_jax.data.tokenizer import SpecialIds
from elm_jax.engine import sharding
from elm_jax.lm import dense_config_from
from elm_jax.models.dense import init_dense
from elm_jax.pipeline import BY_NAME
from elm_jax.space import SearchSpace
from elm_jax.students import supernet_trainer
from elm_jax.workdir import stage_fields

VOCAB = 64
SPECIAL = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)


def _cfg(paths: int, sandwich: bool = False):
    cfg = load_config("configs/mlm.py:test")
    cfg.supernet.sample_per = "device"
    cfg.supernet.paths_per_device = paths
    cfg.supernet.sandwich = sandwich
    cfg.data.batch_size = 16
    return cfg


def _source(cfg, space, num_devices):
    rows = np.random.default_rng(0).integers(7, VOCAB, (64, cfg.data.seq_len), dtype=np.int32)
    return ArchBatches(LMBatches(rows, "mlm", cfg.data.batch_size, 0, SPECIAL, VOCAB), space,
                       space.initial_widths(), mode="device", num_devices=num_devices, seed=3,
                       sandwich=cfg.supernet.sandwich, paths_per_device=cfg.supernet.paths_per_device)


def _loss_and_grads(devices: int, paths: int, sandwich: bool):
    cfg = _cfg(paths, sandwich)
    space = SearchSpace.from_config(cfg.space, vocab_size=VOCAB, max_len=cfg.data.seq_len, task="mlm")
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:devices])
    teacher = init_dense(dense_config_from(cfg, VOCAB), seed=7)
    trainer = supernet_trainer(cfg, space, teacher, mesh)
    state = trainer.init_state()
    src = _source(cfg, space, devices)
    batch = sharding.global_batch(src.batch(1), mesh)

    def loss(params):
        model = nnx.merge(trainer.graphdef, params, state.other, copy=True)
        return trainer.loss_fn(model, batch, jax.random.key(0), trainer.frozen)

    (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
    return [a.describe() for a in src.archs(1)], float(value), jax.device_get(sums), jax.device_get(grads)


@pytest.fixture(scope="module")
def layouts():
    """The sandwich rule's 8 paths (largest, smallest, 6 random) as devices x paths per device."""
    return {(d, g): _loss_and_grads(d, g, True) for d, g in ((8, 1), (2, 4), (1, 8))}


def test_paths_on_one_device_give_the_loss_and_gradient_of_one_path_per_device(layouts):
    """8 paths: 8 devices x 1, 2 x 4 and 1 x 8 sample the same architectures and give the same
    loss (mean KD over the paths + gt x MLM sum / weight) and the same gradient."""
    ref_archs, ref_loss, ref_sums, ref_grads = layouts[(8, 1)]
    assert len(set(ref_archs)) > 2  # the paths differ: a layout error would show
    assert float(ref_sums["kd_count"]) == 8
    for devices, paths in ((2, 4), (1, 8)):
        archs, value, sums, grads = layouts[(devices, paths)]
        assert archs == ref_archs
        np.testing.assert_allclose(value, ref_loss, rtol=2e-5)
        assert float(sums["kd_count"]) == 8
        np.testing.assert_allclose(float(sums["loss_sum"]), float(ref_sums["loss_sum"]), rtol=2e-5)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=1e-6)


def test_the_sandwich_rule_on_one_device():
    cfg = _cfg(3, sandwich=True)
    space = SearchSpace.from_config(cfg.space, vocab_size=VOCAB, max_len=cfg.data.seq_len, task="mlm")
    src = _source(cfg, space, 1)
    w = space.initial_widths()
    archs = src.archs(5)
    assert len(archs) == 3 and archs[0] == space.largest(w) and archs[1] == space.smallest(w)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        src.batch(5)  # 16 rows do not split over 3 paths
    cfg.data.batch_size = 12
    b = _source(cfg, space, 1).batch(5)
    assert b["arch_active"].shape[0] == 12
    for k, a in enumerate(archs):
        np.testing.assert_array_equal(b["arch_active"][4 * k], np.asarray(space.to_arrays(a, w).active))


def test_sandwich_needs_three_paths_and_paths_need_device_sampling():
    cfg = _cfg(2, sandwich=True)
    space = SearchSpace.from_config(cfg.space, vocab_size=VOCAB, max_len=cfg.data.seq_len, task="mlm")
    with pytest.raises(ValueError, match="at least 3 paths per step"):
        _source(cfg, space, 1)
    assert len(_source(cfg, space, 2).archs(0)) == 4
    with pytest.raises(ValueError, match="paths_per_device"):
        ArchBatches(None, space, space.initial_widths(), mode="step", num_devices=1, seed=0, paths_per_device=2)


@pytest.mark.parametrize("value", [0, -1])
def test_config_refuses_a_bad_path_count(value):
    cfg = _cfg(1)
    cfg.supernet.paths_per_device = value
    with pytest.raises(ConfigError, match="supernet.paths_per_device"):
        validate(cfg, ["supernet"])


def test_config_refuses_several_paths_with_step_sampling():
    cfg = _cfg(2)
    cfg.supernet.sample_per = "step"
    with pytest.raises(ConfigError, match="supernet.paths_per_device"):
        validate(cfg, ["supernet"])


def test_one_path_per_device_is_left_out_of_the_fingerprint():
    """A work directory made before the field existed ran one path per device: it stays valid."""
    cfg = _cfg(1)
    assert "supernet.paths_per_device" not in stage_fields(cfg, BY_NAME["supernet"])
    cfg.supernet.paths_per_device = 4
    assert stage_fields(cfg, BY_NAME["supernet"])["supernet.paths_per_device"] == 4


def test_the_benchmarks_sample_the_paths_the_stage_samples():
    """bench/supernet_setup.build (mfu.py, compile_count.py) draws each step's architectures as the
    supernet stage does: with supernet.paths_per_device=G, G per device (the demo's defaults)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import supernet_setup

    cfg = _cfg(2, sandwich=True)
    bench = supernet_setup.build(cfg, synthetic=True)
    archs = bench.train.archs(0)
    assert bench.num_devices == len(jax.devices()) and len(archs) == 2 * bench.num_devices
    assert archs[0] == bench.space.largest() and archs[1] == bench.space.smallest()


def test_the_teacher_runs_once_per_device_and_gives_each_block_its_rows_features():
    """The train step computes the frozen teacher once over a device's rows (``prepare``) and
    slices its features with the blocks: its sums equal those of the objective run block by
    block with the teacher computed on each block alone (the computation before the change)."""
    from elm_jax.students import distill_sums_fn

    cfg = _cfg(4, sandwich=True)
    space = SearchSpace.from_config(cfg.space, vocab_size=VOCAB, max_len=cfg.data.seq_len, task="mlm")
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    teacher = init_dense(dense_config_from(cfg, VOCAB), seed=7)
    trainer = supernet_trainer(cfg, space, teacher, mesh)
    state = trainer.init_state()
    host = _source(cfg, space, 1).batch(2)
    model = nnx.merge(trainer.graphdef, state.params, state.other, copy=True)
    _, sums = jax.jit(lambda m, b, f: trainer.loss_fn(m, b, jax.random.key(0), f))(
        model, sharding.global_batch(host, mesh), trainer.frozen)
    t_graphdef, _, t_rest = nnx.split(teacher, nnx.Param, ...)
    per_block = distill_sums_fn(t_graphdef, t_rest, cfg.supernet.kd_loss)
    rows = cfg.data.batch_size // 4
    ref = [per_block(model, {k: v[g * rows:(g + 1) * rows] for k, v in host.items()}, trainer.frozen)
           for g in range(4)]
    for key in ("loss_sum", "weight_sum", "kd_total", "kd_count"):
        np.testing.assert_allclose(float(sums[key]), sum(float(r[key]) for r in ref), rtol=2e-5)
