"""Sentence(-pair) classification data for fine-tuning: the task's splits, their encoding and batches."""

from __future__ import annotations

import dataclasses

import numpy as np

from elm_jax.data import glue
from elm_jax.data.corpus import load_polarity
from elm_jax.data.glue import TaskSplit
from elm_jax.data.prepare import cache_dir_of
from elm_jax.data.tokenizer import Tokenizer


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
