"""Re-ranking a search's best candidates by a short standalone training (issue 31 part 3).

The supernet's fitness (each candidate's search-split loss with the shared weights) can miss
what a model does once trained on its own: on the demo, architectures whose first block is a
MobileBERT block score best and retrain worst, and the fitness ranks the retrained losses no
better than parameter counts do, while each model's own loss early in its retraining ranks
them well (RESULTS.md, "Does the supernet rank?"). With ``search.rerank_top = k > 0`` the search
stage therefore takes the ``k`` best-scoring distinct legal architectures of a budget, extracts
each from the supernet with its inherited weights (as the export does, before the CKA head
module), KD-trains it standalone for ``search.rerank_steps`` steps with the retraining recipe
(``retrain.*``, its step count replaced) and scores it on the SEARCH split, the split the fitness
uses (the validation split stays reserved for comparing the final models)::

    short_loss(a) = search-split loss of a after rerank_steps steps of
                    KD retraining from its inherited weights
    low  = argmin_{a in top_k(fitness)} short_loss(a)
    tied = {a : the paired interval of short_loss(a) - short_loss(low), at level
                search.rerank_tie_level, contains 0}      (low itself included)
    best = the member of tied with the best fitness

A short training only overrides the fitness where it has evidence: a candidate whose short loss
is higher than the lowest by less than the noise (the normal interval ``d -/+ z se(d)`` of the
difference, its standard error paired over the same search rows as in
:mod:`elm_jax.search.fitness_noise`) is as good as the lowest, and among those the fitness
decides. On demo seed 1 the plain argmin (level 0) swapped the fitness's pick for one 0.0008
nats lower after 200 steps that retrained 0.010 nats worse.

The random-search control is re-ranked the same way (its own top ``k``), so the comparison of
the two stays fair. Each short training checkpoints like any engine run, so a search stage that
is killed resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flax import nnx
from ml_collections import ConfigDict

import numpy as np

from elm_jax import engine
from elm_jax.arch import Arch
from elm_jax.lm import lm_row_sums
from elm_jax.models.extract import extract
from elm_jax.search.fitness_noise import loss_gain
from elm_jax.students import KD_RATIOS, DenseStudent, kd_fns


def top_candidates(scores: Mapping[str, float], archs: Mapping[str, Arch], ok: Callable[[Arch], bool],
                   k: int) -> list[str]:
    """The ids of the ``k`` lowest finite scores among the architectures ``ok`` accepts (ties: by
    id, so the choice is deterministic)."""
    ids = [a for a, s in scores.items() if math.isfinite(s) and ok(archs[a])]
    return sorted(ids, key=lambda a: (scores[a], a))[:k]


class ShortTraining:
    """Short KD trainings of architectures extracted from one supernet (``net`` at ``widths``)
    against one frozen teacher."""

    def __init__(self, cfg: Any, teacher: Any, data: Any, mesh: Any, root: Path, net: Any, widths: Any):
        self.net, self.widths = net, widths
        self.rc = cfg.retrain
        self.steps = int(cfg.search.rerank_steps)
        self.tie_level = float(cfg.search.rerank_tie_level)
        self.seed = int(cfg.seed)
        self.data, self.mesh, self.root = data, mesh, Path(root)
        graphdef, self.t_params, rest = nnx.split(teacher, nnx.Param, ...)
        self.teacher_hidden = teacher.cfg.hidden
        self.loss_fn, self.eval_fn = kd_fns(graphdef, rest, self.rc.kd_loss, float(self.rc.gt_weight))

    def rows(self, arch: Arch, name: str) -> np.ndarray:
        """``arch``'s search-split rows ``[R, 3]`` (:func:`elm_jax.lm.lm_row_sums`) after
        ``search.rerank_steps`` steps of KD retraining from its inherited weights (engine run
        ``<root>/<name>``: resumes, and a finished one is only evaluated again)."""
        student = DenseStudent(extract(self.net, self.widths, arch), self.teacher_hidden, self.seed)
        tc = ConfigDict(self.rc.train.to_dict() | {"seed": self.seed, "steps": self.steps,
                                                   "eval_every": self.steps,
                                                   "checkpoint_every": self.steps})
        trainer = engine.Trainer(student, self.loss_fn, self.eval_fn, tc, self.mesh, frozen=self.t_params,
                                 ratios=KD_RATIOS)
        state, _ = engine.fit(trainer, self.data.train, self.data.search, self.root, name=name,
                              meta={"rerank": arch.arch_id})
        return lm_row_sums(trainer.model_from_state(state).model, self.data.search, self.mesh)

    def loss(self, arch: Arch, name: str) -> float:
        """The search-split loss of :meth:`rows` (its column sums divided)."""
        r = self.rows(arch, name)
        return float(r[:, 0].sum() / r[:, 1].sum())


def rerank(ids: list[str], scores: Mapping[str, float], archs: Mapping[str, Arch],
           short_rows: Callable[[Arch, str], np.ndarray], tie_level: float = 0.9,
           ) -> tuple[str, list[dict[str, Any]]]:
    """The id the module docstring's rule picks among ``ids`` (the best fitness among the short
    losses tied with the lowest at ``tie_level``; 0: the plain argmin, ties by fitness, then id)
    and one row per candidate, in fitness order: ``{arch_id, describe, fitness, short_loss,
    short_se, tied}``, ``short_se`` the paired standard error of its short loss minus the
    lowest. ``short_rows(arch, run_name)`` gives a candidate's ``[R, 3]`` search rows."""
    if not ids:
        raise ValueError("rerank: no candidate to re-rank")
    if not 0.0 <= tie_level < 1.0:
        raise ValueError(f"rerank: tie_level must be in [0, 1), got {tie_level}")
    ids = sorted(ids, key=lambda a: (scores[a], a))
    got = {a: np.asarray(short_rows(archs[a], f"r{i:02d}_{a}"), np.float64) for i, a in enumerate(ids)}
    loss = {a: float(r[:, 0].sum() / r[:, 1].sum()) for a, r in got.items()}
    low = min(ids, key=lambda a: (loss[a], scores[a], a))
    rows = []
    for a in ids:
        g = loss_gain(got[low], got[a], level=tie_level) if a != low else {"se": 0.0, "verdict": "-"}
        rows.append({"arch_id": a, "describe": archs[a].describe(), "fitness": float(scores[a]),
                     "short_loss": loss[a], "short_se": float(g["se"]),
                     "tied": a == low or g["verdict"] != "lower"})
    best = next(r for r in rows if r["tied"])  # rows are in fitness order
    return best["arch_id"], rows
