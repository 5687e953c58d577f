"""The ``finetune`` stage (MLM): each final model (``WORKDIR/retrain/<budget>``, or without a retrain stage
``WORKDIR/export/<budget>``) becomes a sentence(-pair) classifier: its encoder (the LM head is
dropped) with a pooled head ``W_c tanh(W_p pool(h) + b_p)`` (``finetune.pooling``: ``cls``, the
``[CLS]`` state, or ``mean``, the mean over the real tokens), fine-tuned on
``finetune.task``:

* ``polarity`` (default): Pang & Lee sentence polarity (the source sentences of SST-2), a fixed
  stratified train / validation / test split;
* ``glue/<name>``: a GLUE classification task read through tfds (:mod:`elm_jax.data.glue`).
  GLUE's test labels are hidden, so a stratified, seeded ``finetune.holdout_frac`` of GLUE train
  is held out as the *validation* (model-selection) split and GLUE's labelled validation split is
  reported as *test* (MNLI: validation_matched, with validation_mismatched reported too).

Model selection (:class:`HoldoutSelection`): during training the validation (holdout) split is
evaluated every ``eval_every`` steps of the run's train config and after the last step; the step
with the highest holdout score by the task's own metric (``metric_names[0]``: accuracy; Matthews
correlation for CoLA; ties keep the earliest step) is the *selected* model, kept in the run's
``selected/`` orbax store. That model is tested and returned (and, for the teacher, cached and
used for KD); the last step's model is tested too and reported under ``final``. With
``eval_every`` equal to the steps (the demo and test configs) the only evaluation is the last
step's, so the selected model is the final one.

Inputs are ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with segment ids 0 / 1 (used by
models that have a segment table, e.g. a Hugging Face BERT teacher; models trained here have
none and tell the segments apart by the ``[SEP]``).

With ``finetune.kd`` = ``'dist'`` (ELM's relational logit loss, DIST) or ``'soft_ce'`` (Hinton's
soft cross-entropy), the teacher (``WORKDIR/teacher/model``) is first fine-tuned on the same task
with the same head (``finetune.teacher_train``; cached in ``WORKDIR/finetune/teacher_<task>``),
then each student minimises ``CE(labels) + kd_weight * KD(student logits, teacher logits)`` at
``finetune.temperature``, the teacher's weights passed to the engine as its frozen pytree.

Output ``WORKDIR/finetune/result.json``: per final model ``validation_accuracy``,
``test_accuracy`` (of the selected model), ``steps`` (trained) (the keys the report reads), plus
``task``, ``metric_names``, ``validation_metrics`` / ``test_metrics`` (of the selected model; GLUE's
metrics: accuracy, F1 for MRPC/QQP, Matthews correlation for CoLA), ``test_split``,
``test_confusion`` (the selected model's test counts ``[true][predicted]``),
``selected_step``, ``selection`` (``metric``, ``step``, ``holdout_score``, ``eval_every``,
``holdout_evals``: every holdout evaluation as ``[step, score]``), ``final`` (``step`` and the same
validation / test keys for the last step's model), ``kd`` (the setting; its validation KD and
agreement are the selected step's); with KD an entry ``teacher`` holds the fine-tuned teacher's
results, selected the same way.

Seeds, scratch and paired comparisons: a *found* model (``kind`` ``'found'`` in
``WORKDIR/export/result.json``) is fine-tuned with ``finetune.seeds`` seeds ``seed, seed + 1, ...``
(the seed of the head's initialisation, dropout and batch order); its entry's keys above are the
first seed's, ``seeds`` holds every seed's ``test_accuracy`` / ``validation_accuracy`` and their
mean and sd. With ``finetune.scratch`` the same architecture is also fine-tuned from random
initialisation (:func:`~elm_jax.models.dense.init_dense`, the same seeds): ``scratch`` (the same
summary) and ``scratch_test_accuracy`` (its mean). ``comparisons`` holds paired bootstrap
intervals (:mod:`elm_jax.paired_bootstrap`, over the first test split's examples and the runs):
``minus_bag_of_words`` (every model: its runs against the bag-of-words floor) and
``pretrained_minus_scratch`` (does pre-training, i.e. the whole search pipeline, help this
architecture?), each ``{diff, lo, hi, level, verdict, ...}``. Baselines are fine-tuned with the
first seed only. ``WORKDIR/finetune/bag_of_words.json`` holds the floor: the
bag-of-words logistic regression of :mod:`elm_jax.bag_of_words` on the same splits and pieces
(written first, reused on a rerun). Training runs (metrics, checkpoints):
``WORKDIR/finetune/<model>_<task>[_<kd>]_run`` (further seeds ``..._s<seed>_run``; from scratch
``<model>_scratch_<task>[_<kd>]_s<seed>_run``) and ``WORKDIR/finetune/teacher_<task>_run``.

The classifier is :mod:`elm_jax.models.classifier`, its data :mod:`elm_jax.data.tasks`; the
``evaluate`` stage (language-model metrics of the same models) is :mod:`elm_jax.stages.evaluate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from elm_jax import bag_of_words, engine
from elm_jax.data import glue
from elm_jax.data.tasks import SentenceBatches, TaskData, load_task
from elm_jax.distill import dist_logit_loss, soft_cross_entropy
from elm_jax.distributed import is_main_process
from elm_jax.evaluation import comparison_lines
from elm_jax.engine import sharding
from elm_jax.engine.checkpoint import Checkpointer
from elm_jax.engine.losses import LM_RATIOS, weighted_cross_entropy
from elm_jax.fields import get as get_field
from elm_jax.fileio import atomic_write_json
from elm_jax.models.classifier import Classifier, encoder_of, load_classifier, save_classifier
from elm_jax.models.dense import init_dense
from elm_jax.models.io import final_models, load_model
from elm_jax.paired_bootstrap import paired_difference

KD_KINDS = ("none", "dist", "soft_ce")
KD_LOSSES: dict[str, Callable[..., jax.Array]] = {"dist": dist_logit_loss, "soft_ce": soft_cross_entropy}


# ---------------------------------------------------------------------------------------------
# Model


# ---------------------------------------------------------------------------------------------
# Data


# ---------------------------------------------------------------------------------------------
# Losses and metrics


def _logits(model: Classifier, batch, rng=None):
    if rng is None:
        return model(batch["inputs"], batch["mask"], batch["segment_ids"])
    return model(batch["inputs"], batch["mask"], batch["segment_ids"], deterministic=False,
                 rngs=nnx.Rngs(dropout=rng))


def _sums(logits, batch, num_classes: int, confusion: bool) -> dict[str, jax.Array]:
    """Cross-entropy / accuracy sums and, with ``confusion``, the weighted confusion counts
    ``confusion_<true>_<pred>`` (raw counts: not in :func:`metric_ratios`, so the engine reports
    them undivided)."""
    s = weighted_cross_entropy(logits, batch["labels"], batch["weights"])
    if not confusion:
        return s
    w = batch["weights"].astype(jnp.float32)
    truth = jax.nn.one_hot(batch["labels"], num_classes) * w[:, None]
    pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
    cm = truth.T @ pred
    return s | {f"confusion_{t}_{p}": cm[t, p] for t in range(num_classes) for p in range(num_classes)}


def confusion_of(metrics: Mapping[str, float], num_classes: int) -> np.ndarray:
    """The confusion matrix ``[true, predicted]`` from the summed eval counts."""
    return np.array([[metrics[f"confusion_{t}_{p}"] for p in range(num_classes)]
                     for t in range(num_classes)])


def metric_ratios(kd: str = "none") -> dict[str, tuple[str, str]]:
    """The derived metrics of :func:`make_loss_fns`'s sums for the engine: ``loss`` (mean
    cross-entropy) and ``correct`` (accuracy) over the weighted rows; with KD also ``agree``
    (the fraction of rows where student and teacher predict the same class). ``kd_total`` /
    ``kd_count`` and the confusion counts stay raw sums."""
    ratios = dict(LM_RATIOS)
    if kd != "none":
        ratios["agree"] = ("agree_sum", "weight_sum")
    return ratios


def kd_term(kind: str, student_logits, teacher_logits, weights, temperature: float) -> jax.Array:
    """``KD(student, teacher)`` over the batch's rows of nonzero weight: DIST or soft CE."""
    return KD_LOSSES[kind](student_logits, teacher_logits, temperature, weights)


def make_loss_fns(num_classes: int, kd: str = "none", kd_weight: float = 0.0, temperature: float = 1.0,
                  teacher: Classifier | None = None) -> tuple[Callable, Callable, Any]:
    """``(loss_fn, eval_fn, frozen)`` for :class:`elm_jax.engine.Trainer` (with
    ``ratios=metric_ratios(kd)``).

    ``loss = CE(labels) + kd_weight * KD(student logits, teacher logits)`` (student dropout on,
    teacher deterministic and outside the gradient). With KD the teacher's parameters are
    ``frozen`` (the engine passes them to both functions; they are never trained or
    checkpointed with the student) and the metrics gain ``kd_total`` / ``kd_count`` (KD per
    batch, summed) and ``agree_sum`` (rows where student and teacher predict the same class).
    """
    if kd not in KD_KINDS:
        raise ValueError(f"finetune.kd must be one of {KD_KINDS}, got {kd!r}")
    if kd == "none":
        def loss_fn(model, batch, rng):
            s = _sums(_logits(model, batch, rng), batch, num_classes, confusion=False)
            return s["loss_sum"] / jnp.maximum(s["weight_sum"], 1.0), s

        def eval_fn(model, batch):
            return _sums(_logits(model, batch), batch, num_classes, confusion=True)

        return loss_fn, eval_fn, None
    if teacher is None:
        raise ValueError(f"finetune.kd={kd!r} needs a fine-tuned teacher")
    t_graphdef, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)

    def with_teacher(logits, batch, frozen, confusion):
        t_logits = jax.lax.stop_gradient(_logits(nnx.merge(t_graphdef, frozen, t_rest), batch))
        s = _sums(logits, batch, num_classes, confusion)
        k = kd_term(kd, logits, t_logits, batch["weights"], temperature)
        agree = jnp.sum((jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)) * batch["weights"])
        return s | {"kd_total": k, "kd_count": jnp.ones((), jnp.float32), "agree_sum": agree}

    def kd_loss_fn(model, batch, rng, frozen):
        s = with_teacher(_logits(model, batch, rng), batch, frozen, confusion=False)
        return s["loss_sum"] / jnp.maximum(s["weight_sum"], 1.0) + kd_weight * s["kd_total"], s

    def kd_eval_fn(model, batch, frozen):
        return with_teacher(_logits(model, batch), batch, frozen, confusion=True)

    return kd_loss_fn, kd_eval_fn, t_params


# ---------------------------------------------------------------------------------------------
# The stage


def _compute_dtype(cfg) -> Any:
    from elm_jax.precision import compute_dtype

    return compute_dtype(cfg)


BAG_OF_WORDS_FILE = "bag_of_words.json"  # in WORKDIR/finetune/: elm_jax.bag_of_words on the task
SELECTION_DIR = "selected"  # in the training run's directory: the selected model (orbax)


class HoldoutSelection:
    """Model selection on the holdout split, as :class:`elm_jax.engine.Hooks` of the fine-tuning run.

    After every ``eval_every``-th step and after the last one it evaluates the holdout split
    (logged as ``eval/*`` in the run's ``metrics.jsonl``) and scores it by ``metric`` (the task's
    own metric from the confusion counts: accuracy; Matthews correlation for CoLA). A score
    strictly above the best so far (ties keep the earlier step) makes this step the selected one:
    its ``params`` / ``other`` are saved synchronously, with content checksums, as step ``s`` of the
    orbax store ``<run>/selected`` before the run's own checkpoint of that step can start. The
    history, the selected step and the final holdout metrics travel in every run checkpoint
    (:meth:`meta`), so a resumed run continues the same selection; on resume, stored steps after
    the restored checkpoint (an abandoned attempt's) are deleted, and steps no kept run
    checkpoint refers to are pruned (at most ``keep_checkpoints + 2`` models on disk).
    """

    def __init__(self, trainer: engine.Trainer, holdout, run_dir: Path, num_classes: int, metric: str):
        tc = trainer.tc
        self.trainer, self.holdout, self.num_classes, self.metric = trainer, holdout, num_classes, metric
        self.eval_every = int(get_field(tc, "eval_every", 0) or 0)
        keep = int(get_field(tc, "keep_checkpoints", 3))
        self.window = keep + 1 if keep > 0 else None  # run checkpoints on disk, plus one in flight
        self.store = Checkpointer(Path(run_dir) / SELECTION_DIR, keep=0, save_every=1, async_save=False)
        self.done = 0
        self.history: list[list] = []  # [step, score] of every holdout evaluation
        self.best: dict[str, Any] | None = None  # {"step", "score", "metrics"}
        self.final: dict[str, Any] | None = None  # {"step", "metrics"}: the holdout at the last step
        self.refs: list[int] = []  # the selected step at each of the latest run checkpoints
        self._synced = False

    def _abstract(self) -> dict[str, Any]:
        a = self.trainer.abstract_state
        return {"params": a.params, "other": a.other}

    def score(self, metrics: Mapping[str, float]) -> float:
        return glue.classification_metrics(confusion_of(metrics, self.num_classes), (self.metric,))[self.metric]

    def _prune(self, keep_from: int | None = None) -> None:
        """Deletes stored steps after ``keep_from`` (an abandoned attempt's) and steps that
        neither the selection nor a kept run checkpoint refers to."""
        wanted = {self.best["step"]} if self.best else set()
        wanted |= set(self.refs)
        for s in self.store.all_steps():
            stale = keep_from is not None and s > keep_from
            if stale or (self.window is not None and s <= self.done and s not in wanted):
                self.store.delete(s)

    def observe(self, done: int, state: engine.TrainState, writer: Any = None) -> None:
        """Evaluates the holdout at step ``done`` and keeps ``state`` when it is the best so far."""
        metrics = engine.evaluate(self.trainer, state, self.holdout)
        if writer is not None:
            writer.write_scalars(done, {f"eval/{k}": v for k, v in metrics.items()})
        score = self.score(metrics)
        self.history.append([done, score])
        if self.best is None or score > self.best["score"]:
            if done in self.store.all_steps():  # left by an attempt this run does not continue
                self.store.delete(done)
            self.store.save(done, {"params": state.params, "other": state.other},
                            {"score": score}, force=True)
            self.best = {"step": done, "score": score, "metrics": metrics}
            self._prune()
        if done == self.trainer.total_steps:
            self.final = {"step": done, "metrics": metrics}

    # -- engine.Hooks -----------------------------------------------------------------------
    def after_step(self, done: int, state: engine.TrainState, local_batch, writer) -> None:
        if not self._synced:  # a fresh start: whatever is stored belongs to no checkpoint
            self._synced = True
            self._prune(keep_from=0)
        self.done = done
        if (self.eval_every and done % self.eval_every == 0) or done == self.trainer.total_steps:
            self.observe(done, state, writer)

    def meta(self) -> dict[str, Any]:
        if self.best is not None:
            self.refs = (self.refs + [self.best["step"]])[-self.window:] if self.window else []
        return {"done": self.done, "history": self.history, "best": self.best, "final": self.final,
                "refs": self.refs, "metric": self.metric}

    def on_restore(self, meta: Mapping[str, Any]) -> None:
        self._synced = True
        self.done = int(meta.get("done", 0))
        self.history = [list(h) for h in meta.get("history", [])]
        self.best, self.final = meta.get("best"), meta.get("final")
        self.refs = [int(r) for r in meta.get("refs", [])]
        if meta and meta.get("metric") != self.metric:
            raise ValueError(f"{self.store.directory}: this run selected by {meta.get('metric')!r}, "
                             f"not {self.metric!r}; delete its directory to fine-tune again")
        self._prune(keep_from=self.done)

    # -- the selected model ------------------------------------------------------------------
    def selected_state(self, final_state: engine.TrainState) -> engine.TrainState:
        """``final_state`` with the selected step's ``params`` / ``other``, restored (verified)
        from the store."""
        tree, _ = self.store.restore(self.best["step"], self._abstract())
        return final_state.replace(params=tree["params"], other=tree["other"])

    def close(self) -> None:
        self.store.close()


def _summary_of(data: TaskData, holdout: Mapping[str, float], tests: Mapping[str, Mapping[str, float]]
                ) -> dict[str, Any]:
    metrics = {s: glue.classification_metrics(confusion_of(m, data.num_classes), data.metric_names)
               for s, m in tests.items()}
    first = next(iter(tests))
    out = {"validation_accuracy": holdout["correct"], "test_accuracy": tests[first]["correct"],
           "validation_metrics": glue.classification_metrics(confusion_of(holdout, data.num_classes),
                                                             data.metric_names),
           "test_metrics": metrics[first],
           "test_confusion": np.rint(confusion_of(tests[first], data.num_classes)).astype(int).tolist()}
    if len(metrics) > 1:
        out["other_test_metrics"] = {s: m for s, m in metrics.items() if s != first}
    return out


def fine_tune(model: Classifier, data: TaskData, tc: ConfigDict, batch_size: int, mesh, workdir: Path,
              name: str, seed: int, *, kd: str = "none", kd_weight: float = 0.0, temperature: float = 1.0,
              teacher: Classifier | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Trains ``model`` on ``data.train`` (resumable run ``workdir/name``), selects the step whose
    holdout score (``data.validation``; the task's own metric, ``data.metric_names[0]``) is
    highest among the evaluations every ``tc.eval_every`` steps and at the end (ties: the earliest),
    and tests that model (:class:`HoldoutSelection`).

    Returns the selected classifier and its result entry: ``validation_*`` / ``test_*`` of the
    selected model, ``selected_step``, ``selection`` (metric, holdout score at the selected step,
    every holdout evaluation as ``[step, score]``), ``final`` (the same scores of the last step's
    model) and ``steps`` (steps trained)."""
    loss_fn, eval_fn, frozen = make_loss_fns(data.num_classes, kd, kd_weight, temperature, teacher)
    trainer = engine.Trainer(model, loss_fn, eval_fn, ConfigDict(tc.to_dict() | {"seed": seed}), mesh,
                             frozen=frozen, ratios=metric_ratios(kd))
    metric = data.metric_names[0]
    selection = HoldoutSelection(trainer, SentenceBatches(data.validation, batch_size, 0),
                                 Path(workdir) / name, data.num_classes, metric)
    try:
        # The holdout is evaluated by the hooks only (eval_source None: not twice per interval).
        state, summary = engine.fit(trainer, SentenceBatches(data.train, batch_size, seed), None, workdir,
                                    name=name, meta={"task": data.task, "kd": kd}, hooks=selection)
        final_step = summary["final_step"]
        if selection.final is None or selection.final["step"] != final_step:
            selection.observe(final_step, state)  # a run checkpointed before the selection existed
        best = selection.best
        chosen = selection.selected_state(state)
    finally:
        selection.close()

    def tests_of(s):
        return {k: engine.evaluate(trainer, s, SentenceBatches(d, batch_size, 0)) for k, d in data.tests.items()}

    selected = _summary_of(data, best["metrics"], tests_of(chosen))
    final = selected if best["step"] == final_step else _summary_of(
        data, selection.final["metrics"], tests_of(state))
    val = best["metrics"]
    first = next(iter(data.tests))
    entry = {
        "task": data.task, "metric_names": list(data.metric_names), **selected, "test_split": first,
        "steps": final_step, "selected_step": best["step"],
        "selection": {"split": "validation", "metric": metric, "eval_every": selection.eval_every,
                      "step": best["step"], "holdout_score": best["score"],
                      "holdout_evals": selection.history},
        "final": {"step": final_step, **final},
        "kd": {"kind": kd} if kd == "none" else {"kind": kd, "weight": kd_weight, "temperature": temperature,
                                                 "validation_kd": val["kd_total"] / val["kd_count"],
                                                 "validation_agreement": val["agree"]},
    }
    return trainer.model_from_state(chosen), entry


def _describe(entry: Mapping[str, Any]) -> str:
    parts = [f"{k} {v:.4f}" for k, v in entry["test_metrics"].items()]
    sel = entry.get("selection", {})
    chosen = (f" (selected step {entry['selected_step']} of {entry['steps']} by holdout {sel.get('metric')})"
              if "selected_step" in entry else "")
    return (f"{entry['task']} validation accuracy {entry['validation_accuracy']:.4f}, "
            f"test ({entry['test_split']}) {', '.join(parts)}{chosen}")


@nnx.jit
def _predict(model: Classifier, inputs, mask, segment_ids) -> jax.Array:
    return jnp.argmax(model(inputs, mask, segment_ids), -1)


def example_correct(model: Classifier, split: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    """``int8 [N]``: 1 where ``model`` classifies the example correctly, else 0, for every example of
    ``split`` in its order (the evaluation batches of :class:`SentenceBatches`, padding dropped);
    its mean is the split's accuracy. What :mod:`elm_jax.paired_bootstrap` pairs."""
    preds = [np.asarray(_predict(model, b["inputs"], b["mask"], b["segment_ids"]))
             for b in SentenceBatches(dict(split), batch_size, 0).batches()]
    labels = np.asarray(split["labels"])
    return (np.concatenate(preds)[:len(labels)] == labels).astype(np.int8)


def model_kinds(workdir: str | os.PathLike) -> dict[str, str]:
    """Final model -> its kind (``'found'`` or a baseline kind), from ``WORKDIR/export/result.json``
    (a model it does not list counts as found)."""
    p = Path(workdir) / "export" / "result.json"
    entries = json.loads(p.read_text()) if p.is_file() else {}
    return {k: str(v.get("kind", "found")) for k, v in entries.items() if isinstance(v, Mapping)}


def _runs_summary(seeds: list[int], entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    acc = [float(e["test_accuracy"]) for e in entries]
    return {"seeds": seeds, "test_accuracy": acc,
            "validation_accuracy": [float(e["validation_accuracy"]) for e in entries],
            "mean_test_accuracy": float(np.mean(acc)),
            "sd_test_accuracy": float(np.std(acc, ddof=1)) if len(acc) > 1 else None}


def fine_tuned_teacher(cfg, workdir: str | os.PathLike, data: TaskData, mesh) -> tuple[Classifier, dict]:
    """The teacher fine-tuned on the task with the students' head, from its cache
    ``WORKDIR/finetune/teacher_<task>`` or trained now (``finetune.teacher_train``; the training
    run in ``WORKDIR/finetune/teacher_<task>_run``) and cached: the step :func:`fine_tune` selected
    on the holdout, the model the students are distilled from."""
    from elm_jax.lm import load_teacher

    fc = cfg.finetune
    cache = Path(workdir) / "finetune" / f"teacher_{glue.task_slug(fc.task)}"
    done = cache / "result.json"
    settings = {"seed": cfg.seed, "seq_len": cfg.data.seq_len, "batch_size": fc.batch_size,
                "holdout_frac": fc.holdout_frac, "train": fc.teacher_train.to_dict()}
    if fc.pooling != "cls":  # (a cache written before pooling was a setting is the cls one)
        settings["pooling"] = fc.pooling
    if done.is_file():
        entry = json.loads(done.read_text())
        if entry.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(f"the teacher in {cache} was fine-tuned with other settings "
                             f"({entry.get('settings')}); delete that directory to fine-tune it again")
        print(f"[finetune] teacher fine-tuned on {fc.task} already: {cache}")
        return load_classifier(cache, data.num_classes, _compute_dtype(cfg), fc.pooling), entry
    encoder = encoder_of(load_teacher(workdir), _compute_dtype(cfg))
    model, entry = fine_tune(Classifier(encoder, data.num_classes, cfg.seed, fc.pooling), data, fc.teacher_train,
                             fc.batch_size, mesh, cache.parent, f"{cache.name}_run", cfg.seed)
    entry |= {"path": os.fspath(cache), "settings": settings}
    if is_main_process():
        save_classifier(cache, model, {"role": "fine-tuned teacher", "task": fc.task})
        atomic_write_json(done, entry)
    print(f"[finetune] teacher: {_describe(entry)}")
    return model, entry


def run(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Fine-tunes each final MLM model on ``finetune.task`` (with KD from the fine-tuned teacher
    when ``finetune.kd`` is set) and writes ``WORKDIR/finetune/result.json``."""
    root = Path(workdir) / "finetune"
    done = root / "result.json"
    if done.is_file():
        print(f"[finetune] complete already: {root}")
        return json.loads(done.read_text())
    if cfg.task != "mlm":
        raise ValueError("finetune needs an MLM encoder; use --stages=evaluate for CLM")
    fc = cfg.finetune
    task = load_task(cfg, data.tokenizer)
    mesh = sharding.make_mesh(cfg.mesh)
    models = final_models(workdir)
    if "teacher" in models:
        raise ValueError("a final model is named 'teacher', a name the finetune result reserves; "
                         "rename that budget")
    result: dict[str, Any] = {}
    teacher = None
    if fc.kd != "none":
        teacher, result["teacher"] = fine_tuned_teacher(cfg, workdir, task, mesh)
    # the floor every fine-tuned model stands beside (DESIGN 8), on the same splits and pieces
    bow_path = root / BAG_OF_WORDS_FILE
    bow = json.loads(bow_path.read_text()) if bow_path.is_file() else {}
    if "test_correct" not in bow:  # none yet, or written before per-example scores were kept
        bow = bag_of_words.fit_and_score(task, data.tokenizer.vocab_size, data.tokenizer.special.all(), cfg.seed)
        if is_main_process():
            atomic_write_json(bow_path, bow)
    print(f"[finetune] bag-of-words logistic regression (C={bow['C']}): test accuracy "
          f"{bow['test_accuracy']:.4f}")
    dtype = _compute_dtype(cfg)
    run_tag = glue.task_slug(fc.task) + ("" if fc.kd == "none" else f"_{fc.kd}")
    kinds = model_kinds(workdir)
    first_test = next(iter(task.tests))
    # per-example scores need the classifier on this host; several processes skip the comparisons
    paired = jax.process_count() == 1
    floor = np.asarray(bow["test_correct"], np.float64)[None]

    def tune(init: Callable[[int], Any], seed: int, run_name: str) -> tuple[dict[str, Any], np.ndarray | None]:
        model = Classifier(encoder_of(init(seed), dtype), task.num_classes, seed, fc.pooling)
        clf, entry = fine_tune(model, task, fc.train, fc.batch_size, mesh, root, run_name, seed, kd=fc.kd,
                               kd_weight=float(fc.kd_weight), temperature=float(fc.temperature),
                               teacher=teacher)
        return entry, (example_correct(clf, task.tests[first_test], fc.batch_size) if paired else None)

    for name, path in models.items():
        encoder, _ = load_model(path)
        if teacher is not None and encoder.cfg.vocab_size != teacher.encoder.cfg.vocab_size:
            raise ValueError(f"{name}: vocabulary {encoder.cfg.vocab_size} != the teacher's "
                             f"{teacher.encoder.cfg.vocab_size}; KD needs the same tokenizer")
        found = kinds.get(name, "found") == "found"
        seeds = [int(cfg.seed) + k for k in range(int(fc.seeds) if found else 1)]
        runs = [tune(lambda s: encoder, s, f"{name}_{run_tag}_run" if s == cfg.seed else
                     f"{name}_{run_tag}_s{s}_run") for s in seeds]
        entry = dict(runs[0][0])  # the first seed's run, as with one seed
        comparisons: dict[str, Any] = {}
        if len(seeds) > 1:
            entry["seeds"] = _runs_summary(seeds, [e for e, _ in runs])
        if paired:
            mine = np.stack([c for _, c in runs]).astype(np.float64)
            comparisons["minus_bag_of_words"] = paired_difference(mine, floor, seed=int(cfg.seed))
        if found and fc.scratch:  # the same architecture from random initialisation, same seeds
            scratch = [tune(lambda s: init_dense(encoder.cfg, s), s, f"{name}_scratch_{run_tag}_s{s}_run")
                       for s in seeds]
            entry["scratch"] = _runs_summary(seeds, [e for e, _ in scratch])
            entry["scratch_test_accuracy"] = entry["scratch"]["mean_test_accuracy"]
            if paired:
                comparisons["pretrained_minus_scratch"] = paired_difference(
                    mine, np.stack([c for _, c in scratch]).astype(np.float64), seed=int(cfg.seed))
        if comparisons:
            entry["comparisons"] = comparisons
        result[name] = entry
        print(f"[finetune] {name}: {_describe(entry)}")
        for line in comparison_lines(entry):
            print(f"[finetune] {name}: {line}")
    if is_main_process():
        atomic_write_json(done, result)
    return result


