"""The floor of every fine-tuned classifier (DESIGN 8): a bag-of-words logistic regression on the
same splits, pieces and selection rule as the fine-tuned models.

Features: the counts of each tokenizer piece in the example's input (special pieces dropped;
for a sentence pair, segment 0 and segment 1 are counted in separate blocks), scaled by
``log(1 + count)``. Model: scikit-learn's L2-regularised multinomial logistic regression
``min_W  sum_i -log softmax(W x_i + b)[y_i] + ||W||^2 / (2 C)``, with ``C`` chosen from
:data:`C_GRID` by the task's selection metric on the holdout (``validation``) split, ties to
the smaller ``C``, as fine-tuning selects its checkpoint; then the test split's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from elm_jax.data.glue import classification_metrics

#: The inverse regularisation strengths tried on the holdout split.
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def features(split: Mapping[str, np.ndarray], vocab_size: int, specials: Sequence[int]) -> sp.csr_matrix:
    """``[N, 2 V]`` sparse ``log(1 + count)`` of each piece per segment (module docstring)."""
    ids = np.asarray(split["inputs"])
    seg = np.asarray(split["segment_ids"]).clip(0, 1)
    keep = (np.asarray(split["mask"]) > 0) & ~np.isin(ids, np.asarray(specials))
    rows, cols = np.nonzero(keep)
    m = sp.csr_matrix((np.ones(len(rows)), (rows, ids[rows, cols] + vocab_size * seg[rows, cols])),
                      shape=(ids.shape[0], 2 * vocab_size))
    m.sum_duplicates()
    m.data = np.log1p(m.data)
    return m


def metrics(pred: np.ndarray, labels: np.ndarray, names: Sequence[str], num_classes: int) -> dict[str, float]:
    """The task's metrics of predictions, computed exactly as for the fine-tuned models
    (:func:`elm_jax.data.glue.classification_metrics` of the confusion counts)."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (np.asarray(labels), np.asarray(pred)), 1)
    return classification_metrics(confusion, names)


def fit_and_score(task: Any, vocab_size: int, specials: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Fits the bag-of-words regression on ``task.train`` (a :class:`~elm_jax.data.tasks.TaskData`),
    selects ``C`` on ``task.validation`` by ``task.metric_names[0]`` and scores every test split:
    ``{C, holdout_score, holdout_by_C, validation_metrics, test_accuracy, test_metrics, tests,
    test_correct}`` (``test_correct``: 1 / 0 per example of the first test split, in its order, for
    the paired comparisons of :mod:`elm_jax.paired_bootstrap`)."""
    from sklearn.linear_model import LogisticRegression

    x = {k: features(v, vocab_size, specials) for k, v in
         [("train", task.train), ("validation", task.validation), *task.tests.items()]}
    y = {"train": task.train["labels"], "validation": task.validation["labels"],
         **{k: v["labels"] for k, v in task.tests.items()}}
    names = tuple(dict.fromkeys([*task.metric_names, "accuracy"]))

    def score(clf, split: str) -> dict[str, float]:
        return metrics(clf.predict(x[split]), y[split], names, task.num_classes)

    metric = task.metric_names[0]
    best, by_c = None, {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x["train"], y["train"])
        by_c[str(c)] = score(clf, "validation")[metric]
        if best is None or by_c[str(c)] > best[0]:
            best = (by_c[str(c)], c, clf)
    holdout, c, clf = best
    tests = {k: score(clf, k) for k in task.tests}
    first = next(iter(task.tests))
    correct = (clf.predict(x[first]) == np.asarray(y[first])).astype(int).tolist()
    return {"C": c, "selection_metric": metric, "holdout_score": holdout, "holdout_by_C": by_c,
            "validation_metrics": score(clf, "validation"), "test_accuracy": tests[first]["accuracy"],
            "test_metrics": tests[first], "tests": tests, "test_correct": correct}
