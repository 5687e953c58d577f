"""Method fidelity (DESIGN 1): each test fails on the code before its fix (see the issue note).

``pytest -m fidelity`` runs these and the other ``fidelity`` tests (e.g. in test_supernet_stage).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from ml_collections import ConfigDict
from scipy import stats

from elm_jax.config import load_config
from elm_jax.engine.optim import decay_mask, make_optimizer
from elm_jax.lm import dense_config_from
from elm_jax.models.classifier import Classifier, encoder_of
from elm_jax.models.dense import dense_config, init_dense
from elm_jax.models.elastic import FAMILY_PARAMS, _pkey
from elm_jax.search.constraints import Constraints
from elm_jax.search.evolution import _Evolution, check_search_params
from elm_jax.space import SearchSpace
from elm_jax.students import DenseStudent, Student

pytestmark = pytest.mark.fidelity

CFG = load_config("configs/mlm.py:test")
SPACE = SearchSpace.from_config(CFG.space, vocab_size=256, max_len=CFG.data.seq_len, task="mlm")


def _leaves(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _supernet_reference(path: str, value) -> bool:
    """Decay iff the parameter is a weight matrix or embedding table OF THE EXTRACTED MODEL: a
    candidate stack ``[L, T, *shape]`` decays iff its dense ``shape`` (FAMILY_PARAMS) is 2-D;
    every other leaf (embedding, head, projections) iff it is itself 2-D."""
    for fam, table in FAMILY_PARAMS.items():
        for dense_path, (shape, _, _) in table.items():
            if f"'{_pkey(dense_path)}'" in path and f"'{fam}'" in path:
                return len(shape) == 2
    return np.ndim(value) == 2


def test_decay_mask_follows_the_role_on_the_supernet_tree():
    student = Student(SPACE, 32, seed=0)
    params = nnx.state(student, nnx.Param)
    mask, values = _leaves(decay_mask(params)), _leaves(params)
    stacked_vectors = [k for k, v in values.items() if "'p'" in k and np.ndim(v) == 3]
    assert stacked_vectors  # biases / norm scales stacked [L, T, d]: 3-D but never decayed
    for k, v in values.items():
        assert bool(mask[k]) == _supernet_reference(k, v), k
    # Behaviour: with zero gradients AdamW's step is the decay alone: vectors do not move.
    tc = ConfigDict(dict(lr=0.1, warmup_frac=0.0, weight_decay=0.5, clip_norm=0.0, steps=10))
    tx = make_optimizer(tc, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for k, u in _leaves(updates).items():
        moved = bool(jnp.any(u != 0))
        assert moved == _supernet_reference(k, values[k]), k


@pytest.mark.parametrize("family", ["bert", "mobilebert", "gpt2"])
def test_decay_mask_on_every_dense_model(family):
    cfg = load_config("configs/clm.py:test" if family == "gpt2" else "configs/mlm.py:test")
    cfg.teacher.model.family = family
    teacher = init_dense(dense_config_from(cfg, 256), seed=0)
    arch = SPACE.sample(np.random.default_rng(0))
    extracted = init_dense(dense_config(SPACE, arch, SPACE.initial_widths()), seed=1)
    models = [teacher, extracted, DenseStudent(extracted, 32, seed=2),
              Classifier(encoder_of(extracted), 2, 0)]
    for model in models:
        params = nnx.state(model, nnx.Param)
        mask, values = _leaves(decay_mask(params)), _leaves(params)
        for k, v in values.items():  # dense trees: matrices and tables are exactly the 2-D leaves
            assert bool(mask[k]) == (np.ndim(v) == 2), (type(model).__name__, k)


def test_reactivated_layers_draw_their_genes_uniformly():
    """A layer that mutation switches back on must carry genes distributed like a fresh sample
    (uniform over family, candidate and heads), not the canonical placeholder of a skipped layer
    (first family, candidate 0, fewest heads). Independent searches (one per seed): the initial
    population, then one generation with a single, randomly ranked parent; the first re-activated
    layer of each search is one draw, tested against the uniform distribution."""
    space_cfg = CFG.space.to_dict() | {"layers": 6, "min_layers": 1, "elastic_depth": True, "candidates": 2}
    space = SearchSpace.from_config(space_cfg, vocab_size=256, max_len=CFG.data.seq_len, task="mlm")
    constraints = Constraints.from_budget({"name": "any"}, space, space.initial_widths(), CFG.data.seq_len)
    keys = ("population", "generations", "parents", "mutations", "crossovers", "mutation_prob")
    params = check_search_params(dict(zip(keys, (8, 2, 1, 7, 0, 0.2))), keys)
    genes: collections.Counter = collections.Counter()
    for seed in range(300):
        evo = _Evolution(space, constraints, params, seed=seed, max_tries=50)
        pop = evo.initial()
        parent = pop[int(np.random.default_rng(seed).integers(len(pop)))]
        children = evo.next_population([parent], 1)[1:1 + params["mutations"]]
        found = [(lc.family, lc.candidate, lc.heads) for child in children
                 for lc, old in zip(child.layers, parent.layers) if lc.active and not old.active]
        if found:
            genes[found[0]] += 1
    cells = [(f, c, h) for f in space.families for c in range(space.candidates) for h in space.head_choices]
    assert set(genes) <= set(cells)
    observed = np.array([genes[c] for c in cells], np.float64)
    assert observed.sum() >= 200, observed.sum()
    placeholder = genes[(space.families[0], 0, space.head_choices[0])] / observed.sum()
    assert placeholder < 2.5 / len(cells), (placeholder, dict(genes))
    assert stats.chisquare(observed).pvalue > 1e-3, dict(genes)


# ---------------------------------------------------------------------------------------------
# Only the sampled path is updated (DESIGN 1.5), against a per-tensor AdamW written in numpy


def _reference_lr(tc, k: int) -> float:
    total = int(tc.steps)
    warm = int(np.floor(float(tc.warmup_frac) * total))
    if k < warm:
        return float(tc.lr) * k / warm
    return float(tc.lr) * max(0.0, (total - k) / (total - warm))


def _units(key: str, value: np.ndarray, archs, head_used: bool):
    """``[(index, used)]`` of the PyTorch-sized tensors inside one leaf: every ``(l, t)`` slice of
    a candidate stack, else the whole leaf; used as the reference reads the architectures."""
    for fam in FAMILY_PARAMS:
        if f"['blocks']['{fam}']['p']" in key:
            L, T = value.shape[:2]
            on = {(l, lc.candidate) for a in archs for l, lc in enumerate(a.layers)
                  if lc.active and lc.family == fam}
            return [((l, t), (l, t) in on) for l in range(L) for t in range(T)]
        if f"['proj']['attn_{fam}']" in key:
            return [((), any(lc.active and lc.family == fam for a in archs for lc in a.layers))]
    if "['net']['head']" in key:
        return [((), head_used)]
    return [((), True)]


@pytest.mark.parametrize("mode", ["step", "device", "sandwich"])
def test_only_the_sampled_path_moves_as_in_pytorch_adamw(mode):
    from elm_jax.data.arch_batches import ArchBatches
    from elm_jax.data.pipeline import LMBatches
    from elm_jax.data.tokenizer import SpecialIds
    from elm_jax.engine import sharding
    from elm_jax.students import supernet_trainer

    cfg = load_config("configs/mlm.py:test")
    cfg.supernet.sample_per = "step" if mode == "step" else "device"
    cfg.supernet.sandwich = mode == "sandwich"
    cfg.supernet.train.steps = 4
    cfg.supernet.train.warmup_frac = 0.25
    cfg.supernet.train.clip_norm = 0.05  # small: clipping is active
    tc = cfg.supernet.train
    vocab = 64
    space = SearchSpace.from_config(cfg.space, vocab_size=vocab, max_len=cfg.data.seq_len, task="mlm")
    mesh = sharding.make_mesh(cfg.mesh)
    teacher = init_dense(dense_config_from(cfg, vocab), seed=7)
    trainer = supernet_trainer(cfg, space, teacher, mesh)
    special = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
    rows = np.random.default_rng(0).integers(7, vocab, (64, cfg.data.seq_len), dtype=np.int32)
    src = ArchBatches(LMBatches(rows, "mlm", cfg.data.batch_size, 0, special, vocab), space,
                      space.initial_widths(), mode=cfg.supernet.sample_per, num_devices=8, seed=3,
                      sandwich=cfg.supernet.sandwich)
    head_used = float(cfg.supernet.gt_weight) > 0

    def loss(params, batch):
        model = nnx.merge(trainer.graphdef, params, state.other, copy=True)
        return trainer.loss_fn(model, batch, jax.random.key(0), trainer.frozen)[0]

    grad_fn = jax.jit(jax.grad(loss))
    state = trainer.init_state()
    ref = {k: np.array(v, np.float64) for k, v in _leaves(state.params).items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v2 = {k: np.zeros_like(v) for k, v in ref.items()}
    count = {k: {} for k in ref}
    decay = {k: _supernet_reference(k, v) for k, v in ref.items()}
    b1, b2, eps, wd = float(tc.b1), float(tc.b2), float(tc.eps), float(tc.weight_decay)
    moved_and_kept = [0, 0]
    for k in range(int(tc.steps)):
        batch = sharding.global_batch(src.batch(k), mesh)
        grads = {key: np.array(g, np.float64) for key, g in _leaves(grad_fn(state.params, batch)).items()}
        norm = np.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        scale = min(1.0, float(tc.clip_norm) / norm) if norm > 0 else 1.0
        lr = _reference_lr(tc, k)
        before = {key: np.array(x) for key, x in _leaves(state.params).items()}
        m_before = {key: np.array(x) for key, x in _leaves(state.opt_state.mu).items()}
        for key, p in ref.items():
            for idx, used in _units(key, p, src.archs(k), head_used):
                if not used:
                    continue
                c = count[key][idx] = count[key].get(idx, 0) + 1
                g = grads[key][idx] * scale
                m[key][idx] = b1 * m[key][idx] + (1 - b1) * g
                v2[key][idx] = b2 * v2[key][idx] + (1 - b2) * g * g
                step = (m[key][idx] / (1 - b1 ** c)) / (np.sqrt(v2[key][idx] / (1 - b2 ** c)) + eps)
                p[idx] = p[idx] - lr * (step + (wd * p[idx] if decay[key] else 0.0))
        state, _ = trainer.train_step(state, batch)
        got = {key: np.array(x) for key, x in _leaves(state.params).items()}
        mu = {key: np.array(x) for key, x in _leaves(state.opt_state.mu).items()}
        counts = {key: np.array(x) for key, x in _leaves(state.opt_state.count).items()}
        for key, p in ref.items():
            # atol: a few 1e-4 of one step (lr 3e-3): float32 gradients of near-zero entries differ
            np.testing.assert_allclose(got[key], p, rtol=2e-5, atol=5e-6, err_msg=f"{key} step {k}")
            for idx, used in _units(key, p, src.archs(k), head_used):
                assert int(counts[key][idx]) == count[key].get(idx, 0), (key, idx, k)
                if not used:  # weights and moments bitwise unchanged
                    assert np.array_equal(got[key][idx], before[key][idx]), (key, idx, k)
                    assert np.array_equal(mu[key][idx], m_before[key][idx]), (key, idx, k)
                    moved_and_kept[1] += 1
                else:
                    moved_and_kept[0] += 1
    assert moved_and_kept[0] > 0 and moved_and_kept[1] > 0, moved_and_kept


def test_sampled_path_adamw_with_every_unit_used_is_optax_adamw():
    """The identity the sampled-path update rests on: used everywhere, it is the dense update."""
    from elm_jax.engine.optim import sampled_path_adamw

    tc = ConfigDict(dict(lr=0.1, warmup_frac=0.25, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6,
                         clip_norm=0.5, steps=6))
    rng = np.random.default_rng(0)
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)},
              "stack": {"bias": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)}}
    dense = make_optimizer(tc, 6)
    sampled = sampled_path_adamw(tc, 6, lambda path, leaf: 2 if leaf.ndim == 3 else 0)
    used = {"w": {"kernel": jnp.ones((), bool)}, "stack": {"bias": jnp.ones((2, 3), bool)}}
    p1 = p2 = params
    o1, o2 = dense.init(params), sampled.init(params)
    for k in range(6):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        u1, o1 = dense.update(g, o1, p1)
        u2, o2 = sampled.update(g, o2, p2, used=used)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
