"""Reliability: how many bad inputs the CLI refuses, each as one ``error:`` line and exit code 2.

Two counts, written to ``bench/results/bad_inputs.json`` and the "Reliability: refused bad
inputs" section of BENCHMARKS.md:

- **non-finite settings** (issue 27), run here: every float field of every variant of
  ``configs/mlm.py`` and ``configs/clm.py`` (found by :func:`elm_jax.config.float_fields`, the
  walk the validation itself uses) overridden with ``nan``, ``inf`` and ``-inf`` through
  ``elm_jax.main.cli``; a case counts as refused when the exit code is 2, stderr is exactly
  ``error: config.<field>: must be finite (got <value>)`` and the work directory was not made;
- **the other bad-input cases** of the test suite (``tests/test_bad_inputs.py`` and
  ``tests/test_config.py``), counted by ``pytest --collect-only`` (they are run by the suite,
  not here).

Usage: ``python bench/bad_inputs.py [--out BENCHMARKS.md]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

from elm_jax import main as main_lib  # noqa: E402
from elm_jax.config import float_fields, load_config  # noqa: E402
from elm_jax.fileio import atomic_write_json  # noqa: E402
from report_util import markdown_table, replace_section  # noqa: E402  (bench/ is the script directory)

TITLE = "Reliability: refused bad inputs"
RESULT = REPO / "bench" / "results" / "bad_inputs.json"
SUITE_FILES = ("tests/test_bad_inputs.py", "tests/test_config.py")
BAD = ("nan", "inf", "-inf")


def nonfinite_cases(tmp: Path) -> list[dict]:
    """One row per config spec: float fields, cases run, cases refused as specified."""
    variants = runpy.run_path(str(REPO / "configs" / "common.py"))["VARIANTS"]
    vocab = tmp / "vocab.txt"
    vocab.write_text("[PAD]\n")
    rows = []
    for task in ("mlm", "clm"):
        for variant in variants:
            spec = f"configs/{task}.py:{variant}"
            cfg = load_config(spec)
            extra = ([f"--config.data.tokenizer.path={vocab}"]
                     if cfg.data.tokenizer.kind != "sentencepiece" and not cfg.data.tokenizer.path
                     else [])
            fields = float_fields(cfg)
            workdir = tmp / "wd"
            run = refused = 0
            for name, _ in fields:
                for bad in BAD:
                    err = io.StringIO()
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                        rc = main_lib.cli(["elm_jax.main", f"--config={spec}", f"--workdir={workdir}",
                                           "--stages=data", *extra, f"--config.{name}={bad}"])
                    lines = [x for x in err.getvalue().splitlines() if x.strip()]
                    want = [f"error: config.{name}: must be finite (got {float(bad)!r})"]
                    run += 1
                    refused += int(rc == 2 and lines == want and not workdir.exists())
            rows.append({"config": spec, "float_fields": len(fields), "cases": run, "refused": refused})
    return rows


def suite_cases() -> dict[str, int]:
    """Collected test cases per bad-input test file (``pytest --collect-only -q``)."""
    out = {}
    for f in SUITE_FILES:
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", f], cwd=REPO,
                           capture_output=True, text=True, check=True)
        out[f] = sum(1 for line in p.stdout.splitlines() if "::" in line)
    return out


def render(res: dict) -> str:
    nf = res["nonfinite"]
    total = sum(r["cases"] for r in nf)
    refused = sum(r["refused"] for r in nf)
    rows = [(f"`{r['config']}`", r["float_fields"], r["cases"], r["refused"]) for r in nf]
    suite = res["suite_cases"]
    return (f"\n### {TITLE} ({res['date']})\n\nCommand: `{res['command']}`  \n"
            f"Machine: {res['machine']}\n\n"
            f"**Non-finite settings: {refused} of {total} cases refused** with the one line "
            f"`error: config.<field>: must be finite (got <value>)`, exit code 2 and no work "
            f"directory made (every float field of every variant x `nan`, `inf`, `-inf`, through "
            f"`elm_jax.main.cli`; {res['wall_s']:.0f} s). Beside them, the suite's other "
            f"bad-input cases: " + ", ".join(f"{n} in `{f}`" for f, n in suite.items())
            + f" ({sum(suite.values())} in all). Result file: `bench/results/bad_inputs.json`.\n\n"
            + markdown_table(("config", "float fields", "cases", "refused"), rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--report-only", action="store_true", help="regenerate the section from the result")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads(RESULT.read_text())
    else:
        import platform

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            nf = nonfinite_cases(Path(tmp))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        res = {"command": "python bench/bad_inputs.py", "date": datetime.date.today().isoformat(),
               "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "nonfinite": nf, "wall_s": time.perf_counter() - t0, "suite_cases": suite_cases()}
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RESULT, res)
    text = render(res)
    print(text)
    replace_section(args.out, (TITLE,), text)


if __name__ == "__main__":
    main()
