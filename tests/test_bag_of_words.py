"""The bag-of-words floor of fine-tuning (DESIGN 8), against direct computations."""

import numpy as np
import pytest

from elm_jax import bag_of_words
from elm_jax.data.tasks import TaskData

V, SPECIALS = 20, (0, 1, 2)


def _split(rng, n, pair=False):
    """Label 1 iff piece 7 occurs more often than piece 8 (a bag-of-words rule), with noise."""
    ids = rng.integers(3, V, (n, 12))
    ids[:, 0], ids[:, -2:] = 1, 0  # [CLS] ... padding
    seg = np.zeros_like(ids)
    if pair:
        seg[:, 6:10] = 1
    labels = ((ids == 7).sum(1) > (ids == 8).sum(1)).astype(np.int32)
    flip = rng.random(n) < 0.05
    return {"inputs": ids, "mask": (ids != 0).astype(np.int32), "segment_ids": seg,
            "labels": np.where(flip, 1 - labels, labels)}


def test_features_count_pieces_per_segment():
    rng = np.random.default_rng(0)
    s = _split(rng, 5, pair=True)
    got = bag_of_words.features(s, V, SPECIALS).toarray()
    want = np.zeros((5, 2 * V))
    for i in range(5):
        for j in range(12):
            t = s["inputs"][i, j]
            if s["mask"][i, j] and t not in SPECIALS:
                want[i, t + V * s["segment_ids"][i, j]] += 1
    np.testing.assert_allclose(got, np.log1p(want))


def test_bag_of_words_selects_c_on_the_holdout_and_scores_the_test_split():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    task = TaskData("toy", 2, ("accuracy",), _split(rng, 400), _split(rng, 200), {"test": _split(rng, 300)})
    got = bag_of_words.fit_and_score(task, V, SPECIALS)
    x = {k: bag_of_words.features(v, V, SPECIALS) for k, v in
         (("train", task.train), ("validation", task.validation), ("test", task.tests["test"]))}
    holdout = {}
    for c in bag_of_words.C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(x["train"], task.train["labels"])
        holdout[c] = np.mean(clf.predict(x["validation"]) == task.validation["labels"])
    best = max(holdout.values())
    c = min(k for k, v in holdout.items() if v == best)  # ties: the smaller C
    assert got["C"] == c and got["holdout_score"] == pytest.approx(best)
    clf = LogisticRegression(C=c, max_iter=2000).fit(x["train"], task.train["labels"])
    assert got["test_accuracy"] == pytest.approx(np.mean(clf.predict(x["test"]) == task.tests["test"]["labels"]))
    # per test example, in order: what the paired comparisons with fine-tuned models resample
    assert got["test_correct"] == (clf.predict(x["test"]) == task.tests["test"]["labels"]).astype(int).tolist()
    assert got["test_accuracy"] > 0.8  # the rule is a bag-of-words rule: the floor finds it
