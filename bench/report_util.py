"""Shared by the bench scripts: the machine line, markdown tables, and dated BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Sequence

import jax


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{dev.platform}:{dev.device_kind} x{jax.device_count()}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def append_section(path: str, title: str, command: str, body: str, extra: str = "") -> None:
    """Appends ``### title (date)`` with the command, the machine, ``extra`` lines and ``body``."""
    with open(path, "a") as f:
        f.write(f"\n### {title} ({datetime.date.today().isoformat()})\n\nCommand: `{command}`  \n"
                f"Machine: {machine()}" + (f"  \n{extra}" if extra else "") + f"\n\n{body}\n")
