"""The trivial answers (DESIGN 8) against direct computations on tiny data."""

import itertools

import numpy as np
import pytest

from elm_jax.data import context_free, pipeline
from elm_jax.data.tokenizer import SpecialIds

SPECIAL = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
V = 12  # ids 7..11 are the 5 ordinary pieces


def _docs(rng, n=30):
    return [rng.choice([7, 8, 8, 9, 9, 9, 10, 11], rng.integers(3, 20)).astype(np.int32) for _ in range(n)]


def test_unigram_counts_the_training_targets():
    rng = np.random.default_rng(0)
    docs = _docs(rng)
    mlm_rows = pipeline.pack_mlm(docs, 8, SPECIAL)
    u = context_free.unigram(mlm_rows, "mlm", V, SPECIAL)
    counts = {t: 0 for t in range(7, V)}
    for d in docs:
        for t in d:
            counts[int(t)] += 1
    total = sum(counts.values())
    for t in range(V):
        want = (counts[t] + 0.5) / (total + 0.5 * 5) if t >= 7 else 0.0
        assert u[t] == pytest.approx(want, rel=1e-12)
    # CLM: every id is a possible target, eos (the separator) included
    clm_rows = pipeline.pack_clm(docs, 8, SPECIAL)
    uc = context_free.unigram(clm_rows, "clm", V, SPECIAL)
    stream = np.concatenate([np.append(d, SPECIAL.eos) for d in docs])
    c = np.bincount(stream[1:], minlength=V)  # every stream token after the first is a target
    np.testing.assert_allclose(uc, (c + 0.5) / (c.sum() + 0.5 * V), rtol=1e-12)


def _posterior_by_enumeration(u, masking):
    """P(y | x) from the joint of (target y ~ u, corruption action), enumerated."""
    support = [t for t in range(V) if u[t] > 0]
    n = len(support)
    keep = 1 - masking.mask_frac - masking.random_frac
    joint = np.zeros((V, V))  # [x, y]
    for y in support:
        joint[SPECIAL.mask, y] += u[y] * masking.mask_frac
        joint[y, y] += u[y] * keep
        for v in support:
            joint[v, y] += u[y] * masking.random_frac / n
    return joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)


@pytest.mark.parametrize("masking", [pipeline.Masking(), pipeline.Masking(0.3, 0.5, 0.3)])
def test_context_free_mlm_is_the_bayes_posterior_of_the_input_piece(masking):
    rng = np.random.default_rng(1)
    u = context_free.unigram(pipeline.pack_mlm(_docs(rng), 8, SPECIAL), "mlm", V, SPECIAL)
    post = _posterior_by_enumeration(u, masking)
    xs, ys = zip(*itertools.product([SPECIAL.mask, *range(7, V)], range(7, V)))
    batch = {"inputs": np.array([xs]), "targets": np.array([ys])}
    got = context_free.token_log_probs(batch, u, "mlm", SPECIAL, masking)
    np.testing.assert_allclose(got[0], np.log(post[list(xs), list(ys)]), rtol=1e-10)
    # a posterior over y for every input piece
    for x in [SPECIAL.mask, *range(7, V)]:
        b = {"inputs": np.full((1, V - 7), x), "targets": np.arange(7, V)[None]}
        assert np.exp(context_free.token_log_probs(b, u, "mlm", SPECIAL, masking)).sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_reference_loss_on_the_models_batches_equals_a_loop(kind):
    rng = np.random.default_rng(2)
    pack = pipeline.pack_mlm if kind == "mlm" else pipeline.pack_clm
    train = pipeline.LMBatches(pack(_docs(rng, 60), 8, SPECIAL), kind, 4, 0, SPECIAL, V)
    evals = pipeline.EvalBatches(pack(_docs(rng, 20), 8, SPECIAL), kind, 4, 0, SPECIAL, V)
    data = type("Data", (), {"train": train})()
    got = context_free.reference_loss(data, evals)
    u = context_free.unigram(train.rows, kind, V, SPECIAL)
    post = _posterior_by_enumeration(u, pipeline.Masking()) if kind == "mlm" else None
    total = weight = 0.0
    per_row = []
    for k in range(len(evals)):
        b = evals.global_batch(k)
        per_row += [[0.0, 0.0] for _ in range(len(b["inputs"]))]
        for i, j in zip(*np.nonzero(b["weights"])):
            x, y = int(b["inputs"][i, j]), int(b["targets"][i, j])
            nll = -np.log(post[x, y] if kind == "mlm" else u[y])
            total += nll
            weight += 1
            per_row[-len(b["inputs"]) + i][0] += nll
            per_row[-len(b["inputs"]) + i][1] += 1
    assert got[context_free.KEY[kind]] == pytest.approx(total / weight, rel=1e-10)
    assert got["weight_sum"] == weight
    # per row, in the batches' order: what a model's per-row sums are paired with
    np.testing.assert_allclose(context_free.reference_rows(data, evals), per_row, rtol=1e-10)
    # better than the uniform predictor over the vocabulary
    assert 0 < got[context_free.KEY[kind]] < np.log(V)
