"""Rank statistics of the replication against hand counts and closed forms."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from replicate_stats import average_ranks, kendall_tau, mean_std, spearman_rho  # noqa: E402


def test_kendall_tau_hand_counts():
    # x = 1..4, y = (1, 3, 2, 4): pairs (2,3) discordant, 5 concordant -> (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties (tau-b): x = (1, 1, 2), y = (1, 2, 3): C = 2, D = 0, n0 = 3, n1 = 1, n2 = 0
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(2 * 3))
    assert np.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_closed_form_without_ties():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9)
    rx, ry = np.argsort(np.argsort(x)) + 1, np.argsort(np.argsort(y)) + 1
    n = len(x)
    closed = 1 - 6 * np.sum((rx - ry) ** 2) / (n * (n * n - 1))
    assert spearman_rho(x, y) == pytest.approx(closed)
    assert spearman_rho(x, 3 * x + 1) == pytest.approx(1.0)


def test_average_ranks_and_mean_std():
    np.testing.assert_allclose(average_ranks([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    m, s, n = mean_std([1.0, 2.0, 3.0, float("nan")])
    assert (m, n) == (2.0, 3) and s == pytest.approx(1.0)
