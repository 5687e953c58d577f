"""Training engine: optimizer, sharded step equivalence, resume, NaN guard, SIGTERM."""

from __future__ import annotations

import copy
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import toy_train as T
from elm_jax.engine import checkpoint as ckpt_lib
from elm_jax.engine import metrics as metrics_lib
from elm_jax.engine import sharding as shd
from elm_jax import engine as train

STEPS = 12


def _host(tree):
    """Params as a {path: np.ndarray} dict (a copy, safe from donation)."""
    tree = ckpt_lib.keys_to_data(tree)
    return {jax.tree_util.keystr(k): np.array(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _with(trainer: train.Trainer, **overrides) -> train.Trainer:
    """The same compiled trainer with loop-only config fields changed."""
    t = copy.copy(trainer)
    t.tc = copy.deepcopy(trainer.tc)
    t.tc.update(overrides)
    if "nan_policy" in overrides:
        t.nan_policy = overrides["nan_policy"]
    return t


@pytest.fixture(scope="module")
def mesh1():
    return shd.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def trainer1(mesh1):
    return train.Trainer(T.make_model(), T.loss_fn, T.eval_fn, T.make_tc(steps=STEPS), mesh1)


@pytest.fixture(scope="module")
def reference_run(trainer1, tmp_path_factory):
    """One uninterrupted 12-step fit, shared by the resume tests."""
    workdir = tmp_path_factory.mktemp("ref")
    init_eval = train.evaluate(trainer1, trainer1.init_state(), T.ToyEvalSource())
    state, summary = train.fit(_with(trainer1, eval_every=6), T.ToySource(), T.ToyEvalSource(), workdir)
    return {
        "params": _host(state.params),
        "other": _host(state.other),
        "summary": summary,
        "workdir": workdir,
        "init_eval": init_eval,
    }


# ----------------------------------------------------------------------------
# optimizer


def test_schedule_matches_formula():
    tc = T.make_tc(lr=1e-3, warmup_frac=0.1)
    sched = train.lr_schedule(tc, 100)  # W = 10
    for t, want in [
        (0, 0.0),
        (5, 5e-4),
        (10, 1e-3),
        (55, 5e-4),
        (90, 1e-3 * 10 / 90),
        (100, 0.0),
        (120, 0.0),
    ]:
        assert float(sched(t)) == pytest.approx(want, abs=1e-9), t
    no_warm = train.lr_schedule(T.make_tc(lr=1e-3, warmup_frac=0.0), 100)
    assert float(no_warm(0)) == pytest.approx(1e-3)
    assert float(no_warm(50)) == pytest.approx(5e-4)


def test_schedule_holds_the_peak_until_decay_start():
    tc = T.make_tc(lr=1e-3, warmup_frac=0.1)
    tc.decay_start_frac = 0.6  # W = 10, D = 60: lr(t) = lr * (100 - t) / 40 from t = 60
    sched = train.lr_schedule(tc, 100)
    for t, want in [(0, 0.0), (5, 5e-4), (10, 1e-3), (35, 1e-3), (60, 1e-3), (80, 5e-4),
                    (90, 2.5e-4), (100, 0.0)]:
        assert float(sched(t)) == pytest.approx(want, abs=1e-9), t
    tc.decay_start_frac = 0.05  # before the warm-up's end: the plain schedule
    plain = train.lr_schedule(T.make_tc(lr=1e-3, warmup_frac=0.1), 100)
    assert all(float(train.lr_schedule(tc, 100)(t)) == float(plain(t)) for t in range(0, 101, 5))


def test_no_weight_decay_on_vectors(trainer1):
    params = trainer1._init_params
    mask = train.decay_mask(params)
    for (path, p), (_, m) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(mask)[0]
    ):
        assert bool(m) == (p.ndim > 1), jax.tree_util.keystr(path)
    # Behaviour: with zero gradients Adam's step is 0, so the update is the decay alone.
    tc = T.make_tc(lr=0.1, warmup_frac=0.0, weight_decay=0.5, clip_norm=0.0)
    tx = train.make_optimizer(tc, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for (path, p), (_, u) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(updates)[0]
    ):
        want = -0.1 * 0.5 * np.asarray(p) if p.ndim > 1 else np.zeros(p.shape)
        np.testing.assert_allclose(np.asarray(u), want, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------
# mesh / sharding


def test_make_mesh_errors_name_the_field():
    with pytest.raises(ValueError, match="mesh.data"):
        shd.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1)))
    with pytest.raises(ValueError, match="mesh.fsdp"):
        shd.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=3)))
    mesh = shd.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}


@pytest.mark.parametrize("data,fsdp", [(4, 2), (8, 1)])
def test_sharded_step_equals_single_device(trainer1, data, fsdp):
    mesh = shd.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)))
    tr = train.Trainer(T.make_model(), T.loss_fn, T.eval_fn, T.make_tc(steps=STEPS), mesh)
    if fsdp > 1:
        emb_spec = tr.state_shardings.params["embed"]["embedding"].get_value().spec
        assert "fsdp" in tuple(emb_spec)
        mu = tr.state_shardings.opt_state
        specs = {s.spec for s in jax.tree.leaves(mu) if "fsdp" in tuple(s.spec)}
        assert emb_spec in specs  # Adam moments follow their params
    src = T.ToySource()
    results = []
    for t in (trainer1, tr):
        state = t.init_state()
        losses = []
        for step in range(3):
            state, m = t.train_step(state, shd.global_batch(src.batch(step, 0, 1), t.mesh))
            losses.append(float(m["loss"]))
        results.append((_host(state.params), losses))
    (p1, l1), (p8, l8) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-6, atol=1e-6)
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], atol=1e-6, rtol=1e-6, err_msg=k)
    if fsdp > 1:  # params really are split over devices
        emb = state.params["embed"]["embedding"].get_value()
        assert emb.addressable_shards[0].data.shape[0] == emb.shape[0] // fsdp


# ----------------------------------------------------------------------------
# the loop


def test_loss_decreases_and_summary(reference_run):
    ref = reference_run
    rows = metrics_lib.read_metrics(os.path.join(ref["workdir"], "teacher", "metrics.jsonl"))
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
    assert train_losses[-1] < 0.7 * train_losses[0]
    summary = json.loads((ref["workdir"] / "teacher" / "summary.json").read_text())
    assert summary["final_step"] == STEPS
    assert summary["eval"]["loss"] < ref["init_eval"]["loss"] - 0.5
    assert summary["eval"]["loss"] == pytest.approx(
        summary["eval"]["loss_sum"] / summary["eval"]["weight_sum"]
    )
    assert summary["skipped_steps"] == 0
    assert [r["step"] for r in rows if "eval/loss" in r] == [6, STEPS]
    # final checkpoint at the end, the "other" state (token counter) advanced
    assert ckpt_lib.Checkpointer(ref["workdir"] / "teacher" / "checkpoints", 3, 4).latest_step() == STEPS
    assert ref["other"]["['tokens_seen'].value"] == STEPS * T.BATCH * T.SEQ


def test_kill_and_resume_is_bitwise_identical(trainer1, reference_run, tmp_path):
    tr = _with(trainer1, checkpoint_every=4)
    with pytest.raises(RuntimeError, match="simulated crash at step 7"):
        train.fit(tr, T.ToySource(fail_at=7), T.ToyEvalSource(), tmp_path)
    ck = ckpt_lib.Checkpointer(tmp_path / "teacher" / "checkpoints", 3, 4)
    assert ck.all_steps() == [4]
    ck.close()
    state, summary = train.fit(tr, T.ToySource(), T.ToyEvalSource(), tmp_path)
    assert summary["resumed_from"] == 4
    got = _host(state.params)
    for k, v in reference_run["params"].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    got_other = _host(state.other)  # non-param state (counter, RNG key) restored too
    for k, v in reference_run["other"].items():
        np.testing.assert_array_equal(got_other[k], v, err_msg=k)
    steps = [
        r["step"]
        for r in metrics_lib.read_metrics(tmp_path / "teacher" / "metrics.jsonl")
        if "train/loss" in r
    ]
    assert steps == list(range(1, STEPS + 1))  # no duplicates from the crashed attempt
    assert trainer1.train_step_traces == 1  # one compiled step for every fit call
    # rerunning a finished run trains nothing and changes nothing
    state2, summary2 = train.fit(tr, T.ToySource(), T.ToyEvalSource(), tmp_path)
    assert summary2["resumed_from"] == STEPS and summary2["final_step"] == STEPS
    np.testing.assert_array_equal(
        _host(state2.params)["['out']['kernel'].value"], reference_run["params"]["['out']['kernel'].value"]
    )


def test_sigterm_checkpoints_and_resumes(trainer1, reference_run, tmp_path):
    tr = _with(trainer1, checkpoint_every=100)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.Preempted, match="preempted") as info:
        train.fit(tr, T.ToySource(sigterm_at=5), None, tmp_path)
    assert info.value.step == 6  # the step in flight was finished
    assert signal.getsignal(signal.SIGTERM) is before  # handler only inside fit
    ck = ckpt_lib.Checkpointer(tmp_path / "teacher" / "checkpoints", 3, 100)
    assert ck.all_steps() == [6]
    ck.close()
    state, summary = train.fit(tr, T.ToySource(), None, tmp_path)
    assert summary["resumed_from"] == 6
    got = _host(state.params)
    for k, v in reference_run["params"].items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("log_every", [1, 100])
def test_nan_stop_raises_and_never_saves_nonfinite(trainer1, tmp_path, log_every):
    tr = _with(trainer1, nan_policy="stop", checkpoint_every=2, log_every=log_every)
    with pytest.raises(train.NonFiniteError, match="step 5") as info:
        train.fit(tr, T.ToySource(nan_steps=(5,)), None, tmp_path)
    assert info.value.step == 5
    ck = ckpt_lib.Checkpointer(tmp_path / "teacher" / "checkpoints", 3, 2)
    steps = ck.all_steps()
    assert steps and max(steps) <= 5
    for s in steps:
        state, _ = ck._restore_step(s, trainer1.abstract_state)
        assert ckpt_lib.tree_all_finite(state), s
    ck.close()


def test_nan_skip_leaves_state_unchanged(trainer1, tmp_path):
    src = T.ToySource(nan_steps=(1,))
    state = trainer1.init_state()
    state, m = trainer1.train_step(state, shd.global_batch(src.batch(0, 0, 1), trainer1.mesh))
    before = _host((state.params, state.opt_state))
    state, m = trainer1.train_step(state, shd.global_batch(src.batch(1, 0, 1), trainer1.mesh))
    assert int(m["skipped"]) == 1 and int(state.step) == 2
    after = _host((state.params, state.opt_state))
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    state, m = trainer1.train_step(state, shd.global_batch(src.batch(2, 0, 1), trainer1.mesh))
    assert int(m["skipped"]) == 0
    assert any(not np.array_equal(v, before[k]) for k, v in _host((state.params, state.opt_state)).items())
    # and through fit: counted, no exception, finite result
    tr = _with(trainer1, nan_policy="skip", checkpoint_every=100, log_every=5)
    state, summary = train.fit(tr, src, None, tmp_path)
    assert summary["skipped_steps"] == 1
    assert ckpt_lib.tree_all_finite(state.params)


def test_model_from_state(trainer1):
    state = trainer1.init_state()
    model = trainer1.model_from_state(state)
    logits = model(jnp.zeros((2, T.SEQ), jnp.int32))
    assert logits.shape == (2, T.SEQ, T.VOCAB)


# ----------------------------------------------------------------------------
# metric contract: only the declared ratios are derived


def _extra_eval_fn(model, batch):
    """The toy eval sums plus an undeclared ``extra_sum`` and a ``rows`` count."""
    out = T.eval_fn(model, batch)
    return out | {"extra_sum": 2.0 * out["weight_sum"], "rows": jnp.ones((), jnp.float32)}


class _UnevenEval:
    """Three fixed eval batches with different numbers of weighted tokens."""

    def batches(self, process_index, process_count):
        src = T.ToySource(seed=77)
        for i in range(3):
            b = src.global_batch(i)
            b["weights"][:, i + 2:] = 0.0
            b["mask"] = (b["weights"] != 0).astype(np.int32)
            n = T.BATCH // process_count
            yield {k: v[process_index * n:(process_index + 1) * n] for k, v in b.items()}


def test_undeclared_metric_is_not_divided(mesh1, tmp_path):
    ratios = {"loss": ("loss_sum", "weight_sum")}
    tr = train.Trainer(T.make_model(), T.loss_fn, _extra_eval_fn, T.make_tc(steps=2), mesh1, ratios=ratios)
    got = train.evaluate(tr, tr.init_state(), _UnevenEval())
    assert set(got) == {"loss_sum", "weight_sum", "correct_sum", "extra_sum", "rows", "loss"}
    assert got["extra_sum"] == 2.0 * got["weight_sum"]  # raw sum, not divided by weight_sum
    assert got["rows"] == 3.0
    # the train log too: correct_sum is a raw sum when `correct` is not declared
    _, summary = train.fit(tr, T.ToySource(), _UnevenEval(), tmp_path, name="undeclared")
    assert "correct" not in summary["train"] and "correct" not in summary["eval"]
    assert "extra" not in summary["eval"] and "correct_sum" in summary["train"]
    # the engine's default is LM_RATIOS only
    assert train.Trainer(T.make_model(), T.loss_fn, T.eval_fn, T.make_tc(steps=1), mesh1).ratios == {
        "loss": ("loss_sum", "weight_sum"), "correct": ("correct_sum", "weight_sum")}
    with pytest.raises(ValueError, match="ratios"):
        train.Trainer(T.make_model(), T.loss_fn, T.eval_fn, T.make_tc(steps=1), mesh1, ratios={"x": "x_sum"})


def test_declared_ratio_is_the_global_ratio_over_the_eval_set(mesh1):
    ratios = {"loss": ("loss_sum", "weight_sum"), "extra_per_row": ("extra_sum", "rows"),
              "loss_per_correct": ("loss_sum", "correct_sum")}
    tr = train.Trainer(T.make_model(), T.loss_fn, _extra_eval_fn, T.make_tc(steps=1), mesh1, ratios=ratios)
    state = tr.init_state()
    got = train.evaluate(tr, state, _UnevenEval())
    per_batch = [jax.device_get(tr.eval_step(state, shd.global_batch(b, mesh1)))
                 for b in _UnevenEval().batches(0, 1)]
    tot = {k: sum(float(p[k]) for p in per_batch) for k in per_batch[0]}
    weights = [float(p["weight_sum"]) for p in per_batch]
    assert len(set(weights)) == 3  # uneven batches: a mean of batch means would differ
    assert got["loss"] == pytest.approx(tot["loss_sum"] / tot["weight_sum"], rel=1e-6)
    assert got["loss"] != pytest.approx(np.mean([float(p["loss_sum"]) / float(p["weight_sum"])
                                                 for p in per_batch]), rel=1e-6)
    assert got["extra_per_row"] == pytest.approx(2.0 * tot["weight_sum"] / 3.0, rel=1e-6)
    assert got["loss_per_correct"] == pytest.approx(tot["loss_sum"] / tot["correct_sum"], rel=1e-6)
    assert got["loss"] == got["loss_sum"] / got["weight_sum"]
    # a denominator of zero gives NaN, not an error
    zero = train.trainer.derive_ratios({"a_sum": 1.0, "n": 0.0}, {"a": ("a_sum", "n")})
    assert np.isnan(zero["a"])
