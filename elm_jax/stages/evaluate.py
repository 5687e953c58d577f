"""The ``evaluate`` stage: every final model and the teacher on the validation split, beside the
trivial answer, written to ``WORKDIR/evaluate/result.json``.

The file (``SCHEMA_VERSION`` 2; other tools read it):

- ``schema_version``, ``task``, ``split`` (``validation``);
- ``baselines``: ``context_free_loss`` (MLM) or ``unigram_loss`` (CLM), the best context-free
  predictor on the same batches (:mod:`elm_jax.data.context_free`), and
  ``bag_of_words_test_accuracy`` (MLM: the fine-tuning task's bag-of-words logistic regression,
  ``None`` until the fine-tuning stage records one);
- ``models``: model name (the teacher is ``teacher``) -> ``kind`` (``teacher`` | ``found`` |
  ``baseline_largest`` | ``baseline_matched`` | ``random_best``, the random-search control's
  best), ``params`` (every parameter), ``embedding_params`` (its lookup tables and the head's
  per-piece bias, :func:`~elm_jax.models.dense.count_embedding_params`: ``params`` minus it is
  the non-embedding count the report shows beside the total), ``param_gap`` (baselines and ``random_best``: params minus the found model's), ``loss``, ``perplexity``, ``accuracy`` (masked / next-token accuracy),
  ``gain_nats = baseline loss - loss`` (> 0: the model beats the trivial answer), ``gain_noise``
  (its standard error paired over the evaluation rows with the trivial answer's, and the 90%
  normal interval: ``{gain, se, lo, hi, level, verdict}`` of
  :func:`~elm_jax.search.fitness_noise.loss_gain`), found models ``versus`` (baseline name -> the
  same figures of the baseline's loss minus the found model's, paired over the same rows;
  ``verdict`` ``lower`` / ``higher`` / ``within noise``: is the found model's loss lower beyond the
  noise?) and, for MLM,
  ``finetune_test_accuracy`` (the mean over fine-tuning seeds when several were run) and
  ``finetune_scratch_test_accuracy`` (found models with ``finetune.scratch``: the same
  architecture fine-tuned from random initialisation, mean over the seeds; ``None`` until recorded).

The schema and its readers (files written before it too) are :mod:`elm_jax.evaluation`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from elm_jax.data import context_free
from elm_jax.distributed import is_main_process
from elm_jax.engine import sharding
from elm_jax.evaluation import SCHEMA_VERSION, finetune_accuracy, versus_line
from elm_jax.fileio import atomic_write_json
from elm_jax.lm import lm_row_sums, with_perplexity
from elm_jax.models.dense import count_embedding_params
from elm_jax.models.io import final_models, flat_params, is_model_dir, load_model
from elm_jax.search.fitness_noise import loss_gain


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Loss, perplexity and token accuracy of every final model and of the teacher on the
    validation split, each with its gain over the context-free baseline (module docstring)."""
    mesh = sharding.make_mesh(cfg.mesh)
    wd = Path(workdir)
    exported = _load(wd / "export" / "result.json")
    finetune = _load(wd / "finetune" / "result.json")
    models = {name: load_model(p)[0] for name, p in final_models(workdir).items()}
    teacher_dir = wd / "teacher" / "model"
    if is_model_dir(teacher_dir):
        models["teacher"] = load_model(teacher_dir)[0]
    key = context_free.KEY[cfg.task]
    trivial = context_free.trivial_loss_of(data)  # computed once, by the data stage
    bow = _load(wd / "finetune" / "bag_of_words.json")
    result = {"schema_version": SCHEMA_VERSION, "task": cfg.task, "split": data.eval.split,
              "baselines": {key: trivial, "bag_of_words_test_accuracy": bow.get("test_accuracy")},
              "models": {}}
    print(f"[evaluate] trivial answer ({key.removesuffix('_loss').replace('_', '-')}): {trivial:.4f}")
    cf_rows = context_free.reference_rows(data, data.eval)
    rows: dict[str, np.ndarray] = {}
    for name, model in models.items():
        if model.cfg.head == "none":
            continue
        rows[name] = r = lm_row_sums(model, data.eval, mesh)
        loss = float(r[:, 0].sum() / r[:, 1].sum())
        e = exported.get(name, {})
        entry = {"kind": "teacher" if name == "teacher" else e.get("kind", "found"),
                 "params": sum(v.size for v in flat_params(model).values()),
                 "embedding_params": count_embedding_params(model),
                 "param_gap": e.get("param_gap"), "loss": loss, "perplexity": with_perplexity({"loss": loss})["perplexity"],
                 "accuracy": float(r[:, 2].sum() / r[:, 1].sum()), "gain_nats": trivial - loss,
                 "gain_noise": loss_gain(r, cf_rows)}
        if cfg.task == "mlm":
            ft = finetune.get(name, {}) if isinstance(finetune.get(name), Mapping) else {}
            entry["finetune_test_accuracy"] = finetune_accuracy(ft)
            entry["finetune_scratch_test_accuracy"] = ft.get("scratch_test_accuracy")
        result["models"][name] = entry
        flag = "" if entry["gain_nats"] > 0 else "  NOT BETTER THAN THE TRIVIAL ANSWER"
        print(f"[evaluate] {name}: loss {loss:.4f} (gain {entry['gain_nats']:+.4f} "
              f"+/- {entry['gain_noise']['se']:.4f} nats) perplexity {entry['perplexity']:.2f} accuracy "
              f"{entry['accuracy']:.4f} ({entry['params']:,} params){flag}")
    # each found model against every baseline, paired over the same rows
    kinds = {n: e["kind"] for n, e in result["models"].items()}
    for name in [n for n, k in kinds.items() if k == "found"]:
        versus = {b: loss_gain(rows[name], rows[b]) for b, k in kinds.items()
                  if k not in ("found", "teacher")}
        result["models"][name]["versus"] = versus
        for b, v in versus.items():
            print(f"[evaluate] {versus_line(name, b, v)}")
    if is_main_process():  # the CLI then writes and prints the report (elm_jax.report)
        atomic_write_json(wd / "evaluate" / "result.json", result)
    return result
