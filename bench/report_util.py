"""Shared by the bench scripts: the machine line, markdown tables, and dated BENCHMARKS.md sections."""

from __future__ import annotations

import ast
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Sequence

import jax

from elm_jax import report


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{dev.platform}:{dev.device_kind} x{jax.device_count()}")


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table of pre-formatted cells (:func:`elm_jax.report.markdown_table` with ``str``)."""
    return "\n".join(report.markdown_table(header, rows, cell=str))


def append_section(path: str, title: str, command: str, body: str, extra: str = "") -> None:
    """Appends ``### title (date)`` with the command, the machine, ``extra`` lines and ``body``."""
    with open(path, "a") as f:
        f.write(f"\n### {title} ({datetime.date.today().isoformat()})\n\nCommand: `{command}`  \n"
                f"Machine: {machine()}" + (f"  \n{extra}" if extra else "") + f"\n\n{body}\n")


def append_jsonl(path: Path, record: dict) -> None:
    """Appends ``record`` as one sorted-key JSON line to the result log ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Rewrites the result log ``path`` as ``records``, one sorted-key JSON line each (for a
    script that recomputes its own lines from their work directories)."""
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """Every record of the result log ``path`` (blank lines skipped)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def replace_section(path: str, titles: Sequence[str], text: str) -> None:
    """Replaces the ``### <title>`` section of ``path`` for the first of ``titles`` found (the
    current title first, then titles the same script wrote before), up to the next ``### ``,
    with ``text``; appends ``text`` when there is none."""
    old = Path(path).read_text() if Path(path).is_file() else ""
    starts = [i for i in (old.find(f"\n### {t}") for t in titles) if i >= 0]
    start = min(starts, default=-1)
    if start < 0:
        new = old.rstrip("\n") + "\n" + text
    else:
        end = old.find("\n### ", start + 1)
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    Path(path).write_text(new)


def apply_overrides(cfg, items: Sequence[str]) -> None:
    """Applies dotted ``key=value`` overrides (``data.mask_rate=0.4``) to ``cfg`` in place, each
    value parsed as the type of the field it replaces (bool, int, float, a tuple or list as a
    Python literal, ``(4,)``, as the command line's ``--config.X`` reads it; else the text)."""
    with cfg.unlocked():
        for item in items:
            key, _, text = item.partition("=")
            *path, leaf = key.split(".")
            node = cfg
            for part in path:
                node = node[part]
            old = node[leaf]
            node[leaf] = (text.lower() in ("true", "1") if isinstance(old, bool) else
                          int(text) if isinstance(old, int) else
                          float(text) if isinstance(old, float) else
                          type(old)(ast.literal_eval(text)) if isinstance(old, (tuple, list)) else text)
