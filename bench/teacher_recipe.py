"""Teacher recipes, logged: train the demo teacher as a user would and record how far it gets below
the trivial answer (issue 28 part 2).

    python bench/teacher_recipe.py [--config=configs/mlm.py:demo] [--seeds 0,1,2]
        [--set teacher.train.steps=2400 data.mask_rate=0.4 ...] [--tag NAME]
    python bench/teacher_recipe.py --report-only

Each seed runs ``python -m elm_jax.main --stages=data`` and then ``--stages=teacher`` in a fresh
work directory (the teacher stage with the persistent compilation cache and the teacher cache
off, so its wall time includes a cold compile and a full training), and appends one JSON line to ``bench/results/teacher_recipe.jsonl``: the
commit, config, overrides, seed, the validation curve (``[step, loss, accuracy]`` at every
evaluation), the context-free answer ``cf`` of the same validation split (the data stage's
``baselines``), the final loss, ``gain = cf - loss`` in nats (positive: better than the trivial
answer), the teacher stage's wall time and the 1-minute load average before and after. The
"Teacher recipes" section of BENCHMARKS.md is then rewritten from all the lines: per recipe (the
resolved settings of :data:`RECIPE_FIELDS`, so a default and the same override group together),
the gain of each seed, their mean and spread (sample standard deviation) and wall times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from elm_jax.data import context_free  # noqa: E402
from report_util import append_jsonl, apply_overrides, markdown_table, read_jsonl, replace_section  # noqa: E402  (bench/ is the script directory)

TITLE = "Teacher recipes"
LOG = REPO / "bench" / "results" / "teacher_recipe.jsonl"


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def _main(workdir: Path, config: str, stages: str, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "elm_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--stages={stages}", *[f"--config.{o}" for o in overrides]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {p.returncode}")
    return time.perf_counter() - t0


def curve_of(workdir: Path) -> list[list[float]]:
    """``[step, loss, accuracy]`` of every validation evaluation in the teacher's metrics log."""
    out = []
    for line in (workdir / "teacher" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/loss" in rec:
            out.append([int(rec["step"]), float(rec["eval/loss"]), float(rec.get("eval/correct", float("nan")))])
    return out


def run_seed(config: str, seed: int, overrides: list[str], tag: str, keep: Path | None,
             cache: bool = False) -> dict:
    """One seed's line. ``cache``: the teacher stage uses the teacher cache (stores the teacher it
    trains, so a student run of the same recipe reuses it; a teacher cached already is copied
    instead of trained, and the line says ``reused``)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"teacher_recipe_{tag}_s{seed}_", dir=keep))
    ov = [*overrides, f"seed={seed}"]
    data_s = _main(tmp, config, "data", ov)
    load0 = os.getloadavg()[0]
    # timed cold: no compiled steps (and, without ``cache``, no cached teacher to reuse)
    teacher_s = _main(tmp, config, "teacher", ov + ["compile_cache_dir=none", f"teacher.cache={cache}"])
    load1 = os.getloadavg()[0]
    return record_of(tmp, config, seed, overrides, tag, data_s, teacher_s, [load0, load1])


def record_of(tmp: Path, config: str, seed: int, overrides: list[str], tag: str,
              data_s: float | None, teacher_s: float, load: list[float] | None) -> dict:
    """The line of a work directory whose data and teacher stages are done."""
    stats = json.loads((tmp / "data" / "stats.json").read_text())
    result = json.loads((tmp / "teacher" / "result.json").read_text())
    cf_rec = stats["baselines"]["validation"]
    cf = float(cf_rec[context_free.KEY[stats["task"]]])
    loss = float(result["eval"]["loss"])
    return {"date": datetime.date.today().isoformat(), "commit": _commit(), "config": config,
            "overrides": overrides, "recipe": resolved_recipe(config, overrides), "tag": tag, "seed": seed, "curve": curve_of(tmp), "cf": cf,
            "loss": loss, "gain": cf - loss, "accuracy": float(result["eval"].get("correct", float("nan"))),
            "steps": int(result["train"].get("steps", 0)) if isinstance(result.get("train"), dict) else None,
            "teacher_wall_s": teacher_s, "data_wall_s": data_s,
            "reused": bool((result.get("cache") or {}).get("reused", False)),
            "load_1m": load, "workdir": str(tmp)}


RECIPE_FIELDS = ("task", "data.corpus", "data.tokenizer.vocab_size", "data.mask_rate", "data.batch_size", "data.seq_len",
                 "teacher.model.layers", "teacher.model.hidden", "teacher.model.dropout",
                 "teacher.train.steps", "teacher.train.lr", "teacher.train.warmup_frac",
                 "teacher.train.decay_start_frac")


def resolved_recipe(config: str, overrides: list[str], commit: str | None = None,
                    fields: tuple[str, ...] = RECIPE_FIELDS) -> dict:
    """The settings that make a recipe (``fields``, default :data:`RECIPE_FIELDS`) of ``config`` with ``overrides``
    applied, so runs group by what they trained with, whether a value came from the config's
    defaults or an override. ``commit``: resolve with the config files as they were at that
    commit (for lines logged before the recipe was recorded); a field that did not exist then is
    ``None``."""
    from elm_jax.config import load_config

    path, _, variant = config.partition(":")
    if commit:
        tmp = Path(tempfile.mkdtemp(prefix="recipe_configs_"))
        archive = subprocess.run(["git", "archive", commit, "configs"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        path = str(tmp / path)
    cfg = load_config(f"{path}:{variant}" if variant else path)
    apply_overrides(cfg, overrides)
    out = {}
    for f in fields:
        node = cfg
        for part in f.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        out[f] = node
    return out


def _recipe_key(rec: dict) -> tuple:
    return tuple(sorted(rec["recipe"].items()))


def render(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(_recipe_key(r), []).append(r)
    rows, curves = [], []
    for key, recs in groups.items():
        recipe = dict(key)
        config = recs[-1]["config"]
        overrides = recs[-1]["overrides"]
        gains = [r["gain"] for r in recs]
        spread = f"{statistics.stdev(gains):.3f}" if len(gains) > 1 else "-"
        rows.append([recipe["task"], ", ".join(f"{k.split('.')[-1]}={v}" for k, v in recipe.items()
                                               if k != "task"),
                     ", ".join(f"s{r['seed']}: {r['gain']:+.3f}" for r in recs),
                     f"{statistics.mean(gains):+.3f}", spread,
                     ", ".join(f"{r['cf']:.3f}" for r in recs),
                     ", ".join(f"{r['teacher_wall_s']:.0f}" for r in recs),
                     ", ".join(f"{r['commit']}" for r in recs)])
        for r in recs:
            curves.append(f"- `{r['config']}` {' '.join(r['overrides']) or '(defaults)'}, seed {r['seed']}: "
                          + " / ".join(f"{loss:.3f}@{step}" for step, loss, _ in r["curve"])
                          + f" (cf {r['cf']:.3f}, accuracy {r['accuracy']:.3f})")
    body = markdown_table(["task", "recipe", "gain per seed (nats, cf - loss)", "mean gain", "spread (sd)",
                           "cf", "teacher stage wall s", "commit"], rows)
    return (f"\n### {TITLE} ({records[-1]['date']})\n\n"
            f"Command: `python bench/teacher_recipe.py --config=CONFIG --seeds S --set OVERRIDES` "
            f"(one JSON line per run in `bench/results/teacher_recipe.jsonl`; this section is written "
            f"from all of them)  \nMachine: {os.uname().machine}, {os.cpu_count()} cores; the teacher "
            f"stage with the compile cache off (cold compile included)\n\n"
            f"Gain = the context-free answer of the validation split minus the teacher's validation "
            f"loss (positive: it learnt more than word frequencies).\n\n{body}\n\n"
            f"Validation curves (loss@step):\n\n" + "\n".join(curves) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", nargs="*", default=[], help="dotted config overrides (without --config.)")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--keep", default=None, help="directory for the work directories (default: /tmp)")
    ap.add_argument("--cache", action="store_true",
                    help="use the teacher cache: store the teacher trained (a cached one is reused)")
    ap.add_argument("--from-workdir", default=None,
                    help="log a finished run's teacher (e.g. of a killed student run; its config and "
                         "overrides as given, one seed) instead of training one; the teacher's wall "
                         "time is its training engine's")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.from_workdir:
        wd = Path(args.from_workdir)
        result = json.loads((wd / "teacher" / "result.json").read_text())
        rec = record_of(wd, args.config, int(args.seeds), list(args.set), args.tag, None,
                        float(result["train"]["wall_time_s"]), None) | {"from_workdir": True}
        append_jsonl(LOG, rec)
    elif not args.report_only:
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            rec = run_seed(args.config, seed, list(args.set), args.tag,
                           Path(args.keep) if args.keep else None, cache=args.cache)
            append_jsonl(LOG, rec)
            print(f"[teacher_recipe] seed {seed}: loss {rec['loss']:.4f}, cf {rec['cf']:.4f}, "
                  f"gain {rec['gain']:+.4f}, teacher stage {rec['teacher_wall_s']:.0f} s", flush=True)
    records = read_jsonl(LOG)
    for r in records:  # lines logged before "recipe" (or one of its fields) was recorded: resolved at their commit
        r.setdefault("recipe", resolved_recipe(r["config"], r["overrides"], r["commit"]))
        missing = tuple(f for f in RECIPE_FIELDS if f not in r["recipe"])
        if missing:
            r["recipe"].update(resolved_recipe(r["config"], r["overrides"], r["commit"], fields=missing))
            r["recipe"] = {f: r["recipe"][f] for f in RECIPE_FIELDS}
    text = render(records)
    print(text)
    replace_section(args.out, (TITLE,), text)


if __name__ == "__main__":
    main()
