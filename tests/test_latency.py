"""Per-device latency table (elm_jax/latency.py).

Timings on this machine are noisy (2 cores shared with other jobs), so the tests check
properties that hold whatever the noise: the table's keys, exact arithmetic of the
prediction on a hand-made table, the cache, errors, cache keys, a ~20 ms sleep measured
within +-50%, and an ordering of *predictions* with a wide margin (4 large blocks vs 1
small one). No test asserts a tight timing bound. The export-stage tests replace the clock
(``timing.measure_many``) with a recorder.
"""

from __future__ import annotations

import json
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from elm_jax import latency
from elm_jax.arch import Arch, LayerChoice
from elm_jax.latency import LatencyTable
from elm_jax.models.dense import dense_config
from elm_jax.space import SearchSpace
from elm_jax.timing import TimingPolicy, device_fingerprint, measure, measure_model_ms

SEQ = 16


def tiny_space(**overrides) -> SearchSpace:
    """hidden 32, 4 layers; bert widths {16, 32, 40} (40 = cap, not a multiple of f0),
    mobilebert widths {16, 32}; heads {1, 2}: 10 blocks."""
    kw = dict(layers=4, hidden=32, inner=16, embed_size=16, candidates=2, f0=16,
              max_ffn={"bert": 40, "mobilebert": 32}, base_heads=2,
              families=("bert", "mobilebert"), elastic_depth=True, min_layers=1,
              vocab_size=64, max_len=SEQ, task="mlm")
    kw.update(overrides)
    return SearchSpace(**kw)


EXPECTED_KEYS = {(f, w, h) for f, ws in (("bert", (16, 32, 40)), ("mobilebert", (16, 32)))
                 for w in ws for h in (1, 2)}


def lat_cfg(cache_dir: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(batch=1, seq_len=0, repeats=7, warmup=1,
                                          cache_dir=cache_dir, min_time_s=0.0))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(space, table, cache dir, build mock): one measured table for the module, through
    load_or_build (so its cache file exists)."""
    space = tiny_space()
    cache = tmp_path_factory.mktemp("latency")
    with mock.patch.object(LatencyTable, "build", wraps=LatencyTable.build) as build:
        table = latency.load_or_build(space, lat_cfg(str(cache)), SEQ)
        assert build.call_count == 1
    return space, table, cache


def hand_table(space: SearchSpace, seq_len: int = SEQ, **timing_fields) -> LatencyTable:
    """Integer-valued parts (exact in floating point): block (f, w, h) costs
    1000 * family index + w + h / 4."""
    blocks = {(f, w, h): 1000.0 * (f == "mobilebert") + w + h / 4
              for f, w, h in latency.expected_block_keys(space)}
    return LatencyTable(device=device_fingerprint(), space=latency.space_fields(space),
                        batch=1, seq_len=seq_len, embedding_ms=3.0, head_ms=5.0,
                        blocks_ms=blocks, overhead_ms=-0.5, **timing_fields)


def test_table_has_exactly_the_expected_blocks(built):
    space, table, _ = built
    assert set(table.blocks_ms) == EXPECTED_KEYS
    assert set(latency.expected_block_keys(space)) == EXPECTED_KEYS
    assert latency.reachable_widths(space, "bert") == [16, 32, 40]
    assert all(np.isfinite(v) and v >= 0 for v in table.blocks_ms.values())
    assert table.embedding_ms >= 0 and table.head_ms >= 0 and np.isfinite(table.overhead_ms)
    assert set(table.dispatch_ms) == {"embedding", "head", "block"}
    assert len(table.calibration) == 4
    assert table.device["device_kind"] == jax.devices()[0].device_kind
    assert (table.batch, table.seq_len) == (1, SEQ)   # seq_len 0 -> the data seq_len


def test_predict_is_sum_of_parts_plus_overhead():
    space = tiny_space()
    table = hand_table(space)
    widths = space.initial_widths()            # bert: 16, 32; mobilebert: 16, 32
    widths[2, 0, 1] = 40                       # layer 2, bert candidate 1 grown to the cap
    arch = Arch((LayerChoice("bert", 1, 2, True), LayerChoice("mobilebert", 0, 1, True),
                 LayerChoice("bert", 1, 1, True), LayerChoice("mobilebert", 1, 2, False)))
    blocks = (32 + 0.5) + (1000 + 16 + 0.25) + (40 + 0.25)   # the inactive layer is free
    assert table.predict_ms(space, arch, widths) == 3.0 + blocks + 5.0 - 0.5
    # overhead and every part enter linearly
    table.overhead_ms = 0.0
    assert table.predict_ms(space, arch, widths) == 3.0 + blocks + 5.0


def test_round_trip_and_cache_is_reused(built, tmp_path):
    space, table, cache = built
    again = LatencyTable.from_dict(table.to_dict())
    assert again == table
    path = cache / f"latency-{LatencyTable.key(space, 1, SEQ)}.json"
    assert path.is_file()
    mtime = os.stat(path).st_mtime_ns
    with mock.patch.object(LatencyTable, "build", side_effect=AssertionError("re-measured")):
        loaded = latency.load_or_build(space, lat_cfg(str(cache)), SEQ)
        # the cache_dir argument wins over the config's
        loaded2 = latency.load_or_build(space, lat_cfg("/nonexistent"), SEQ, cache_dir=cache)
    assert loaded == table and loaded2 == table
    assert os.stat(path).st_mtime_ns == mtime


def test_corrupt_cache_file_is_rebuilt(tmp_path):
    space = tiny_space()
    path = tmp_path / f"latency-{LatencyTable.key(space, 1, SEQ)}.json"
    path.write_text("{not json")
    fake = hand_table(space)
    with mock.patch.object(LatencyTable, "build", return_value=fake) as build:
        got = latency.load_or_build(space, lat_cfg(str(tmp_path)), SEQ)
    assert build.call_count == 1 and got == fake
    assert LatencyTable.from_dict(json.loads(path.read_text())) == fake


def test_missing_width_or_other_space_raises():
    space = tiny_space()
    table = hand_table(space)
    del table.blocks_ms[("bert", 40, 2)]
    widths = space.max_widths()                  # every bert candidate at 40
    arch = Arch(tuple(LayerChoice("bert", 0, 2, True) for _ in range(4)))
    with pytest.raises(ValueError, match="no block bert/ffn=40/heads=2"):
        table.predict_ms(space, arch, widths)
    other = tiny_space(hidden=64)
    with pytest.raises(ValueError, match="different search space"):
        hand_table(space).predict_ms(other, arch, other.max_widths())


def test_key_depends_on_what_matters():
    space = tiny_space()
    k = LatencyTable.key(space, 1, SEQ)
    assert LatencyTable.key(space, 1, SEQ) == k
    assert LatencyTable.key(space, 2, SEQ) != k
    assert LatencyTable.key(space, 1, SEQ // 2) != k
    for change in (dict(hidden=64), dict(inner=32), dict(embed_size=8), dict(f0=8),
                   dict(vocab_size=128), dict(task="clm"), dict(head_choices=(2,)),
                   dict(families=("bert",)), dict(max_ffn={"bert": 48, "mobilebert": 32})):
        assert LatencyTable.key(tiny_space(**change), 1, SEQ) != k, change
    # the number of layers, candidates and depth settings do not change any part
    for same in (dict(layers=6), dict(candidates=1), dict(min_layers=2),
                 dict(elastic_depth=False, min_layers=4)):
        assert LatencyTable.key(tiny_space(**same), 1, SEQ) == k, same


def test_measure_sleep_is_about_20ms():
    def sleepy(x):
        def cb(v):
            time.sleep(0.02)
            return v
        return jax.pure_callback(cb, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    t = measure(sleepy, (jnp.ones((4,), jnp.float32),), repeats=5, warmup=1)
    assert 0.010 <= t <= 0.030, t


def test_bigger_model_is_predicted_slower(built):
    space, table, _ = built
    largest = space.largest(space.max_widths())        # 4 active bert blocks at width 40
    smallest = space.smallest(space.initial_widths())  # 1 active block at width 16
    assert largest.num_active == 4 and smallest.num_active == 1
    assert (table.predict_ms(space, largest, space.max_widths())
            > table.predict_ms(space, smallest, space.initial_widths()))


def test_check_rows(built):
    space, table, _ = built
    rng = np.random.default_rng(3)
    archs = [space.sample(rng) for _ in range(2)]
    widths = space.max_widths()
    rows = latency.check(table, space, widths, archs,
                         policy=TimingPolicy(repeats=5, warmup=1, min_time_s=0.0))
    assert [r["arch_id"] for r in rows] == [a.arch_id for a in archs]
    for r, a in zip(rows, archs):
        assert r["predicted_ms"] == table.predict_ms(space, a, widths)
        assert r["measured_ms"] > 0
        assert r["rel_err"] == pytest.approx(
            abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"])
    s = latency.summarize(rows)
    assert s["n"] == 2 and s["max_rel_err"] >= s["mean_rel_err"] >= 0
    assert s["max_rel_err"] >= s["median_rel_err"] >= 0
    from elm_jax.models.dense import init_dense
    model = init_dense(dense_config(space, archs[0], widths))
    assert measure_model_ms(model, 1, SEQ, TimingPolicy(repeats=3, warmup=1, min_time_s=0)) > 0


def test_policy_is_read_from_the_config_and_stored_in_the_table(built, tmp_path):
    space, table, cache = built
    assert table.policy == TimingPolicy.from_config(lat_cfg()) == TimingPolicy(
        repeats=7, warmup=1, quantile=0.0, min_time_s=0.0)
    assert TimingPolicy.from_config({}) == TimingPolicy()       # partial configs: the defaults
    # a cached table measured under another policy is measured again
    other = lat_cfg(str(cache))
    other.quantile = 0.5
    fake = hand_table(space, quantile=0.5, repeats=7, warmup=1, min_time_s=0.0)
    with mock.patch.object(LatencyTable, "build", return_value=fake) as build:
        assert latency.load_or_build(space, other, SEQ, cache_dir=tmp_path) == fake
        assert build.call_args.args[3] == TimingPolicy(repeats=7, warmup=1, quantile=0.5,
                                                       min_time_s=0.0)
    with pytest.raises(ValueError, match="quantile"):
        TimingPolicy(quantile=1.5)


# ----------------------------------------------------------------------------------
# The export stage: predicted and measured latency of the model AS EXPORTED
# ----------------------------------------------------------------------------------

SEARCH_PREDICTION = 123.0   # what the search "predicted" (pre-CKA): must not be reported as such


class RecordingClock:
    """Stands in for ``timing.measure_many``: records the timing settings of every call (either
    signature, the policy object or the old separate arguments) and returns 1 ms per item."""

    def __init__(self):
        self.calls = []

    def __call__(self, items, *args, **kw):
        pol = kw.get("policy", args[0] if args else None)
        if hasattr(pol, "quantile"):
            got = (pol.repeats, pol.warmup, pol.quantile, pol.min_time_s, pol.rewarm)
        else:
            rep, warm = (list(args) + [kw.get("repeats"), kw.get("warmup")])[:2]
            got = (rep, warm, kw.get("quantile", 0.5), kw.get("min_time_s", 0.0),
                   kw.get("rewarm", 1))
        self.calls.append((sorted(items), got))
        return {name: 1e-3 for name in items}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The export stage (CKA heads on, a threshold that merges every head) run on a random-init
    supernet with a hand-made latency table in the cache and a recording clock."""
    from elm_jax.config import load_config
    from elm_jax.data.prepare import prepare_data
    from elm_jax.models.elastic import init_supernet
    from elm_jax.models.io import save_supernet
    from elm_jax.stages.export import run as run_export
    from elm_jax.stages.supernet import space_of

    cfg = load_config("configs/mlm.py:test")
    root = tmp_path_factory.mktemp("export_latency")
    cfg.latency.update(predict=True, cache_dir=str(root / "cache"), repeats=4, warmup=1)
    cfg.export.update(baselines=(), measure_latency=True, cka_heads=True, cka_threshold=1e-9)
    data = prepare_data(cfg)
    space = space_of(cfg, data.tokenizer.vocab_size)
    assert len(space.head_choices) > 1
    net, widths = init_supernet(space, seed=3), space.max_widths()
    arch = Arch(tuple(LayerChoice(space.families[0], 0, space.base_heads, True)
                      for _ in range(space.layers)))
    seq = cfg.latency.seq_len or cfg.data.seq_len
    lc = cfg.latency
    table = hand_table(space, seq, repeats=lc.repeats, warmup=lc.warmup, **_stat(lc))
    path = root / "cache" / f"latency-{LatencyTable.key(space, lc.batch, seq)}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table.to_dict()))
    wd = root / "wd"
    save_supernet(wd / "supernet" / "final", net, widths, [])
    (wd / "search").mkdir()
    (wd / "search" / "result.json").write_text(json.dumps({"budgets": {"small": {
        "arch": arch.to_dict(), "score": 1.0, "latency_ms": SEARCH_PREDICTION}}}))
    clock = RecordingClock()
    with mock.patch("elm_jax.timing.measure_many", clock):
        run_export(cfg, wd, data)
    info = json.loads((wd / "export" / "small" / "arch.json").read_text())
    return cfg, space, widths, arch, table, info, clock


@pytest.mark.fidelity
def test_export_predicts_the_model_as_exported(exported):
    """predicted_latency_ms is the table's prediction for the post-CKA head counts (computed
    here from the architecture with those heads), not the search's pre-CKA number."""
    _, space, widths, arch, table, info, _ = exported
    post = [r["new_heads"] for r in info["cka_heads"]]
    assert post == info["heads"] and post != [lc.heads for lc in arch.layers]  # CKA merged heads
    post_arch = Arch(tuple(LayerChoice(lc.family, lc.candidate, h, lc.active)
                           for lc, h in zip(arch.layers, post)))
    expected = table.predict_ms(space, post_arch, widths)
    assert expected != table.predict_ms(space, arch, widths)
    assert info["predicted_latency_ms"] == expected
    assert info["search_predicted_latency_ms"] == SEARCH_PREDICTION
    assert info["measured_latency_ms"] == pytest.approx(1.0)   # the recording clock's 1 ms


@pytest.mark.fidelity
def test_table_and_export_measurement_use_one_policy(exported, tmp_path):
    """The export stage's end-to-end measurement and a table build from the same cfg.latency
    call the clock with the same repeats, warm-up, quantile, least time and re-warm calls."""
    cfg, space, _, _, _, _, export_clock = exported
    (names, export_settings), = export_clock.calls          # one call: the exported model
    assert names == ["model"]
    clock = RecordingClock()
    with mock.patch("elm_jax.timing.measure_many", clock):
        latency.load_or_build(space, cfg.latency, cfg.data.seq_len, cache_dir=tmp_path)
    (names, table_settings), = clock.calls
    assert "embedding" in names and "model:0" in names
    assert export_settings == table_settings
    lc = cfg.latency
    assert table_settings == (lc.repeats, lc.warmup, *_stat(lc).values(), 1)


def _stat(lc) -> dict:
    """The statistic of ``cfg.latency`` (the table's defaults where the config has none)."""
    return {"quantile": lc.get("quantile", 0.0), "min_time_s": lc.get("min_time_s", 2.0)}
