"""GLUE classification tasks read through TensorFlow Datasets without TensorFlow, and their metrics.

A task is named ``glue/<name>`` (``finetune.task``). Its records are the ones ``tfds build
glue/<name> --file_format=array_record --data_dir=DIR`` writes, read with ``tfds.data_source``
(random access; no ``tfds.load``, no TensorFlow), with the tfds glue builder's feature keys:

  ============  ==========================  =======  ==========================================
  task          text features               classes  metrics (GLUE's)
  ============  ==========================  =======  ==========================================
  cola          sentence                    2        Matthews correlation (and accuracy)
  sst2          sentence                    2        accuracy
  mrpc          sentence1, sentence2        2        accuracy, F1 of class 1 (equivalent)
  qqp           question1, question2        2        accuracy, F1 of class 1 (duplicate)
  mnli          premise, hypothesis         3        accuracy (validation_matched; mismatched too)
  qnli          question, sentence          2        accuracy
  rte           sentence1, sentence2        2        accuracy
  wnli          sentence1, sentence2        2        accuracy
  ============  ==========================  =======  ==========================================

``stsb`` is a regression task (Pearson/Spearman of a score) and is refused with a clear message.
GLUE's test labels are hidden (-1), so the labelled ``validation`` split(s) serve as the test
set and a stratified, seeded fraction of ``train`` is held out for model selection.

:func:`build_local_glue` writes in-memory rows in exactly that on-disk format (the tfds glue
builder's features and file layout), for machines that cannot download GLUE and for tests.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from elm_jax.data.corpus import DataError, stratified_split

POLARITY = "polarity"
_READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE classification task.

    Attributes:
      name: the tfds glue config (``sst2``, ``mrpc``, ...).
      text_keys: the feature keys of the one or two input texts, in order.
      num_classes: label classes (labels are ``0 .. num_classes - 1``).
      metrics: the metric names reported, GLUE's own first (``accuracy`` always included).
      eval_splits: the labelled evaluation splits; the first is the reported test split.
    """

    name: str
    text_keys: tuple[str, ...]
    num_classes: int
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def tfds_name(self) -> str:
        return f"glue/{self.name}"

    @property
    def is_pair(self) -> bool:
        return len(self.text_keys) == 2


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", ("sentence",), 2, ("mcc", "accuracy")),
    GlueTask("sst2", ("sentence",), 2, ("accuracy",)),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    GlueTask("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",),
             ("validation_matched", "validation_mismatched")),
    GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
)}
TASK_NAMES = (POLARITY, *(f"glue/{n}" for n in GLUE_TASKS))


def parse_task(spec: str) -> GlueTask | None:
    """``'polarity'`` -> None (the embedded task); ``'glue/<name>'`` -> its :class:`GlueTask`.

    Raises DataError for stsb (regression) and unknown names, saying what is allowed."""
    if spec == POLARITY:
        return None
    family, _, name = spec.partition("/")
    if family == "glue" and name == "stsb":
        raise DataError("glue/stsb is a regression task (Pearson/Spearman of a similarity score); "
                        f"finetune supports the classification tasks {', '.join(TASK_NAMES)}")
    if family != "glue" or name not in GLUE_TASKS:
        raise DataError(f"unknown fine-tuning task {spec!r}; choose one of {', '.join(TASK_NAMES)}")
    return GLUE_TASKS[name]


def task_slug(spec: str) -> str:
    """A file-name-safe form of a task name (``glue/sst2`` -> ``glue_sst2``)."""
    return spec.replace("/", "_")


@dataclasses.dataclass(frozen=True)
class TaskSplit:
    """Labelled examples: one text each (``second`` None) or a text pair; labels int32."""

    first: tuple[str, ...]
    second: tuple[str, ...] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    def take(self, idx: np.ndarray) -> TaskSplit:
        """The examples at ``idx``, in that order."""
        return TaskSplit(tuple(self.first[i] for i in idx),
                         None if self.second is None else tuple(self.second[i] for i in idx),
                         self.labels[idx])


# ---------------------------------------------------------------------------------------------
# Reading


def default_data_dir() -> str:
    """tfds's default data directory (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _prepare_hint(task: GlueTask, data_dir: str) -> str:
    return (f"prepare it with `tfds build {task.tfds_name} --file_format=array_record "
            f"--data_dir={data_dir}` (or write your own rows with elm_jax.data.glue.build_local_glue)")


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def read_glue_split(task: GlueTask, split: str, data_dir: str | os.PathLike | None) -> TaskSplit:
    """Every record of ``glue/<task>`` ``split`` under ``data_dir``, in GLUE's ``idx`` order.

    Raises DataError (one line) when the dataset is not prepared there, lacks a feature, or
    has hidden / out-of-range labels (GLUE's test splits are labelled -1)."""
    import tensorflow_datasets as tfds

    root = os.fspath(data_dir) if data_dir else default_data_dir()
    if not (Path(root) / "glue" / task.name).is_dir():
        raise DataError(f"GLUE task {task.tfds_name} is not prepared in {root}: "
                        f"{_prepare_hint(task, root)}")
    try:
        source = tfds.data_source(task.tfds_name, split=split, data_dir=root, download=False,
                                  try_gcs=False)
    except Exception as e:  # noqa: BLE001  (tfds raises several types for an unprepared dataset)
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"cannot open {task.tfds_name} split {split!r} in {root} "
                        f"({type(e).__name__}: {first}); {_prepare_hint(task, root)}") from None
    records: list[Mapping[str, Any]] = []
    for start in range(0, len(source), _READ_CHUNK):
        records.extend(source.__getitems__(range(start, min(start + _READ_CHUNK, len(source)))))
    if not records:
        raise DataError(f"{task.tfds_name} split {split!r} in {root} is empty")
    missing = [k for k in (*task.text_keys, "label", "idx") if k not in records[0]]
    if missing:
        raise DataError(f"{task.tfds_name} in {root} lacks the features {missing}; it has "
                        f"{sorted(records[0])}")
    records.sort(key=lambda r: int(r["idx"]))  # tfds shuffles records on disk
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    bad = np.flatnonzero((labels < 0) | (labels >= task.num_classes))
    if len(bad):
        raise DataError(f"{task.tfds_name} split {split!r} has labels outside 0..{task.num_classes - 1} "
                        f"(e.g. {int(labels[bad[0]])} at idx {int(records[bad[0]]['idx'])}); "
                        "GLUE test labels are hidden (-1): evaluate on the validation split")
    texts = [tuple(_text(r[k]) for r in records) for k in task.text_keys]
    return TaskSplit(texts[0], texts[1] if task.is_pair else None, labels)


def load_glue(task: GlueTask, data_dir: str | os.PathLike | None, seed: int,
              holdout_frac: float) -> tuple[TaskSplit, TaskSplit, dict[str, TaskSplit]]:
    """``(train, model_selection, tests)``: GLUE train minus a stratified ``holdout_frac`` held
    out with ``seed`` (the model-selection split), and GLUE's labelled evaluation split(s) by name
    (the first is the reported test split)."""
    if not 0.0 < holdout_frac < 1.0:
        raise DataError(f"holdout_frac must be in (0, 1), got {holdout_frac}")
    full = read_glue_split(task, "train", data_dir)
    train_idx, held_idx = stratified_split(full.labels, (1.0 - holdout_frac, holdout_frac), seed)
    if not len(train_idx) or not len(held_idx):
        raise DataError(f"{task.tfds_name}: {len(full)} training rows are too few to hold out "
                        f"{holdout_frac:.0%} for model selection")
    tests = {s: read_glue_split(task, s, data_dir) for s in task.eval_splits}
    return full.take(train_idx), full.take(held_idx), tests


# ---------------------------------------------------------------------------------------------
# Writing local records in the tfds glue format


def _local_builder_class():
    """The tfds glue builder with in-memory rows instead of downloads (same name, configs,
    features and file layout), unregistered so it never shadows tfds's own ``glue``."""
    from tensorflow_datasets.text.glue import Glue

    class LocalGlue(Glue, skip_registration=True):
        name = "glue"

        def __init__(self, *, rows: Mapping[str, Sequence[Mapping[str, Any]]] | None = None, **kwargs):
            self._rows = rows
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _split_generators(self, dl_manager):
            if self._rows is None:
                raise DataError("LocalGlue needs rows to be built")
            return {split: self._generate_local(rows) for split, rows in self._rows.items()}

        def _generate_local(self, rows: Sequence[Mapping[str, Any]]) -> Iterator:
            for r in rows:
                yield int(r["idx"]), dict(r)

    return LocalGlue


def build_local_glue(task_name: str, rows: Mapping[str, Sequence[Mapping[str, Any]]],
                     data_dir: str | os.PathLike) -> str:
    """Writes ``rows`` (split -> dicts with the task's text keys and ``label``; ``idx`` defaults
    to the row's position) as ``glue/<task_name>`` array_record files under ``data_dir``, exactly
    where and how ``tfds build`` puts them; :func:`read_glue_split` then reads them back.
    Idempotent: a complete copy is reused."""
    import tensorflow_datasets as tfds

    task = parse_task(f"glue/{task_name}")
    want = set(task.text_keys) | {"label"}
    full: dict[str, list[dict[str, Any]]] = {}
    for split, items in rows.items():
        if not items:
            raise DataError(f"the {split!r} split has no rows")
        full[split] = []
        for i, r in enumerate(items):
            if set(r) - {"idx"} != want:
                raise DataError(f"{task.tfds_name} rows need exactly the keys {sorted(want)} "
                                f"(and optionally idx); row {i} of {split!r} has {sorted(r)}")
            full[split].append({**r, "idx": int(r.get("idx", i))})
    tfds.disable_progress_bar()
    builder = _local_builder_class()(rows=full, config=task.name, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.fspath(data_dir)


# ---------------------------------------------------------------------------------------------
# Metrics


def classification_metrics(confusion: np.ndarray, names: Sequence[str] = ("accuracy",)) -> dict[str, float]:
    """GLUE metrics from a confusion matrix ``confusion[true, predicted]`` (counts).

    ``accuracy = trace / total``; ``f1`` (binary) ``= 2 tp / (2 tp + fp + fn)`` of class 1;
    ``mcc`` = Matthews correlation in its multi-class form (Gorodkin), with row sums ``t``,
    column sums ``p``, ``c = trace`` and ``n = total``::

        mcc = (c n - t.p) / sqrt((n^2 - p.p) (n^2 - t.t))

    (the binary ``(tp tn - fp fn) / sqrt(...)`` for two classes). A zero denominator gives 0,
    as scikit-learn does.
    """
    cm = np.asarray(confusion, np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    n = cm.sum()
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(np.trace(cm) / n) if n else float("nan")
        elif name == "f1":
            if cm.shape != (2, 2):
                raise ValueError("f1 is defined here for binary tasks (class 1 positive)")
            tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
            out[name] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0
        elif name == "mcc":
            t, p, c = cm.sum(1), cm.sum(0), np.trace(cm)
            den = np.sqrt((n * n - p @ p) * (n * n - t @ t))
            out[name] = float((c * n - t @ p) / den) if den else 0.0
        else:
            raise ValueError(f"unknown metric {name!r}; known: accuracy, f1, mcc")
    return out
