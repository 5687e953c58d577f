"""Scalar logging (TensorBoard + ``metrics.jsonl``) and a tqdm progress bar.

Only process 0 writes (``enabled = jax.process_index() == 0``); on other processes
both classes are silent no-ops, so callers need no ``if`` around them.
``metrics.jsonl`` holds one JSON object per line, ``{"step": s, "<name>": value...}``,
easy to read back in tests, reports and notebooks without TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np


def _to_float(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Writes scalars to TensorBoard event files and ``<workdir>/metrics.jsonl``.

    Args:
      workdir: directory of the run (created if missing).
      enabled: whether this process writes (pass ``jax.process_index() == 0``).
      resume_step: when resuming from a checkpoint at this step, lines of an earlier
        attempt with ``step > resume_step`` are dropped from ``metrics.jsonl`` and the
        TensorBoard events after it are purged, so a resumed run's logs read like an
        uninterrupted one.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = bool(enabled)
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            self._truncate_after(int(resume_step))
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, "tb"),
                purge_step=None if resume_step is None else resume_step + 1,
            )
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    if int(json.loads(line)["step"]) <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: drop it
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs ``scalars`` (names like ``'train/loss'``) at ``step``."""
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in scalars.items()}
        record = {"step": int(step)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._tb is not None:
                self._tb.close()
                self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` back into a list of dicts (for tests and reports)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """tqdm bar over training steps showing loss, tokens/s and the ETA.

    Args:
      total: the final step.
      initial: the step training starts (or resumes) from.
      enabled: whether to show it (process 0 only).
      desc: label in front of the bar.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.enabled = bool(enabled)
        self._bar = None
        self._last_step = int(initial)
        self._last_time = time.perf_counter()
        if self.enabled:
            from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

            self._bar = tqdm(
                total=int(total), initial=int(initial), desc=desc, dynamic_ncols=True, smoothing=0.1
            )

    def update(self, step: int, loss: float | None = None, tokens_per_step: int | None = None) -> None:
        """Moves the bar to ``step``; tokens/s is measured since the previous update."""
        if not self.enabled:
            return
        now = time.perf_counter()
        done = int(step) - self._last_step
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if tokens_per_step and done > 0 and now > self._last_time:
            postfix["tok/s"] = f"{tokens_per_step * done / (now - self._last_time):.3g}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        if done > 0:
            self._bar.update(done)
        self._last_step, self._last_time = int(step), now

    def write(self, text: str) -> None:
        """Prints ``text`` on its own line without breaking the bar (silent when disabled)."""
        if self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
