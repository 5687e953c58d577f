"""Export stage: the exported model reproduces the supernet for its architecture."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import elm_jax
from elm_jax.arch import Arch
from elm_jax.config import load_config
from elm_jax.data.prepare import prepare_data
from elm_jax.models.io import flat_params
from elm_jax.stages.export import run as run_export_stage
from elm_jax.models.elastic import init_supernet
from elm_jax.models.io import save_supernet
from elm_jax.stages.supernet import space_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("configs/mlm.py:test")
    cfg.export.update(baselines=(), measure_latency=False)
    data = prepare_data(cfg)
    space = space_of(cfg, data.tokenizer.vocab_size)
    net = init_supernet(space, seed=3)
    # O(1) weights: attention is far from uniform, so head grouping changes the forward
    rng = np.random.default_rng(3)
    state = nnx.state(net, nnx.Param)
    nnx.update(net, jax.tree.map(lambda v: jnp.asarray(
        np.asarray(v) + 0.3 * rng.standard_normal(v.shape).astype(v.dtype)), state))
    widths = space.initial_widths() + space.f0 * (np.arange(space.initial_widths().size).reshape(
        space.initial_widths().shape) % 2)
    widths = np.minimum(widths, space.max_widths()).astype(np.int32)
    arch = space.sample(np.random.default_rng(4))
    # every active layer at the most heads, so the head module has heads to merge
    arch = Arch(tuple(dataclasses.replace(lc, heads=space.base_heads) for lc in arch.layers))
    return cfg, data, space, net, widths, arch


def _workdir(tmp_path, net, widths, arch):
    save_supernet(tmp_path / "supernet" / "final", net, widths, [])
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "result.json").write_text(json.dumps(
        {"budgets": {"small": {"arch": arch.to_dict(), "score": 1.0, "latency_ms": None}}}))
    return tmp_path


@pytest.mark.parametrize("cka", [False, True])
def test_exported_model_reproduces_the_supernet(setup, tmp_path, cka):
    cfg, data, space, net, widths, arch = setup
    cfg.export.cka_heads = cka
    cfg.export.cka_threshold = 0.05  # a low threshold: heads are merged in this test
    wd = _workdir(tmp_path, net, widths, arch)
    result = run_export_stage(cfg, wd, data)
    model = elm_jax.load_model(result["small"]["path"])
    info = json.loads((wd / "export" / "small" / "arch.json").read_text())
    assert info["params"] == sum(v.size for v in flat_params(model).values())
    # the exported model IS the supernet's forward at the exported head counts (post-CKA when
    # the head module acts): checked whether or not CKA changed anything
    heads = iter(info["heads"])
    exported = Arch(tuple(dataclasses.replace(lc, heads=next(heads)) if lc.active else lc
                          for lc in arch.layers))
    assert all(h in space.head_choices and h <= lc.heads
               for h, lc in zip(info["heads"], [x for x in arch.layers if x.active]))
    b = data.eval.global_batch(0)
    sup = np.asarray(net(b["inputs"], space.to_arrays(exported, widths), b["mask"]).logits)
    got = np.asarray(model(b["inputs"], b["mask"]).logits)
    np.testing.assert_allclose(got, sup, rtol=1e-4, atol=1e-4 * np.abs(sup).max())
    if cka:  # the case the check used to skip happens here: CKA merged heads somewhere
        assert exported != arch
        other = np.asarray(net(b["inputs"], space.to_arrays(arch, widths), b["mask"]).logits)
        assert np.abs(other - sup).max() > 1e-3 * np.abs(sup).max()
    assert (wd / "export" / "small" / "orbax").is_dir()
    assert elm_jax.load_tokenizer(wd / "export" / "small").vocab_size == data.tokenizer.vocab_size


def test_random_search_best_is_exported_like_the_found_model(setup, tmp_path):
    cfg, data, space, net, widths, arch = setup
    cfg.export.cka_heads = True
    cfg.export.cka_threshold = 0.05
    rnd = space.sample(np.random.default_rng(11))
    rnd = Arch(tuple(dataclasses.replace(lc, heads=space.base_heads) for lc in rnd.layers))
    assert space.canonical(rnd).arch_id != space.canonical(arch).arch_id
    wd = _workdir(tmp_path, net, widths, arch)
    search = json.loads((wd / "search" / "result.json").read_text())
    search["budgets"]["small"]["random"] = {"arch": rnd.to_dict(), "score": 2.0, "latency_ms": None}
    (wd / "search" / "result.json").write_text(json.dumps(search))
    result = run_export_stage(cfg, wd, data)
    assert set(result) == {"small", "small_random"}
    r, f = result["small_random"], result["small"]
    assert r["kind"] == "random_best" and r["arch_id"] == rnd.arch_id
    assert r["param_gap"] == r["params"] - f["params"]
    info = json.loads((wd / "export" / "small_random" / "arch.json").read_text())
    assert info["search_score"] == 2.0 and info["cka_heads"] is not None  # the head module acted
    model = elm_jax.load_model(r["path"])
    assert info["params"] == sum(v.size for v in flat_params(model).values())
    heads = iter(info["heads"])
    exported = Arch(tuple(dataclasses.replace(lc, heads=next(heads)) if lc.active else lc
                          for lc in rnd.layers))
    b = data.eval.global_batch(0)
    sup = np.asarray(net(b["inputs"], space.to_arrays(exported, widths), b["mask"]).logits)
    got = np.asarray(model(b["inputs"], b["mask"]).logits)
    np.testing.assert_allclose(got, sup, rtol=1e-4, atol=1e-4 * np.abs(sup).max())
    # a random best that is the found model is not exported twice
    wd2 = _workdir(tmp_path / "same", net, widths, arch)
    search["budgets"]["small"]["random"]["arch"] = arch.to_dict()
    (wd2 / "search" / "result.json").write_text(json.dumps(search))
    assert set(run_export_stage(cfg, wd2, data)) == {"small"}
