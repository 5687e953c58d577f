"""Does the search rank signal? Its fitness spread over the noise, against the number of batches.

The search scores every candidate on the first ``search.eval_batches`` batches of the search
split. The spread of the candidates' fitness (their sample sd) is a property of the supernet and
the search space; the standard error of a fitness difference (paired over the same rows,
:mod:`elm_jax.search.fitness_noise`) shrinks as ``1 / sqrt(rows)``. So the ratio
``sd / paired SE`` (at least 5x: the search ranks signal, issue 29) is bought with scoring time.

For each ``--batches`` value this copies the data, teacher and supernet of a finished work
directory (``--workdir``: its supernet is the one scored, never retrained), runs only the search
stage on the copy (``python -m elm_jax.main --stages=search``, the compile cache off, as in
``make run``) and appends one JSON line to ``bench/results/search_noise.jsonl``: the commit,
config, source work directory, batches, rows, every budget's scored candidates, sd, range,
paired SE, ratio, found architecture and fitness, and the stage's wall time. The "Search fitness
noise" section of BENCHMARKS.md is then rewritten from all the lines.

    python bench/search_noise.py --workdir DIR --batches 8,16,32,64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_run_cost import _commit  # noqa: E402  (bench/ is the script directory)
from report_util import append_jsonl, markdown_table, read_jsonl, replace_section  # noqa: E402

TITLE = "Search fitness noise"
LOG = REPO / "bench" / "results" / "search_noise.jsonl"
UPSTREAM = ("data", "teacher", "supernet")  # what the search stage reads


def copy_upstream(source: Path, dest: Path) -> None:
    """``dest``: the stages the search reads (:data:`UPSTREAM`) and the fingerprints of
    ``source``, nothing downstream, so the search stage runs afresh on the same supernet."""
    if not (source / "supernet" / "result.json").is_file():
        raise SystemExit(f"--workdir {source}: no trained supernet (supernet/result.json)")
    dest.mkdir(parents=True)
    for name in UPSTREAM:
        shutil.copytree(source / name, dest / name, symlinks=True)
    if (source / "fingerprints.json").is_file():
        shutil.copy2(source / "fingerprints.json", dest / "fingerprints.json")


def noise_of(workdir: Path) -> dict:
    """Per budget of ``search/result.json``: the noise summary the search stage wrote, the found
    architecture and its fitness."""
    result = json.loads((workdir / "search" / "result.json").read_text())
    return {"eval_batches": result["eval_batches"],
            "budgets": {name: {**b["noise"], "describe": b["describe"], "score": b["score"]}
                        for name, b in result["budgets"].items()}}


def run_one(config: str, source: Path, batches: int, overrides: list[str], keep: Path | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"search_noise_b{batches}_", dir=keep))
    w = tmp / "w"
    copy_upstream(source, w)
    cmd = [sys.executable, "-u", "-m", "elm_jax.main", f"--config={config}", f"--workdir={w}",
           "--stages=search", "--allow_config_change", "--config.compile_cache_dir=none",
           f"--config.search.eval_batches={batches}", *[f"--config.{o}" for o in overrides]]
    t0 = time.perf_counter()
    with open(tmp / "run.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {rc}; see {tmp / 'run.log'}")
    return {"date": datetime.date.today().isoformat(), "commit": _commit(), "config": config,
            "overrides": overrides, "source": str(source), "requested_batches": batches,
            **noise_of(w), "process_s": round(wall, 1), "load_1m": os.getloadavg()[0]}


def render(records: list[dict]) -> str:
    rows = []
    for r in records:
        for name, b in r["budgets"].items():
            rows.append([r["config"], Path(r["source"]).parent.name, name, str(r["eval_batches"]),
                         str(b["rows"]), str(b["candidates"]), f"{b['spread']:.4f}", f"{b['range']:.4f}",
                         f"{b['paired_se']:.4f}", f"{b['ratio']:.1f}x", f"`{b['describe']}` {b['score']:.4f}",
                         f"{r['process_s']:.0f}", r["commit"]])
    body = markdown_table(["config", "supernet of", "budget", "batches", "rows", "scored", "sd",
                           "range", "paired SE", "sd / paired SE", "found (fitness)", "search process s",
                           "commit"], rows)
    return (f"\n### {TITLE} ({records[-1]['date']})\n\n"
            f"Command: `python bench/search_noise.py --workdir DIR --batches 8,16,32,64` (one JSON line "
            f"per run in `bench/results/search_noise.jsonl`; this section is written from all of them)  \n"
            f"Machine: {os.uname().machine}, {os.cpu_count()} cores; the search stage alone on a copy of a "
            f"finished run's supernet, in a fresh process with the compile cache off\n\n"
            f"sd: the sample sd of every scored candidate's fitness (search-split loss, nats); paired SE: "
            f"the standard error of a candidate's fitness difference from the best, paired over the same "
            f"rows. The search ranks signal when sd / paired SE is at least 5x.\n\n{body}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--workdir", help="a work directory with a trained supernet")
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--set", nargs="*", default=[], help="dotted config overrides the work directory was made with")
    ap.add_argument("--keep", default=None, help="directory for the copies (default: /tmp)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    if not args.report_only:
        if not args.workdir:
            ap.error("--workdir is required (or --report-only)")
        for n in [int(b) for b in args.batches.split(",") if b.strip()]:
            rec = run_one(args.config, Path(args.workdir).resolve(), n, list(args.set),
                          Path(args.keep) if args.keep else None)
            append_jsonl(LOG, rec)
            print(f"[search_noise] {n} batches: " + ", ".join(
                f"{k} sd / paired SE {b['ratio']:.2f}x" for k, b in rec["budgets"].items())
                + f", {rec['process_s']:.0f} s", flush=True)
    records = read_jsonl(LOG)
    text = render(records)
    print(text)
    replace_section(args.out, (TITLE,), text)
    if not args.report_only:  # a new line landed: RESULTS.md is written from it too
        import results_md  # here: results_md reads the bench modules

        results_md.write()


if __name__ == "__main__":
    main()
