"""The retrain stage: KD re-training of each exported model from its inherited weights.

The student is the exported dense model plus fresh distillation projections; the teacher (frozen,
from the teacher stage) guides it with the same objective as the supernet (DESIGN §1.4),
:func:`elm_jax.distill.supernet_distill_loss` of the dense model's stacked per-layer features
(each layer's attention output in its family's slot, every layer active)::

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

from flax import nnx
from ml_collections import ConfigDict

from elm_jax.data import context_free
from elm_jax import engine
from elm_jax.distributed import is_main_process
from elm_jax.engine import sharding
from elm_jax.fileio import atomic_write_json
from elm_jax.lm import evaluate_lm, load_teacher, with_perplexity
from elm_jax.models.io import CONFIG_FILE, PARAMS_FILE, load_model, save_model
from elm_jax.students import KD_RATIOS, DenseStudent, kd_fns


def run(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
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
        model, _ = load_model(src)
        before = evaluate_lm(model, data.eval, mesh)
        student = DenseStudent(model, teacher.cfg.hidden, cfg.seed)
        tc = ConfigDict(rc.train.to_dict() | {"seed": cfg.seed})
        trainer = engine.Trainer(student, loss_fn, eval_fn, tc, mesh, frozen=t_params,
                                    ratios=KD_RATIOS)
        state, summary = engine.fit(trainer, data.train, data.eval, root, name=f"{name}_run",
                                    meta={"budget": name}, trivial_loss=context_free.trivial_loss_of(data))
        trained = trainer.model_from_state(state).model
        after = with_perplexity(summary["eval"])
        out = root / name
        if is_main_process():
            def extra(tmp: Path, src: Path = src) -> None:  # arch.json, tokenizer
                for f in src.iterdir():
                    if f.is_file() and f.name not in (CONFIG_FILE, PARAMS_FILE):
                        shutil.copyfile(f, tmp / f.name)

            save_model(out, trained, meta={"role": "retrained", "budget": name}, extra=extra)
        result[name] = {"path": os.fspath(out), "before": before, "after": after,
                        "steps": summary["final_step"]}
        print(f"[retrain] {name}: validation loss {before.get('loss', float('nan')):.4f} -> "
              f"{after.get('loss', float('nan')):.4f}")
    if is_main_process():
        atomic_write_json(done_path, result)
    return result
