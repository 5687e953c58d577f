"""The ``evaluate`` stage: validation loss, perplexity and token accuracy of every final model and the teacher, written to ``WORKDIR/evaluate/result.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from elm_jax.distributed import is_main_process
from elm_jax.engine import sharding
from elm_jax.fileio import atomic_write_json
from elm_jax.lm import evaluate_lm
from elm_jax.models.io import final_models, flat_params, is_model_dir, load_model


def run(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Validation loss / perplexity / token accuracy of every final model and of the teacher, with
    each model's ``kind`` and (baselines) ``param_gap``, its parameters minus the found model's."""
    mesh = sharding.make_mesh(cfg.mesh)
    export_path = Path(workdir) / "export" / "result.json"
    exported = json.loads(export_path.read_text()) if export_path.is_file() else {}
    models = {name: load_model(p)[0] for name, p in final_models(workdir).items()}
    teacher_dir = Path(workdir) / "teacher" / "model"
    if is_model_dir(teacher_dir):
        models["teacher"] = load_model(teacher_dir)[0]
    result = {}
    for name, model in models.items():
        if model.cfg.head == "none":
            continue
        m = evaluate_lm(model, data.eval, mesh)
        result[name] = {"loss": m["loss"], "perplexity": m["perplexity"],
                        "accuracy": m["correct"], "params": sum(
                            v.size for v in flat_params(model).values())}
        if name == "teacher":
            result[name]["kind"] = "teacher"
        elif name in exported:
            result[name].update(kind=exported[name].get("kind"), param_gap=exported[name].get("param_gap"))
        print(f"[evaluate] {name}: loss {m['loss']:.4f} perplexity {result[name]['perplexity']:.2f} "
              f"accuracy {m['correct']:.4f} ({result[name]['params']:,} params)")
    if is_main_process():  # the CLI then writes and prints the report (elm_jax.report)
        atomic_write_json(Path(workdir) / "evaluate" / "result.json", result)
    return result
