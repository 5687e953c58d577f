"""Export stage: the exported model reproduces the supernet for its architecture."""

import json

import numpy as np
import pytest

import elm_jax
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
    widths = space.initial_widths() + space.f0 * (np.arange(space.initial_widths().size).reshape(
        space.initial_widths().shape) % 2)
    widths = np.minimum(widths, space.max_widths()).astype(np.int32)
    arch = space.sample(np.random.default_rng(4))
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
    wd = _workdir(tmp_path, net, widths, arch)
    result = run_export_stage(cfg, wd, data)
    model = elm_jax.load_model(result["small"]["path"])
    info = json.loads((wd / "export" / "small" / "arch.json").read_text())
    assert info["params"] == sum(v.size for v in flat_params(model).values())
    b = data.eval.global_batch(0)
    sup = net(b["inputs"], space.to_arrays(arch, widths), b["mask"]).logits
    got = model(b["inputs"], b["mask"]).logits
    if not cka or info["heads"] == [lc.heads for lc in arch.layers if lc.active]:
        np.testing.assert_allclose(np.asarray(got), np.asarray(sup), atol=1e-5)
    assert all(h <= lc.heads for h, lc in zip(info["heads"], [x for x in arch.layers if x.active]))
    assert (wd / "export" / "small" / "orbax").is_dir()
    assert elm_jax.load_tokenizer(wd / "export" / "small").vocab_size == data.tokenizer.vocab_size


def _old_uniform_baseline(space, widths, family, budget, seq_len):
    """The bound test uniform_baseline had before it used Constraints (params / FLOPs only)."""
    from elm_jax.accounting import count_flops, count_params
    from elm_jax.arch import Arch, LayerChoice

    best = None
    lo = space.min_layers if space.elastic_depth else space.layers
    for n in range(lo, space.layers + 1):
        for j in range(space.candidates):
            a = space.validate(Arch(tuple(LayerChoice(family, j, space.base_heads, l < n)
                                          for l in range(space.layers))))
            p, f = count_params(space, a, widths), count_flops(space, a, widths, seq_len)
            ok = all(budget.get(f"max_{k}", float("inf")) >= v and budget.get(f"min_{k}", 0) <= v
                     for k, v in (("params", p), ("flops", f)))
            if ok and (best is None or p > best[0]):
                best = (p, a)
    return None if best is None else best[1]


def test_uniform_baseline_reads_the_budget_with_constraints(setup):
    from elm_jax.accounting import count_params, reachable_ranges
    from elm_jax.search.constraints import SearchError
    from elm_jax.stages.export import uniform_baseline

    cfg, _, space, _, widths, _ = setup
    seq = cfg.data.seq_len
    r = reachable_ranges(space, widths, seq)
    (plo, phi), (flo, fhi) = r["params"], r["flops"]
    budgets = [{}, {"name": "any"}, {"name": "p", "max_params": plo + 0.5 * (phi - plo)},
               {"name": "f", "max_flops": flo + 0.3 * (fhi - flo)},
               {"name": "band", "min_params": plo + 0.2 * (phi - plo), "max_params": plo + 0.7 * (phi - plo)},
               {"name": "none", "max_params": plo - 1}, {"name": "edge", "max_params": plo},
               {"name": "big", "min_params": phi}]
    found = 0
    for fam in space.families:
        for b in budgets:
            got = uniform_baseline(space, widths, fam, dict(b), seq)
            assert got == _old_uniform_baseline(space, widths, fam, b, seq), (fam, b)
            found += got is not None
        # latency bounds: ignored without a latency function, enforced with one
        lat = {"name": "fast", "max_params": plo + 0.5 * (phi - plo), "max_latency_ms": 1e-9}
        plain = uniform_baseline(space, widths, fam, dict(lat), seq)
        assert plain == uniform_baseline(space, widths, fam, {"name": "fast", "max_params": lat["max_params"]}, seq)
        assert uniform_baseline(space, widths, fam, dict(lat), seq, latency_fn=lambda a: 1.0) is None
        slow = uniform_baseline(space, widths, fam, dict(lat, max_latency_ms=2.0), seq,
                                latency_fn=lambda a: float(count_params(space, a, widths)))
        assert slow is None or count_params(space, slow, widths) <= 2.0
        # a budget the config would refuse is refused here too
        with pytest.raises(SearchError, match="unknown keys"):
            uniform_baseline(space, widths, fam, {"name": "x", "max_parms": 1}, seq)
    assert found >= len(space.families) * 4
    assert uniform_baseline(space, widths, "lstm", {}, seq) is None
