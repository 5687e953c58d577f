"""Tables of a finished work directory: found models against same-budget hand-designed baselines.

``build_report(workdir)`` reads the stages' JSON outputs and writes ``WORKDIR/report.md``: one
row per exported model (the searched architecture and the uniform all-BERT / all-MobileBERT
baselines of its budget) with parameters, FLOPs, predicted and measured latency, validation loss
and perplexity after retraining, and sentence-polarity accuracy (MLM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def build_report(workdir: str | os.PathLike) -> str:
    """Writes and returns ``WORKDIR/report.md``."""
    wd = Path(workdir)
    export = _load(wd / "export" / "result.json")
    evaluate = _load(wd / "evaluate" / "result.json")
    finetune = _load(wd / "finetune" / "result.json")
    retrain = _load(wd / "retrain" / "result.json")
    header = ["model", "kind", "architecture", "params", "FLOPs/seq", "pred. latency ms",
              "meas. latency ms", "val loss (inherited)", "val loss (retrained)", "perplexity",
              "polarity test acc."]
    rows = []
    for name, e in export.items():
        ev, ft, rt = evaluate.get(name, {}), finetune.get(name, {}), retrain.get(name, {})
        rows.append([name, e.get("kind", "found"), f"`{e['describe']}`", e["params"], e["flops"],
                     e.get("predicted_latency_ms"), e.get("measured_latency_ms"),
                     rt.get("before", {}).get("loss"), ev.get("loss"), ev.get("perplexity"),
                     ft.get("test_accuracy")])
    lines = [f"# elm-jax report: {wd}", ""]
    if "teacher" in evaluate:
        t = evaluate["teacher"]
        lines += [f"Teacher: {_fmt(t['params'])} parameters, validation loss {_fmt(t['loss'])}, "
                  f"perplexity {_fmt(t['perplexity'])}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    if (wd / "search" / "pareto.png").is_file():
        lines += ["", "Pareto front of the search (validation loss vs. parameters): `search/pareto.png`."]
    text = "\n".join(lines) + "\n"
    from elm_jax.fileio import atomic_write_bytes

    atomic_write_bytes(wd / "report.md", text.encode())
    return text
