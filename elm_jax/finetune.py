"""The finetune / evaluate stages.

``finetune`` (MLM): each final model (``WORKDIR/retrain/<budget>``, or without a retrain stage
``WORKDIR/export/<budget>``) becomes a sentence(-pair) classifier: its encoder (the LM head is
dropped) with a pooled ``[CLS]`` head ``W_c tanh(W_p h_CLS + b_p)``, fine-tuned on
``finetune.task``:

* ``polarity`` (default): Pang & Lee sentence polarity (the source sentences of SST-2), a fixed
  stratified train / validation / test split;
* ``glue/<name>``: a GLUE classification task read through tfds (:mod:`elm_jax.data.glue`).
  GLUE's test labels are hidden, so a stratified, seeded ``finetune.holdout_frac`` of GLUE train
  is held out as the *validation* (model-selection) split and GLUE's labelled validation split is
  reported as *test* (MNLI: validation_matched, with validation_mismatched reported too).

Inputs are ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with segment ids 0 / 1 (used by
models that have a segment table, e.g. a Hugging Face BERT teacher; models trained here have
none and tell the segments apart by the ``[SEP]``).

With ``finetune.kd`` = ``'dist'`` (ELM's relational logit loss, DIST) or ``'soft_ce'`` (Hinton's
soft cross-entropy), the teacher (``WORKDIR/teacher/model``) is first fine-tuned on the same task
with the same head (``finetune.teacher_train``; cached in ``WORKDIR/finetune/teacher_<task>``),
then each student minimises ``CE(labels) + kd_weight * KD(student logits, teacher logits)`` at
``finetune.temperature``, the teacher's weights passed to the engine as its frozen pytree.

Output ``WORKDIR/finetune/result.json``: per final model ``validation_accuracy``,
``test_accuracy``, ``steps`` (the keys the report reads), plus ``task``, ``metric_names``,
``validation_metrics`` / ``test_metrics`` (GLUE's metrics: accuracy, F1 for MRPC/QQP, Matthews
correlation for CoLA), ``test_split``, ``kd`` (the setting); with KD an entry ``teacher`` holds
the fine-tuned teacher's results. Training runs (metrics, checkpoints):
``WORKDIR/finetune/<model>_<task>[_<kd>]_run`` and ``WORKDIR/finetune/teacher_<task>_run``.

``evaluate``: validation loss (and perplexity for CLM) of every final model on the corpus.
"""

from __future__ import annotations

import dataclasses
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
from safetensors.numpy import load_file, save_file

from elm_jax import export, sharding
from elm_jax import train as train_lib
from elm_jax.data import glue
from elm_jax.data.corpus import load_polarity
from elm_jax.data.glue import TaskSplit
from elm_jax.data.prepare import cache_dir_of
from elm_jax.data.tokenizer import Tokenizer
from elm_jax.distill import dist_logit_loss, soft_cross_entropy
from elm_jax.fileio import atomic_write_json
from elm_jax.losses import weighted_cross_entropy
from elm_jax.models import layers
from elm_jax.models.dense import DenseLM
from elm_jax.teacher import evaluate_lm

KD_KINDS = ("none", "dist", "soft_ce")
KD_LOSSES: dict[str, Callable[..., jax.Array]] = {"dist": dist_logit_loss, "soft_ce": soft_cross_entropy}


# ---------------------------------------------------------------------------------------------
# Model


def encoder_of(model: DenseLM, dtype: Any = None) -> DenseLM:
    """The same encoder without its LM head (a classifier never needs the vocabulary
    projection), computing in ``dtype`` (default: the model's own)."""
    cfg = dataclasses.replace(model.cfg, head="none", dtype=jnp.dtype(dtype or model.cfg.dtype))
    flat = {k: v for k, v in export.flat_params(model).items() if not k.startswith("head.")}
    return export.model_from_flat(cfg, flat)


class Classifier(nnx.Module):
    """A dense encoder with a pooled ``[CLS]`` classification head."""

    def __init__(self, encoder: DenseLM, num_classes: int, seed: int):
        rngs = nnx.Rngs(params=seed)
        h = encoder.cfg.hidden
        self.encoder = encoder
        self.pooler = layers.dense(h, h, encoder.cfg.dtype, rngs)
        self.classifier = layers.dense(h, num_classes, encoder.cfg.dtype, rngs)

    def __call__(self, inputs, mask, segment_ids=None, *, deterministic=True, rngs=None):
        out = self.encoder(inputs, mask, segment_ids, deterministic=deterministic, rngs=rngs)
        pooled = jnp.tanh(self.pooler(out.last_hidden[:, 0]))
        return self.classifier(pooled)


def _flat(module: nnx.Module) -> dict[str, np.ndarray]:
    return {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
            for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def save_classifier(path: Path, model: Classifier, meta: Mapping[str, Any]) -> None:
    """``path/encoder/`` (a model directory) and ``path/head.safetensors`` (pooler, classifier)."""
    export.save_model(path / "encoder", model.encoder, meta=dict(meta))
    heads = {k: v for k, v in _flat(model).items() if not k.startswith("encoder.")}
    tmp = path / "head.safetensors.tmp"
    save_file(heads, os.fspath(tmp))
    os.replace(tmp, path / "head.safetensors")


def load_classifier(path: Path, num_classes: int, dtype: Any = None) -> Classifier:
    """The classifier :func:`save_classifier` wrote (computing in ``dtype``)."""
    encoder = encoder_of(export.load_model(path / "encoder")[0], dtype)
    model = Classifier(encoder, num_classes, 0)
    tensors = load_file(os.fspath(path / "head.safetensors"))
    state = nnx.state(model, nnx.Param)
    for k, var in nnx.to_flat_state(state):
        name = ".".join(map(str, k))
        if not name.startswith("encoder."):
            if tuple(tensors[name].shape) != tuple(var.get_value().shape):
                raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, expected "
                                 f"{var.get_value().shape} ({num_classes} classes)")
            var.set_value(jnp.asarray(tensors[name]))
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------------------------------------
# Data


def pair_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths kept of a text pair truncated longest-first to ``budget`` tokens in all.

    Equivalent to removing one token at a time from the longer text (from ``b`` on ties), as
    BERT's tokenizers do: the shorter text is kept whole when it fits in half the budget."""
    if len_a + len_b <= budget:
        return len_a, len_b
    short = min(len_a, len_b)
    if short <= budget - short:
        return (short, budget - short) if len_a == short else (budget - short, short)
    return (budget + 1) // 2, budget // 2


def encode_examples(tok: Tokenizer, split: TaskSplit, seq_len: int) -> dict[str, np.ndarray]:
    """``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (segment ids 0 up to the first ``[SEP]``,
    1 after it; longest-first truncation to ``seq_len``), padded, with int32 labels."""
    sp = tok.special
    n = len(split)
    ids = np.full((n, seq_len), sp.pad, np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    first = tok.encode_batch(list(split.first))
    if split.second is None:
        for i, a in enumerate(first):
            row = [sp.cls, *a[: seq_len - 2], sp.sep]
            ids[i, : len(row)] = row
    else:
        if seq_len < 5:
            raise ValueError(f"sentence pairs need seq_len >= 5, got {seq_len}")
        for i, (a, b) in enumerate(zip(first, tok.encode_batch(list(split.second)))):
            la, lb = pair_lengths(len(a), len(b), seq_len - 3)
            row_a, row_b = [sp.cls, *a[:la], sp.sep], [*b[:lb], sp.sep]
            ids[i, : len(row_a) + len(row_b)] = row_a + row_b
            seg[i, len(row_a): len(row_a) + len(row_b)] = 1
    return {"inputs": ids, "mask": (ids != sp.pad).astype(np.int32), "segment_ids": seg,
            "labels": np.asarray(split.labels, np.int32)}


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A fine-tuning task, encoded: train, validation (model selection) and the test split(s)
    (the first is the reported ``test``)."""

    task: str
    num_classes: int
    metric_names: tuple[str, ...]
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    tests: dict[str, dict[str, np.ndarray]]


def load_task(cfg, tok: Tokenizer) -> TaskData:
    """``cfg.finetune.task`` encoded with ``tok`` to ``cfg.data.seq_len`` tokens."""
    fc, seq = cfg.finetune, cfg.data.seq_len
    task = glue.parse_task(fc.task)
    if task is None:
        s = load_polarity(cache_dir_of(cfg.data), seed=cfg.seed)
        train, val = (TaskSplit(s[k].texts, None, s[k].labels) for k in ("train", "validation"))
        tests = {"test": TaskSplit(s["test"].texts, None, s["test"].labels)}
        classes, names = 2, ("accuracy",)
    else:
        train, val, tests = glue.load_glue(task, fc.tfds_data_dir or None, cfg.seed, fc.holdout_frac)
        classes, names = task.num_classes, task.metrics
    return TaskData(fc.task, classes, names, encode_examples(tok, train, seq), encode_examples(tok, val, seq),
                    {k: encode_examples(tok, v, seq) for k, v in tests.items()})


class SentenceBatches:
    """Training batches (a pure function of (seed, step), per-epoch permutations) and fixed
    evaluation batches (the last one padded with zero-weight rows)."""

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.n = len(data["labels"])
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def _rows(self, idx: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.data.items()} | {"weights": weights.astype(np.float32)}

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        g = step * self.batch_size + np.arange(self.batch_size)
        epochs, pos = g // self.n, g % self.n
        idx = np.array([self._perm(int(e))[p] for e, p in zip(epochs, pos)])
        per = self.batch_size // process_count
        sl = slice(process_index * per, (process_index + 1) * per)
        return {k: v[sl] for k, v in self._rows(idx, np.ones(self.batch_size)).items()}

    def batches(self, process_index: int = 0, process_count: int = 1):
        per = self.batch_size // process_count
        for start in range(0, self.n, self.batch_size):
            idx = np.arange(start, start + self.batch_size)
            w = idx < self.n
            b = self._rows(np.minimum(idx, self.n - 1), w)
            yield {k: v[process_index * per:(process_index + 1) * per] for k, v in b.items()}


# ---------------------------------------------------------------------------------------------
# Losses and metrics


def _logits(model: Classifier, batch, rng=None):
    if rng is None:
        return model(batch["inputs"], batch["mask"], batch["segment_ids"])
    return model(batch["inputs"], batch["mask"], batch["segment_ids"], deterministic=False,
                 rngs=nnx.Rngs(dropout=rng))


def _sums(logits, batch, num_classes: int, confusion: bool) -> dict[str, jax.Array]:
    """Cross-entropy / accuracy sums and, with ``confusion``, the weighted confusion counts
    ``confusion_<true>_<pred>`` (raw counts: no ``_sum`` suffix, so the engine does not divide them)."""
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


def kd_term(kind: str, student_logits, teacher_logits, weights, temperature: float) -> jax.Array:
    """``KD(student, teacher)`` over the batch's rows of nonzero weight: DIST or soft CE."""
    return KD_LOSSES[kind](student_logits, teacher_logits, temperature, weights)


def make_loss_fns(num_classes: int, kd: str = "none", kd_weight: float = 0.0, temperature: float = 1.0,
                  teacher: Classifier | None = None) -> tuple[Callable, Callable, Any]:
    """``(loss_fn, eval_fn, frozen)`` for :class:`elm_jax.train.Trainer`.

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


def final_models(workdir: str | os.PathLike) -> dict[str, Path]:
    """Budget -> model directory: the retrained models, else the exported ones."""
    for stage in ("retrain", "export"):
        p = Path(workdir) / stage / "result.json"
        if p.is_file():
            return {k: Path(v["path"]) for k, v in json.loads(p.read_text()).items()}
    raise FileNotFoundError(f"no exported models in {workdir}: run the export stage first")


def _compute_dtype(cfg) -> Any:
    from elm_jax.precision import compute_dtype

    return compute_dtype(cfg)


def fine_tune(model: Classifier, data: TaskData, tc: ConfigDict, batch_size: int, mesh, workdir: Path,
              name: str, seed: int, *, kd: str = "none", kd_weight: float = 0.0, temperature: float = 1.0,
              teacher: Classifier | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Trains ``model`` on ``data`` (resumable run ``workdir/name``) and evaluates it: returns the
    trained classifier and its result entry (validation / test metrics, steps)."""
    loss_fn, eval_fn, frozen = make_loss_fns(data.num_classes, kd, kd_weight, temperature, teacher)
    trainer = train_lib.Trainer(model, loss_fn, eval_fn, ConfigDict(tc.to_dict() | {"seed": seed}), mesh,
                                frozen=frozen)
    state, summary = train_lib.fit(trainer, SentenceBatches(data.train, batch_size, seed),
                                   SentenceBatches(data.validation, batch_size, 0), workdir, name=name,
                                   meta={"task": data.task, "kd": kd})
    val = summary["eval"]
    tests = {s: train_lib.evaluate(trainer, state, SentenceBatches(d, batch_size, 0))
             for s, d in data.tests.items()}
    metrics = {s: glue.classification_metrics(confusion_of(m, data.num_classes), data.metric_names)
               for s, m in tests.items()}
    first = next(iter(tests))
    entry = {
        "task": data.task, "metric_names": list(data.metric_names),
        "validation_accuracy": val["correct"], "test_accuracy": tests[first]["correct"],
        "validation_metrics": glue.classification_metrics(confusion_of(val, data.num_classes),
                                                          data.metric_names),
        "test_metrics": metrics[first], "test_split": first, "steps": summary["final_step"],
        "kd": {"kind": kd} if kd == "none" else {"kind": kd, "weight": kd_weight, "temperature": temperature,
                                                 "validation_kd": val["kd_total"] / val["kd_count"],
                                                 "validation_agreement": val["agree"]},
    }
    if len(metrics) > 1:
        entry["other_test_metrics"] = {s: m for s, m in metrics.items() if s != first}
    return trainer.model_from_state(state), entry


def _describe(entry: Mapping[str, Any]) -> str:
    parts = [f"{k} {v:.4f}" for k, v in entry["test_metrics"].items()]
    return (f"{entry['task']} validation accuracy {entry['validation_accuracy']:.4f}, "
            f"test ({entry['test_split']}) {', '.join(parts)}")


def fine_tuned_teacher(cfg, workdir: str | os.PathLike, data: TaskData, mesh) -> tuple[Classifier, dict]:
    """The teacher fine-tuned on the task with the students' head, from its cache
    ``WORKDIR/finetune/teacher_<task>`` or trained now (``finetune.teacher_train``; the training
    run in ``WORKDIR/finetune/teacher_<task>_run``) and cached."""
    from elm_jax.teacher import load_teacher

    fc = cfg.finetune
    cache = Path(workdir) / "finetune" / f"teacher_{glue.task_slug(fc.task)}"
    done = cache / "result.json"
    settings = {"seed": cfg.seed, "seq_len": cfg.data.seq_len, "batch_size": fc.batch_size,
                "holdout_frac": fc.holdout_frac, "train": fc.teacher_train.to_dict()}
    if done.is_file():
        entry = json.loads(done.read_text())
        if entry.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(f"the teacher in {cache} was fine-tuned with other settings "
                             f"({entry.get('settings')}); delete that directory to fine-tune it again")
        print(f"[finetune] teacher fine-tuned on {fc.task} already: {cache}")
        return load_classifier(cache, data.num_classes, _compute_dtype(cfg)), entry
    encoder = encoder_of(load_teacher(workdir), _compute_dtype(cfg))
    model, entry = fine_tune(Classifier(encoder, data.num_classes, cfg.seed), data, fc.teacher_train,
                             fc.batch_size, mesh, cache.parent, f"{cache.name}_run", cfg.seed)
    entry |= {"path": os.fspath(cache), "settings": settings}
    if jax.process_index() == 0:
        save_classifier(cache, model, {"role": "fine-tuned teacher", "task": fc.task})
        atomic_write_json(done, entry)
    print(f"[finetune] teacher: {_describe(entry)}")
    return model, entry


def run_finetune_stage(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
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
    dtype = _compute_dtype(cfg)
    run_tag = glue.task_slug(fc.task) + ("" if fc.kd == "none" else f"_{fc.kd}")
    for name, path in models.items():
        encoder, _ = export.load_model(path)
        if teacher is not None and encoder.cfg.vocab_size != teacher.encoder.cfg.vocab_size:
            raise ValueError(f"{name}: vocabulary {encoder.cfg.vocab_size} != the teacher's "
                             f"{teacher.encoder.cfg.vocab_size}; KD needs the same tokenizer")
        model = Classifier(encoder_of(encoder, dtype), task.num_classes, cfg.seed)
        _, result[name] = fine_tune(model, task, fc.train, fc.batch_size, mesh, root, f"{name}_{run_tag}_run",
                                    cfg.seed, kd=fc.kd, kd_weight=float(fc.kd_weight),
                                    temperature=float(fc.temperature), teacher=teacher)
        print(f"[finetune] {name}: {_describe(result[name])}")
    if jax.process_index() == 0:
        atomic_write_json(done, result)
    return result


def run_evaluate_stage(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Validation loss / perplexity / token accuracy of every final model and of the teacher."""
    mesh = sharding.make_mesh(cfg.mesh)
    models = {name: export.load_model(p)[0] for name, p in final_models(workdir).items()}
    teacher_dir = Path(workdir) / "teacher" / "model"
    if export.is_model_dir(teacher_dir):
        models["teacher"] = export.load_model(teacher_dir)[0]
    result = {}
    for name, model in models.items():
        if model.cfg.head == "none":
            continue
        m = evaluate_lm(model, data.eval, mesh)
        result[name] = {"loss": m["loss"], "perplexity": m["perplexity"],
                        "accuracy": m["correct"], "params": sum(
                            v.size for v in export.flat_params(model).values())}
        print(f"[evaluate] {name}: loss {m['loss']:.4f} perplexity {result[name]['perplexity']:.2f} "
              f"accuracy {m['correct']:.4f} ({result[name]['params']:,} params)")
    if jax.process_index() == 0:
        from elm_jax.report import build_report

        atomic_write_json(Path(workdir) / "evaluate" / "result.json", result)
        print(build_report(workdir))
    return result
