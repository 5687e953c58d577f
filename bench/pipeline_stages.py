"""Wall time, tokens/s and peak host memory of each pipeline stage, each stage in its own process.

    python bench/pipeline_stages.py [--config=configs/mlm.py:demo] [--workdir=DIR] [--keep]
                                    [--stages=all|data,teacher,...] [--note=TEXT] [--out=BENCHMARKS.md]
                                    [--config.FIELD=VALUE ...]   (forwarded to elm_jax.main)

Runs ``python -m elm_jax.main --config=C --workdir=W --stages=S`` for one stage S after the other
(in the order of ``elm_jax.pipeline.STAGE_NAMES``) and reaps each child with ``os.wait4``, whose resource
usage gives that stage's own peak RSS (``ru_maxrss``). Every process pays the interpreter and JAX
start-up and the data preparation from the cache: the ``data`` row is roughly that fixed cost alone.

Tokens of a training stage = the tokens its training loops consumed in this run, from the engine's
``summary.json`` of every run the stage wrote during it (teacher; supernet; one per model for
retrain and finetune): ``tokens_per_s x train_time_s`` = steps x global batch x sequence length.
Reported per stage: wall s, tokens, tokens/s over the stage's wall time, tokens/s of the training
loops alone (engine; includes their compilation), peak RSS MB. A stage whose outputs already exist
in a reused ``--workdir`` returns at once and is marked ``reused``. The work directory is a fresh
temporary one unless ``--workdir`` is given; it is deleted afterwards unless ``--keep``. Each
stage's output is in ``W/bench_logs/STAGE.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_util import append_section, markdown_table

from elm_jax.pipeline import STAGE_NAMES as STAGES, parse_stages

REPO = Path(__file__).resolve().parent.parent


def run_stage(config: str, workdir: Path, stage: str, extra: list[str]) -> dict:
    """Runs one stage in a child process; its wall time, exit code and peak RSS (MB)."""
    logs = workdir / "bench_logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "elm_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--stages={stage}", *extra]
    start_wall = time.time()
    with open(logs / f"{stage}.log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    text = (logs / f"{stage}.log").read_text(errors="replace")
    return {"stage": stage, "wall": wall, "rc": proc.returncode, "rss_mb": usage.ru_maxrss / 1024,
            "started": start_wall, "log": text, "reused": "complete already" in text}


def stage_tokens(workdir: Path, stage: str, since: float) -> tuple[float, float] | None:
    """``(tokens, training-loop seconds)`` summed over the engine summaries the stage wrote after
    ``since`` (its start), or None when it trained nothing."""
    root = workdir / stage
    paths = [root / "summary.json", *sorted(root.glob("*/summary.json"))]
    tokens = seconds = 0.0
    found = False
    for p in paths:
        if not p.is_file() or p.stat().st_mtime < since:
            continue
        s = json.loads(p.read_text())
        if s.get("tokens_per_s") and s.get("train_time_s"):
            tokens += float(s["tokens_per_s"]) * float(s["train_time_s"])
            seconds += float(s["train_time_s"])
            found = True
    return (tokens, seconds) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--workdir", default="", help="reuse this work directory (kept)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--stages", default="all")
    ap.add_argument("--note", default="", help="an extra line for the BENCHMARKS.md section")
    ap.add_argument("--out", default="BENCHMARKS.md", help="markdown file to append to ('' = print only)")
    args, extra = ap.parse_known_args()
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad} (only --config.FIELD=VALUE overrides are forwarded)")
    stages = list(STAGES) if args.stages.strip() == "all" else parse_stages(args.stages)
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="elm_stages_"))
    print(f"work directory: {workdir}")

    results = []
    try:
        for stage in stages:
            r = run_stage(args.config, workdir, stage, extra)
            print(f"[{stage}] {r['wall']:.1f} s, exit {r['rc']}, peak RSS {r['rss_mb']:.0f} MB"
                  + (" (reused)" if r["reused"] else ""), flush=True)
            if r["rc"] != 0:
                print(r["log"][-4000:], file=sys.stderr)
                print(f"stage {stage} failed (exit {r['rc']}); log: {workdir / 'bench_logs' / stage}.log",
                      file=sys.stderr)
                return 1
            r["tokens"] = stage_tokens(workdir, stage, r["started"])
            results.append(r)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for r in results:
        tok = r["tokens"]
        name = r["stage"] + (" (reused)" if r["reused"] else "")
        if tok is None:
            rows.append((name, round(r["wall"], 1), "-", "-", "-", round(r["rss_mb"])))
        else:
            rows.append((name, round(r["wall"], 1), round(tok[0]), round(tok[0] / r["wall"]),
                         round(tok[0] / tok[1]), round(r["rss_mb"])))
    rows.append(("total", round(sum(r["wall"] for r in results), 1), "", "", "",
                 round(max(r["rss_mb"] for r in results))))
    header = ("stage", "wall s", "tokens", "tokens/s (stage wall)", "tokens/s (training loops)",
              "peak RSS MB")
    table = markdown_table(header, rows)
    print(table)
    extra_line = ("Each stage in its own process (interpreter, JAX start-up and data preparation from "
                  "the cache in every row: the `data` row is roughly that cost alone); tokens from the engine "
                  "summaries of the runs each stage trained; peak RSS = the stage process's ru_maxrss.")
    if args.note:
        extra_line += f"  \n{args.note}"
    if args.out:
        cmd = " ".join(["python bench/pipeline_stages.py", f"--config={args.config}"]
                       + ([f"--stages={args.stages}"] if args.stages != "all" else []) + extra)
        append_section(args.out, "Pipeline stages", cmd, table, extra_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
