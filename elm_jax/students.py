"""The students of distillation: the supernet with its KD projections, and a dense model with its own.

- :class:`Student` and :func:`supernet_trainer`: the supernet pre-training objective (DESIGN §1.4-1.5)
  as ONE compiled engine step, the frozen teacher passed as an argument; shared by the supernet
  stage and the benchmarks, so both time the same step.
- :class:`DenseStudent` and :func:`kd_fns`: the same objective for a standalone (extracted)
  model, used by the retrain stage and the replication.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from elm_jax import engine
from elm_jax.arch import FAMILY_INDEX
from elm_jax.data.arch_batches import local_arch
from elm_jax.distill import KDProjections, supernet_distill_loss
from elm_jax.engine.losses import LM_RATIOS, head_positions, scored_cross_entropy
from elm_jax.engine.optim import path_names
from elm_jax.engine.sharding import sharded_sums
from elm_jax.models.dense import DenseLM
from elm_jax.models.elastic import Supernet
from elm_jax.precision import compute_dtype, with_compute_dtype
from elm_jax.space import SearchSpace


class Student(nnx.Module):
    """The supernet plus the learned distillation projections to the teacher width."""

    def __init__(self, space: SearchSpace, teacher_hidden: int, seed: int, *,
                 dtype: Any = jnp.float32, remat: bool = False):
        self.net = Supernet(space, rngs=nnx.Rngs(params=seed), dtype=dtype, remat=remat)
        self.proj = KDProjections(jax.random.key(seed + 1), space.hidden, space.inner, teacher_hidden,
                                  space.families)

    def projections(self) -> dict[str, dict[str, jax.Array]]:
        return self.proj.arrays()


# The derived metrics of both students' KD objectives: ``loss`` / ``correct`` of the LM sums.
# ``kd_total`` (the KD objective, a per-device mean, summed over devices, steps and batches),
# ``kd_count`` (how many such means were summed) and the supernet's ``kd_<part>_total`` are
# reported as raw sums; ``kd = kd_total / kd_count`` is derived by their readers (the supernet
# stage, the report).
KD_RATIOS: dict[str, tuple[str, str]] = dict(LM_RATIOS)


def teacher_features_fn(teacher_graphdef: Any, teacher_rest: Any):
    """``(batch, teacher_params) -> batch`` with ``batch['teacher_features']``: the frozen
    teacher's embedding, per-layer attention and block outputs of the rows (each ``[B, S, H]``,
    no gradient). The ``prepare`` of :func:`elm_jax.engine.sharding.sharded_sums`: computed once
    on a device's rows however many architectures share them."""

    def prepare(batch: dict, teacher_params: Any) -> dict:
        teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
        t = teacher(batch["inputs"], batch["mask"], batch["segment_ids"])
        feats = jax.tree.map(jax.lax.stop_gradient, (t.embedding, t.attn_outs, t.block_outs))
        return batch | {"teacher_features": feats}

    return prepare


def distill_sums_fn(teacher_graphdef: Any, teacher_rest: Any, kind: str):
    """Per-device sums of the supernet objective for the rows' architecture; the teacher's
    features are ``batch['teacher_features']`` (:func:`teacher_features_fn`) where present, else
    computed here."""
    prepare = teacher_features_fn(teacher_graphdef, teacher_rest)

    def sums(student: Student, batch: dict, teacher_params: Any) -> dict:
        if "teacher_features" not in batch:
            batch = prepare(batch, teacher_params)
        t_emb, t_attn, t_block = batch["teacher_features"]
        arch = local_arch(batch)
        out = student.net(batch["inputs"], arch, batch["mask"], batch["segment_ids"],
                          head_positions_BxK=head_positions(batch))
        attn = {f: getattr(out.layers, f"attn_{f}") for f in FAMILY_INDEX}
        kd, parts = supernet_distill_loss(out.embedding, out.layers.block, attn, arch.family, arch.active,
                                          t_emb, t_attn, t_block, batch["mask"], student.projections(), kind)
        ce = scored_cross_entropy(out.logits, batch)
        # kd_* are per-device means, summed over devices (kd = kd_total / kd_count); not in
        # KD_RATIOS, so the engine reports them as raw sums.
        return ce | {"kd_total": kd, "kd_count": jnp.ones((), jnp.float32),
                     **{f"kd_{k}_total": v for k, v in parts.items()}}

    return sums


def _kd_mean(s: Mapping[str, jax.Array]) -> jax.Array:
    return s["kd_total"] / jnp.maximum(s["kd_count"], 1.0)


class SupernetPath:
    """Which parameter tensors of a :class:`Student` one global step used (DESIGN 1.5), for
    :func:`elm_jax.engine.optim.sampled_path_adamw`.

    A unit is a PyTorch-sized tensor: each (layer, candidate) slice of a family's stacked
    candidate weights ``net.blocks.<family>.p.*`` (``[L, T, ...]``: two unit axes), and every
    other parameter whole. In a step whose batch rows carry the architectures (``arch_*``,
    :mod:`elm_jax.data.arch_batches`), a candidate slice is used iff some row's architecture has
    that layer active with that family and candidate; a family's attention projection
    ``proj.attn_<family>`` iff some active layer has that family; the LM head iff the loss has a
    cross-entropy term (``gt_weight > 0``); the embedding and the shared projection always.
    """

    def __init__(self, space: SearchSpace, head_used: bool):
        self.space, self.head_used = space, bool(head_used)

    @staticmethod
    def _candidate_family(names: list[str]) -> str | None:
        if len(names) >= 4 and names[0] == "net" and names[1] == "blocks" and names[3] == "p":
            return names[2]
        return None

    def unit_axes(self, path: tuple[Any, ...], leaf: jax.Array) -> int:
        return 2 if self._candidate_family(path_names(path)) is not None else 0

    def used(self, params: Any, batch: Mapping[str, jax.Array]) -> Any:
        fam, cand = batch["arch_family"], batch["arch_candidate"]  # [B, L]
        active = batch["arch_active"].astype(bool)
        onehot_BxLxT = cand[..., None] == jnp.arange(self.space.candidates)
        per_family = {f: jnp.any((active & (fam == FAMILY_INDEX[f]))[..., None] & onehot_BxLxT, axis=0)
                      for f in self.space.families}  # [L, T]

        def leaf(path: tuple[Any, ...], _: jax.Array) -> jax.Array:
            names = path_names(path)
            f = self._candidate_family(names)
            if f is not None:
                return per_family[f]
            if names[0] == "proj" and names[1].startswith("attn_"):
                return jnp.any(per_family[names[1][len("attn_"):]])
            if names[:2] == ["net", "head"]:
                return jnp.asarray(self.head_used)
            return jnp.ones((), bool)

        return jax.tree_util.tree_map_with_path(leaf, params)


def paths_per_device(sc) -> int:
    """Architectures each device trains per supernet step: ``supernet.paths_per_device`` with
    ``sample_per='device'`` (absent in older configs: 1), else 1."""
    return int(sc.get("paths_per_device", 1) or 1) if sc.sample_per == "device" else 1


def supernet_trainer(cfg, space: SearchSpace, teacher: DenseLM, mesh) -> engine.Trainer:
    """The supernet stage's engine: a ``Student`` (supernet + KD projections) trained with
    ``D(teacher, student)`` summed over embedding / attention / block features (plus
    ``gt_weight`` x the MLM/CLM loss), the teacher's weights passed frozen to one compiled step.
    Used by the stage and by the benchmarks, so both time the same step."""
    sc = cfg.supernet
    dtype = compute_dtype(cfg)
    if teacher.cfg.dtype != dtype:  # same weights, computing in the run's precision
        teacher = with_compute_dtype(teacher, dtype)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    per_device = distill_sums_fn(t_graphdef, t_rest, sc.kd_loss)
    sums = sharded_sums(mesh, per_device)
    # training rows hold supernet.paths_per_device architectures per device (sample_per='device');
    # the teacher runs once over a device's rows, not once per architecture
    train_sums = sharded_sums(mesh, per_device, groups=paths_per_device(sc),
                              prepare=teacher_features_fn(t_graphdef, t_rest))
    gt = float(sc.gt_weight)

    def loss_fn(model, batch, rng, frozen):
        del rng
        s = train_sums(model, batch, frozen)
        return _kd_mean(s) + gt * s["loss_sum"] / jnp.maximum(s["weight_sum"], 1.0), s

    def eval_fn(model, batch, frozen):
        return sums(model, batch, frozen)

    student = Student(space, teacher.cfg.hidden, cfg.seed, dtype=dtype, remat=bool(sc.get("remat", False)))
    tc = ConfigDict(sc.train.to_dict() | {"seed": cfg.seed})
    return engine.Trainer(student, loss_fn, eval_fn, tc, mesh, frozen=t_params, ratios=KD_RATIOS,
                          sampled_path=SupernetPath(space, head_used=gt > 0))


class DenseStudent(nnx.Module):
    """An exported dense model plus its distillation projections."""

    def __init__(self, model: DenseLM, teacher_hidden: int, seed: int):
        self.model = model
        fams = sorted({b.family for b in model.cfg.blocks})
        self.proj = KDProjections(jax.random.key(seed), model.cfg.hidden, model.cfg.inner,
                                  teacher_hidden, fams)

    def projections(self) -> dict[str, dict[str, jax.Array]]:
        return self.proj.arrays()


def _attn_by_family(attn_outs: tuple[jax.Array, ...], fams: list[str]) -> dict[str, jax.Array]:
    """A dense model's per-layer attention outputs as the supernet lays them out: per family on
    its menu, ``[L, B, S, .]`` with that family's layers' outputs and zeros at the others."""
    slots = {}
    for f in FAMILY_INDEX:
        if f not in fams:
            continue
        like = next(a for a, g in zip(attn_outs, fams) if g == f)
        slots[f] = jnp.stack([a if g == f else jnp.zeros_like(like) for a, g in zip(attn_outs, fams)])
    return slots


def kd_fns(teacher_graphdef, teacher_rest, kind: str, gt_weight: float):
    """``loss_fn`` / ``eval_fn`` of dense KD retraining for the engine (teacher as ``frozen``);
    their metrics are derived with :data:`KD_RATIOS`."""

    def sums(student: DenseStudent, batch: dict, teacher_params, deterministic: bool, rng=None):
        teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
        t = teacher(batch["inputs"], batch["mask"], batch["segment_ids"])
        t = jax.tree.map(jax.lax.stop_gradient, (t.embedding, t.attn_outs, t.block_outs))
        out = student.model(batch["inputs"], batch["mask"], batch["segment_ids"],
                            deterministic=deterministic,
                            rngs=None if rng is None else nnx.Rngs(dropout=rng),
                            head_positions_BxK=head_positions(batch))
        fams = [b.family for b in student.model.cfg.blocks]
        family = jnp.asarray([FAMILY_INDEX[f] for f in fams], jnp.int32)
        active = jnp.ones(len(fams), bool)  # every layer of a dense model is active
        kd, _ = supernet_distill_loss(out.embedding, jnp.stack(out.block_outs),
                                      _attn_by_family(out.attn_outs, fams), family, active,
                                      *t, batch["mask"], student.projections(), kind)
        ce = scored_cross_entropy(out.logits, batch)
        return kd, ce

    def loss_fn(student, batch, rng, teacher_params):
        kd, ce = sums(student, batch, teacher_params, False, rng)
        loss = kd + gt_weight * ce["loss_sum"] / jnp.maximum(ce["weight_sum"], 1.0)
        return loss, ce | {"kd_total": kd, "kd_count": jnp.ones((), jnp.float32)}

    def eval_fn(student, batch, teacher_params):
        kd, ce = sums(student, batch, teacher_params, True)
        return ce | {"kd_total": kd, "kd_count": jnp.ones((), jnp.float32)}

    return loss_fn, eval_fn
