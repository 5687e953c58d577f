"""The trivial answers (DESIGN 8): the best predictors that ignore context, per split and tokenizer.

A language model has learned something only where it beats these.

**Unigram** (fitted on the training split, add-0.5 smoothed):
``u(y) = (c(y) + 0.5) / (C + 0.5 |S|)`` over the support ``S`` of the targets: for MLM the
maskable (non-special) pieces, the ones masking can select and the random replacements are
drawn from; for CLM every id of the vocabulary. ``c`` counts the training targets (MLM: the
maskable pieces of the packed rows; CLM: the real next-token targets).

**CLM unigram loss**: ``-sum_i w_i log u(y_i) / sum_i w_i`` over the scored targets.

**Context-free MLM loss**: the Bayes predictor that sees only the input piece ``x`` at the scored
position. Under the corruption rule (a selected piece becomes ``[MASK]`` with probability
``m``, a uniformly random maskable piece with ``r``, stays with ``k = 1 - m - r``):

- ``x = [MASK]``: ``P(y | x) = u(y)``;
- ``x = v`` visible: ``P(y | x=v) = P(kept | v) [y = v] + P(replaced | v) u(y)``, with
  ``P(kept | v) = k u(v) / (k u(v) + r / N)`` and ``P(replaced | v) = 1 - P(kept | v)``,
  ``N = |S|`` (Bayes' rule: ``P(x=v, kept) = k u(v)``, ``P(x=v, replaced) = r / N``).

Its loss is ``-sum_i w_i log P(y_i | x_i) / sum_i w_i`` on exactly the positions, targets and
corrupted inputs the models are scored on (the same fixed evaluation batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from elm_jax.data.pipeline import Masking
from elm_jax.data.tokenizer import SpecialIds


def support(kind: str, vocab_size: int, special: SpecialIds) -> np.ndarray:
    """``bool [V]``: the ids a target can take (MLM: non-special pieces; CLM: every id)."""
    s = np.ones(int(vocab_size), bool)
    if kind == "mlm":
        s[np.asarray(special.all(), np.int64)] = False
    return s


def unigram(rows: np.ndarray, kind: str, vocab_size: int, special: SpecialIds) -> np.ndarray:
    """``float64 [V]``: the add-0.5 unigram of the training targets in packed ``rows``
    (MLM ``[N, L]``: every maskable piece; CLM ``[N, L+1]`` windows: the targets ``rows[:, 1:]``
    that are not padding, each stream token once). Zero outside the support."""
    ids = np.asarray(rows[:, 1:] if kind == "clm" else rows).ravel()
    sup = support(kind, vocab_size, special)
    ids = ids[sup[ids] & (ids != special.pad)] if kind == "clm" else ids[sup[ids]]
    counts = np.bincount(ids, minlength=int(vocab_size)).astype(np.float64)
    p = np.where(sup, counts + 0.5, 0.0)
    return p / p.sum()


def token_log_probs(batch: Mapping[str, np.ndarray], u: np.ndarray, kind: str, special: SpecialIds,
                    masking: Masking = Masking()) -> np.ndarray:
    """``float64 [B, L]``: ``log P(y | x)`` of the context-free predictor at every position
    (meaningful where ``weights > 0``)."""
    y = np.asarray(batch["targets"])
    log_u = np.log(np.maximum(u, 1e-300))
    if kind == "clm":
        return log_u[y]
    x = np.asarray(batch["inputs"])
    n = float((u > 0).sum())
    keep = 1.0 - masking.mask_frac - masking.random_frac
    kept = keep * u[x] / np.maximum(keep * u[x] + masking.random_frac / n, 1e-300)
    p = np.where(x == y, kept, 0.0) + (1.0 - kept) * u[y]
    return np.where(x == special.mask, log_u[y], np.log(np.maximum(p, 1e-300)))


def row_sums(batches: Iterable[Mapping[str, np.ndarray]], u: np.ndarray, kind: str, special: SpecialIds,
             masking: Masking = Masking()) -> np.ndarray:
    """``float64 [R, 2]``: each row's ``(loss_sum, weight_sum)`` of the context-free predictor,
    ``(-sum_t w_t log P(y_t | x_t), sum_t w_t)``, over the rows of ``batches`` in order (what a
    model's per-row sums are paired with)."""
    out = []
    for b in batches:
        w = np.asarray(b["weights"], np.float64)
        out.append(np.stack([-(w * token_log_probs(b, u, kind, special, masking)).sum(-1), w.sum(-1)], -1))
    return np.concatenate(out) if out else np.zeros((0, 2))


def loss(batches: Iterable[Mapping[str, np.ndarray]], u: np.ndarray, kind: str, special: SpecialIds,
         masking: Masking = Masking()) -> dict[str, float]:
    """``{loss, weight_sum}``: the token-mean negative log-likelihood of the context-free
    predictor over ``batches`` (the models' own evaluation batches), weighted by ``weights``."""
    rows = row_sums(batches, u, kind, special, masking)
    total, weight = float(rows[:, 0].sum()), float(rows[:, 1].sum())
    return {"loss": total / max(weight, 1.0), "weight_sum": weight}


def reference_loss(data, source, num_batches: int | None = None) -> dict[str, float]:
    """The trivial answer on an evaluation source of a :class:`~elm_jax.data.prepare.DataBundle`
    (``data.eval``, ``data.search``; its first ``num_batches`` batches, default all):
    ``{"context_free_loss" (MLM) | "unigram_loss" (CLM), "weight_sum"}``, the unigram fitted on
    ``data.train``'s rows, scored on the source's own fixed batches."""
    train = data.train
    u = unigram(train.rows, train.kind, train.vocab_size, train.special)
    n = len(source) if num_batches is None else min(int(num_batches), len(source))
    r = loss((source.global_batch(k) for k in range(n)), u, train.kind, train.special, train.masking)
    return {KEY[train.kind]: r["loss"], "weight_sum": r["weight_sum"]}


def reference_rows(data, source) -> np.ndarray:
    """:func:`row_sums` of the trivial answer on every fixed batch of an evaluation source of a
    :class:`~elm_jax.data.prepare.DataBundle` (the unigram fitted on ``data.train``'s rows, as in
    :func:`reference_loss`)."""
    train = data.train
    u = unigram(train.rows, train.kind, train.vocab_size, train.special)
    return row_sums((source.global_batch(k) for k in range(len(source))), u, train.kind, train.special,
                    train.masking)


#: The name of the trivial answer's loss per task (the field other tools read).
KEY = {"mlm": "context_free_loss", "clm": "unigram_loss"}


def trivial_loss_of(data, split: str = "validation") -> float | None:
    """The trivial answer the data stage computed for ``split`` (``data.stats['baselines']``),
    or ``None`` when the bundle has none."""
    rec = data.stats.get("baselines", {}).get(split, {})
    key = KEY.get(data.stats.get("task", ""))
    return float(rec[key]) if key in rec else None
