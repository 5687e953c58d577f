"""elm_jax.search.fitness_noise: the fitness's standard error by the delta method, checked against
the textbook mean's standard error, a bootstrap over rows and the identities of a paired difference."""

from __future__ import annotations

import numpy as np
import pytest

from elm_jax.search import fitness_noise as fn


def _rows(loss: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return np.stack([loss, weight, np.zeros_like(loss)], axis=-1)


def test_equal_weights_give_the_standard_error_of_the_mean():
    rng = np.random.default_rng(0)
    per_token = rng.gamma(4.0, 1.2, size=50)  # a row's mean token loss
    w = np.full(50, 8.0)
    se = fn.fitness_se(_rows(per_token * w, w))
    assert se == pytest.approx(np.std(per_token, ddof=1) / np.sqrt(50), rel=1e-12)


def test_standard_error_agrees_with_a_bootstrap_over_rows():
    rng = np.random.default_rng(1)
    w = rng.integers(5, 40, size=64).astype(float)
    loss = w * rng.gamma(5.0, 0.9, size=64) + rng.normal(0, 2, size=64)
    rows = _rows(loss, w)
    idx = rng.integers(0, 64, size=(20000, 64))
    boot = loss[idx].sum(1) / w[idx].sum(1)
    assert fn.fitness_se(rows) == pytest.approx(np.std(boot), rel=0.05)


def test_paired_error_removes_what_the_candidates_share():
    rng = np.random.default_rng(2)
    w = rng.integers(5, 40, size=64).astype(float)
    hardness = rng.gamma(5.0, 0.9, size=64)  # the same rows are hard for every candidate
    a = _rows(w * hardness, w)
    shifted = _rows(w * (hardness + 0.3), w)  # 0.3 nats worse on every token
    assert fn.paired_se(a, shifted) == pytest.approx(0.0, abs=1e-12)
    noisy = _rows(w * (hardness + 0.3 + rng.normal(0, 0.05, size=64)), w)
    assert 0 < fn.paired_se(a, noisy) < 0.2 * fn.fitness_se(a)
    # the paired error equals the bootstrap sd of the difference of the two ratios
    idx = rng.integers(0, 64, size=(20000, 64))
    boot = (a[idx, 0].sum(1) - noisy[idx, 0].sum(1)) / w[idx].sum(1)
    assert fn.paired_se(a, noisy) == pytest.approx(np.std(boot), rel=0.05)
    with pytest.raises(ValueError, match="same rows"):
        fn.paired_se(a, _rows(a[:, 0], a[:, 1] + 1))


def test_population_noise_summary():
    rng = np.random.default_rng(3)
    w = rng.integers(5, 40, size=32).astype(float)
    hardness = rng.gamma(5.0, 0.9, size=32)
    offsets = np.array([0.0, 0.1, 0.2, 0.4])
    pop = np.stack([_rows(w * (hardness + o + rng.normal(0, 0.02, size=32)), w) for o in offsets])
    got = fn.population_noise(pop)
    fit = pop[:, :, 0].sum(1) / w.sum()
    assert got["candidates"] == 4 and got["rows"] == 32
    assert got["spread"] == pytest.approx(np.std(fit, ddof=1))
    assert got["range"] == pytest.approx(fit.max() - fit.min())
    best = int(np.argmin(fit))
    pse = np.median([fn.paired_se(pop[p], pop[best]) for p in range(4) if p != best])
    assert got["paired_se"] == pytest.approx(pse)
    assert got["se"] == pytest.approx(np.median([fn.fitness_se(r) for r in pop]))
    assert got["ratio"] == pytest.approx(got["spread"] / pse) and got["ratio"] > 5
    assert fn.population_noise(pop[:1])["ratio"] is None
    with pytest.raises(ValueError, match="rows"):
        fn.population_noise(pop[0])


def test_population_noise_does_not_depend_on_the_candidates_order():
    """A resumed search lists its scored candidates in another order (its cache comes back from
    the saved state): the summary must be the same, bit for bit, so a resumed run's result.json
    equals an uninterrupted one's."""
    rng = np.random.default_rng(3)
    weight = rng.integers(1, 9, size=(16, 1)).astype(np.float64)
    rows = np.concatenate([np.abs(rng.normal(5.0, 1.0, size=(11, 16, 1))) * weight,
                           np.broadcast_to(weight, (11, 16, 1)),
                           np.zeros((11, 16, 1))], axis=-1)
    ref = fn.population_noise(rows)
    for seed in range(20):
        perm = np.random.default_rng(seed).permutation(len(rows))
        assert fn.population_noise(rows[perm]) == ref


def test_loss_gain_is_the_paired_difference_with_its_normal_interval():
    rng = np.random.default_rng(5)
    w = rng.integers(5, 30, 64).astype(np.float64)
    base = rng.gamma(4.0, 1.0, 64) * w  # a hard row is hard for both
    a = np.stack([base * 0.97 + rng.normal(0, 0.3, 64), w, np.zeros(64)], -1)
    b = np.stack([base, w], -1)  # [R, 2] rows (the trivial answer's) are accepted
    g = fn.loss_gain(a, b, level=0.9)
    assert g["gain"] == pytest.approx(b[:, 0].sum() / w.sum() - a[:, 0].sum() / w.sum(), rel=1e-12)
    assert g["se"] == pytest.approx(fn.paired_se(a[:, :2], b), rel=1e-12)
    assert g["lo"] == pytest.approx(g["gain"] - 1.6448536 * g["se"]) and g["hi"] == pytest.approx(g["gain"] + 1.6448536 * g["se"])
    assert g["verdict"] == "lower"  # 3% lower loss on every row, little row noise: beyond the noise
    back = fn.loss_gain(b, a, level=0.9)
    assert back["gain"] == pytest.approx(-g["gain"]) and back["se"] == pytest.approx(g["se"])
    assert back["verdict"] == "higher"
    assert fn.loss_gain(a, a)["verdict"] == "within noise"
