"""MLM loss at the scored positions only (issue 28 part 1): the LM head and its softmax run at
``data.max_predictions`` gathered positions per row, with the same loss as the head at every
position, for the dense models (teacher, retrained students), the supernet and both KD objectives.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from elm_jax.config import load_config
from elm_jax.data import pipeline
from elm_jax.data.arch_batches import arch_rows
from elm_jax.data.prepare import max_predictions_of, prepare_data
from elm_jax.data.tokenizer import SpecialIds
from elm_jax.lm import dense_config_from, evaluate_lm, lm_eval_fn, lm_loss_fn, lm_row_sums, supernet_lm_fns
from elm_jax.engine import sharding
from elm_jax.models.dense import dense_config, init_dense
from elm_jax.space import SearchSpace
from elm_jax.students import DenseStudent, Student, distill_sums_fn, kd_fns

SPECIAL = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
GATHERED = ("positions", "targets_k", "weights_k")


def _full(batch: dict) -> dict:
    """The same batch without its gathered positions: the head at every position."""
    return {k: v for k, v in batch.items() if k not in GATHERED}


@pytest.mark.parametrize("rate,seq_len", [(0.15, 64), (0.4, 64), (0.15, 128), (0.15, 32), (0.5, 16)])
def test_auto_max_predictions_is_the_binomial_tail(rate, seq_len):
    k = pipeline.auto_max_predictions(rate, seq_len)
    if k == 0:  # no gather only when the bound reaches the row
        assert seq_len * rate + 3 * math.sqrt(seq_len * rate * (1 - rate)) > seq_len - 8
        return
    assert k % 8 == 0 and k < seq_len
    # independent: SciPy's binomial tail beyond k is below 3 sd's one-sided normal tail
    assert stats.binom.sf(k, seq_len, rate) < 2e-3
    assert stats.binom.sf(k - 8, seq_len, rate) > stats.binom.sf(k, seq_len, rate)


def test_cap_and_gather_are_consistent():
    rng = np.random.default_rng(0)
    rows = rng.integers(7, 500, (64, 32)).astype(np.int32)
    rows[3, 20:] = SPECIAL.pad
    uncapped = pipeline.mlm_corrupt(rows, np.random.default_rng(1), SPECIAL, 500, pipeline.Masking(0.5))
    assert (uncapped["weights"].sum(-1) > 12).any()  # the cap below has rows to cut
    assert not set(GATHERED) & set(uncapped)
    out = pipeline.mlm_corrupt(rows, np.random.default_rng(1), SPECIAL, 500,
                               pipeline.Masking(0.5, max_predictions=12))
    w = out["weights"]
    assert w.sum(-1).max() <= 12 and (w.sum(-1) == 12).sum() >= (uncapped["weights"].sum(-1) >= 12).sum()
    assert ((w > 0) <= (uncapped["weights"] > 0)).all()  # capping only drops selections
    assert (w[rows == SPECIAL.pad] == 0).all()
    pos, tk, wk = out["positions"], out["targets_k"], out["weights_k"]
    assert pos.shape == tk.shape == wk.shape == (64, 12)
    for b in range(64):  # an independent per-row gather
        sel = np.flatnonzero(w[b])
        n = len(sel)
        np.testing.assert_array_equal(pos[b, :n], sel)
        np.testing.assert_array_equal(tk[b, :n], rows[b, sel])
        assert (wk[b, :n] == 1).all() and (wk[b, n:] == 0).all() and (pos[b, n:] == 0).all()
    # unselected inputs are untouched
    assert (out["inputs"][w == 0] == rows[w == 0]).all()


@pytest.fixture(scope="module")
def data():
    cfg = load_config("configs/mlm.py:test")
    return cfg, prepare_data(cfg)


def test_config_resolves_and_batches_carry_positions(data):
    cfg, bundle = data
    k = max_predictions_of(cfg)
    assert k == pipeline.auto_max_predictions(cfg.data.mask_rate, cfg.data.seq_len) > 0
    b = bundle.train.batch(0)
    assert b["positions"].shape == (cfg.data.batch_size, k)
    assert next(iter(bundle.eval.batches()))["positions"].shape[1] == k
    with cfg.unlocked():
        cfg.data.max_predictions = 0
    assert max_predictions_of(cfg) == 0
    clm = load_config("configs/clm.py:test")
    assert max_predictions_of(clm) == 0


def _close(a: dict, b: dict, keys=("loss_sum", "weight_sum", "correct_sum")):
    for k in keys:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=2e-5, atol=1e-4, err_msg=k)


def test_dense_loss_and_gradient_equal_the_full_head(data):
    cfg, bundle = data
    model = init_dense(dense_config_from(cfg, bundle.tokenizer.vocab_size), seed=3)
    batch = bundle.train.batch(1)
    assert batch["weights"].sum() > 0
    _close(lm_eval_fn(model, batch), lm_eval_fn(model, _full(batch)))
    out = model(batch["inputs"], batch["mask"], head_positions_BxK=batch["positions"])
    full = model(batch["inputs"], batch["mask"])
    np.testing.assert_allclose(np.asarray(out.logits),
                               np.take_along_axis(np.asarray(full.logits), batch["positions"][..., None], 1),
                               rtol=1e-5, atol=1e-5)

    def grad(b):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p):
            return lm_loss_fn(nnx.merge(graphdef, p, rest), b, jax.random.key(0))[0]
        return jax.grad(f)(params)

    g, gf = grad(batch), grad(_full(batch))
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(gf)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_supernet_and_kd_objectives_equal_the_full_head(data):
    cfg, bundle = data
    space = SearchSpace.from_config(cfg.space, vocab_size=bundle.tokenizer.vocab_size,
                                    max_len=cfg.data.seq_len, task="mlm")
    widths = space.initial_widths()
    arch = space.sample(np.random.default_rng(2))
    batch = bundle.train.batch(2)
    batch = batch | arch_rows([space.to_arrays(arch, widths)], len(batch["inputs"]))
    mesh = sharding.make_mesh(cfg.mesh)
    _, sums = supernet_lm_fns(mesh)
    student = Student(space, cfg.teacher.model.hidden, seed=1)
    _close(sums(student.net, sharding.global_batch(batch, mesh)),
           sums(student.net, sharding.global_batch(_full(batch), mesh)))

    teacher = init_dense(dense_config_from(cfg, bundle.tokenizer.vocab_size), seed=4)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    kd = distill_sums_fn(t_graphdef, t_rest, "pearson")
    a, b = kd(student, batch, t_params), kd(student, _full(batch), t_params)
    _close(a, b, ("loss_sum", "weight_sum", "correct_sum", "kd_total"))

    dense = init_dense(dense_config(space, arch, widths), seed=5)
    ds = DenseStudent(dense, cfg.teacher.model.hidden, seed=6)
    _, eval_fn = kd_fns(t_graphdef, t_rest, "pearson", 1.0)
    _close(eval_fn(ds, batch, t_params), eval_fn(ds, _full(batch), t_params),
           ("loss_sum", "weight_sum", "correct_sum", "kd_total"))


def test_per_row_sums_are_each_rows_own_loss_and_add_up_to_the_evaluation(data):
    """lm_row_sums (the rows the evaluate stage's standard errors pair): row i's sums are the
    loss of row i alone, in the order of the evaluation batches, over an 8-device mesh; their
    column sums are evaluate_lm's."""
    cfg, bundle = data
    model = init_dense(dense_config_from(cfg, bundle.tokenizer.vocab_size), seed=4)
    mesh = sharding.make_mesh(cfg.mesh)
    assert mesh.devices.size == 8
    rows = lm_row_sums(model, bundle.eval, mesh)
    batches = [bundle.eval.global_batch(k) for k in range(len(bundle.eval))]
    assert rows.shape == (sum(len(b["inputs"]) for b in batches), 3)
    i = 0
    for b in batches[:2]:
        for r in range(0, len(b["inputs"]), 5):  # every fifth row, alone (the full head)
            one = lm_eval_fn(model, _full({k: v[r:r + 1] for k, v in b.items()}))
            np.testing.assert_allclose(rows[i + r], [float(one[k]) for k in ("loss_sum", "weight_sum", "correct_sum")],
                                       rtol=2e-5, atol=1e-4)
        i += len(b["inputs"])
    ref = evaluate_lm(model, bundle.eval, mesh)
    assert rows[:, 0].sum() / rows[:, 1].sum() == pytest.approx(ref["loss"], rel=1e-5)
    assert rows[:, 2].sum() / rows[:, 1].sum() == pytest.approx(ref["correct"], rel=1e-5)
