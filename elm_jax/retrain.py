"""The retrain stage: KD re-training of each exported model from its inherited weights.

The student is the exported dense model plus fresh distillation projections; the teacher (frozen,
from the teacher stage) guides it with the same objective as the supernet (DESIGN §1.4), which
:func:`elm_jax.distill.supernet_distill_loss` computes once the dense model's per-layer features
are laid out like the supernet's (each layer's attention output in its family's slot)::

    L = D(E_T, P E_S) + sum_l [ D(A_T^{m(l)}, P_fam(l) A_S^l) + D(H_T^{m(l)}, P H_S^l) ]
        + gt_weight * CE

Output: ``WORKDIR/retrain/<budget>/`` (a model directory with the exported model's arch.json and
tokenizer) and ``WORKDIR/retrain/result.json`` with validation loss (and perplexity for CLM)
before and after retraining.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from elm_jax import export, sharding
from elm_jax import train as train_lib
from elm_jax.arch import FAMILY_INDEX, ArchArrays
from elm_jax.distill import init_projections, supernet_distill_loss
from elm_jax.fileio import atomic_write_json
from elm_jax.losses import weighted_cross_entropy
from elm_jax.models.dense import DenseLM, ModelOutput
from elm_jax.teacher import evaluate_lm, load_teacher, with_perplexity


class DenseStudent(nnx.Module):
    """An exported dense model plus its distillation projections."""

    def __init__(self, model: DenseLM, teacher_hidden: int, seed: int):
        self.model = model
        fams = sorted({b.family for b in model.cfg.blocks})
        proj = init_projections(jax.random.key(seed), model.cfg.hidden, model.cfg.inner,
                                teacher_hidden, fams)
        self.proj = nnx.Dict({name: nnx.Dict({k: nnx.Param(v) for k, v in d.items()})
                              for name, d in proj.items()})

    def projections(self) -> dict:
        return {name: {k: v[...] for k, v in d.items()} for name, d in self.proj.items()}


def supernet_layout(out: ModelOutput, model: DenseLM):
    """The dense output as stacked supernet features (``[L, B, S, .]`` per family slot) and the
    all-active :class:`ArchArrays` of the model, for :func:`supernet_distill_loss`."""
    from elm_jax.models.elastic import LayerFeatures

    fams = [b.family for b in model.cfg.blocks]
    slots = {}
    for f in ("bert", "mobilebert"):
        if f not in fams:
            slots[f] = None
            continue
        like = next(a for a, g in zip(out.attn_outs, fams) if g == f)
        slots[f] = jnp.stack([a if g == f else jnp.zeros_like(like) for a, g in zip(out.attn_outs, fams)])
    feats = LayerFeatures(block=jnp.stack(out.block_outs), attn_bert=slots["bert"],
                          attn_mobilebert=slots["mobilebert"])
    n = len(fams)
    arch = ArchArrays(family=jnp.asarray([FAMILY_INDEX[f] for f in fams], jnp.int32),
                      candidate=jnp.zeros(n, jnp.int32),
                      width=jnp.asarray([b.ffn for b in model.cfg.blocks], jnp.int32),
                      heads=jnp.asarray([b.heads for b in model.cfg.blocks], jnp.int32),
                      active=jnp.ones(n, bool))

    class _Out:  # the two fields supernet_distill_loss reads
        embedding = out.embedding
        layers = feats

    return _Out, arch


def kd_fns(teacher_graphdef, teacher_rest, kind: str, gt_weight: float):
    """``loss_fn`` / ``eval_fn`` of dense KD retraining for the engine (teacher as ``frozen``)."""

    def sums(student: DenseStudent, batch: dict, teacher_params, deterministic: bool, rng=None):
        teacher = nnx.merge(teacher_graphdef, teacher_params, teacher_rest)
        t = teacher(batch["inputs"], batch["mask"], batch["segment_ids"])
        t = jax.tree.map(jax.lax.stop_gradient, (t.embedding, t.attn_outs, t.block_outs))
        out = student.model(batch["inputs"], batch["mask"], batch["segment_ids"],
                            deterministic=deterministic,
                            rngs=None if rng is None else nnx.Rngs(dropout=rng))
        s_out, arch = supernet_layout(out, student.model)
        kd, _ = supernet_distill_loss(s_out, *t, arch, batch["mask"], student.projections(), kind)
        ce = weighted_cross_entropy(out.logits, batch["targets"], batch["weights"])
        return kd, ce

    def loss_fn(student, batch, rng, teacher_params):
        kd, ce = sums(student, batch, teacher_params, False, rng)
        loss = kd + gt_weight * ce["loss_sum"] / jnp.maximum(ce["weight_sum"], 1.0)
        return loss, ce | {"kd_total": kd, "kd_count": jnp.ones((), jnp.float32)}

    def eval_fn(student, batch, teacher_params):
        kd, ce = sums(student, batch, teacher_params, True)
        return ce | {"kd_total": kd, "kd_count": jnp.ones((), jnp.float32)}

    return loss_fn, eval_fn


def run_retrain_stage(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """KD-retrains every exported model (resumable: the engine checkpoints each one)."""
    root = Path(workdir) / "retrain"
    done_path = root / "result.json"
    if done_path.is_file():
        print(f"[retrain] complete already: {root}")
        return json.loads(done_path.read_text())
    exported = json.loads((Path(workdir) / "export" / "result.json").read_text())
    teacher = load_teacher(workdir)
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
    mesh = sharding.make_mesh(cfg.mesh)
    rc = cfg.retrain
    loss_fn, eval_fn = kd_fns(t_graphdef, t_rest, rc.kd_loss, float(rc.gt_weight))
    result = {}
    for name, entry in exported.items():
        src = Path(entry["path"])
        model, _ = export.load_model(src)
        before = evaluate_lm(model, data.eval, mesh)
        student = DenseStudent(model, teacher.cfg.hidden, cfg.seed)
        tc = ConfigDict(rc.train.to_dict() | {"seed": cfg.seed})
        trainer = train_lib.Trainer(student, loss_fn, eval_fn, tc, mesh, frozen=t_params)
        state, summary = train_lib.fit(trainer, data.train, data.eval, root, name=f"{name}_run",
                                       meta={"budget": name})
        trained = trainer.model_from_state(state).model
        after = with_perplexity(summary["eval"])
        out = root / name
        if jax.process_index() == 0:
            def extra(tmp: Path, src: Path = src) -> None:  # arch.json, tokenizer
                for f in src.iterdir():
                    if f.is_file() and f.name not in (export.CONFIG_FILE, export.PARAMS_FILE):
                        shutil.copyfile(f, tmp / f.name)

            export.save_model(out, trained, meta={"role": "retrained", "budget": name}, extra=extra)
        result[name] = {"path": os.fspath(out), "before": before, "after": after,
                        "steps": summary["final_step"]}
        print(f"[retrain] {name}: validation loss {before.get('loss', float('nan')):.4f} -> "
              f"{after.get('loss', float('nan')):.4f}")
    if jax.process_index() == 0:
        atomic_write_json(done_path, result)
    return result
