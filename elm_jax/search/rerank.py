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
    best = argmin_{a in top_k(fitness)} short_loss(a)     (ties: the better fitness)

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

from elm_jax import engine
from elm_jax.arch import Arch
from elm_jax.models.extract import extract
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
        self.seed = int(cfg.seed)
        self.data, self.mesh, self.root = data, mesh, Path(root)
        graphdef, self.t_params, rest = nnx.split(teacher, nnx.Param, ...)
        self.teacher_hidden = teacher.cfg.hidden
        self.loss_fn, self.eval_fn = kd_fns(graphdef, rest, self.rc.kd_loss, float(self.rc.gt_weight))

    def loss(self, arch: Arch, name: str) -> float:
        """``arch``'s search-split loss after ``search.rerank_steps`` steps of KD retraining from
        its inherited weights (engine run ``<root>/<name>``: resumes, and a finished one is
        only evaluated again)."""
        student = DenseStudent(extract(self.net, self.widths, arch), self.teacher_hidden, self.seed)
        tc = ConfigDict(self.rc.train.to_dict() | {"seed": self.seed, "steps": self.steps,
                                                   "eval_every": self.steps,
                                                   "checkpoint_every": self.steps})
        trainer = engine.Trainer(student, self.loss_fn, self.eval_fn, tc, self.mesh, frozen=self.t_params,
                                 ratios=KD_RATIOS)
        _, summary = engine.fit(trainer, self.data.train, self.data.search, self.root, name=name,
                                meta={"rerank": arch.arch_id})
        return float(summary["eval"]["loss"])


def rerank(ids: list[str], scores: Mapping[str, float], archs: Mapping[str, Arch],
           short_loss: Callable[[Arch, str], float]) -> tuple[str, list[dict[str, Any]]]:
    """The id of the lowest ``short_loss`` among ``ids`` (ties: the better fitness, then the id)
    and one row per candidate, in fitness order: ``{arch_id, describe, fitness, short_loss}``."""
    if not ids:
        raise ValueError("rerank: no candidate to re-rank")
    rows = [{"arch_id": a, "describe": archs[a].describe(), "fitness": float(scores[a]),
             "short_loss": short_loss(archs[a], f"r{i:02d}_{a}")} for i, a in enumerate(ids)]
    best = min(rows, key=lambda r: (r["short_loss"], r["fitness"], r["arch_id"]))
    return best["arch_id"], rows
