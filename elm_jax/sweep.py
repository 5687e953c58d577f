"""Sweeps: one config file, one work directory per point, one table of results.

A sweep config file (e.g. ``configs/sweep_budgets_kd.py``) defines ``get_config(arg)`` (the base
config, like ``configs/mlm.py``) and ``get_sweep(arg)``: a list of points, each a dict
``{dotted field: value}`` of overrides (big_vision style: the sweep lives in the config file)::

    python -m elm_jax.sweep run --config=configs/sweep_budgets_kd.py:test --root=ROOT \\
        [--stages=all] [--jobs=1] [--dry_run]
    python -m elm_jax.sweep collect --root=ROOT

``run`` checks every point first (each field must exist in the base config, and the overridden
config must pass :func:`elm_jax.config.validate`), then launches one
``python -m elm_jax.main --config=ROOT/<run>/config.py --workdir=ROOT/<run> --stages=...`` per
point, ``--jobs`` at a time. ``ml_collections`` command-line overrides cannot set list or dict
fields (``search.budgets`` is a list of dicts), so every point gets a generated config file,
``ROOT/<run>/config.py``: the base config plus the point's overrides, applied by
:func:`point_config`; it also reruns that point alone with the same command. The point is saved as
``ROOT/<run>/overrides.json``, the output of the run in ``ROOT/<run>/run.log`` and its exit status
in ``ROOT/<run>/sweep_run.json``; a point whose run finished with exit code 0 for the requested
stages is skipped (and a stopped run resumes, as the pipeline itself does).

The run name is derived from the overrides alone, so it is stable (adding points does not rename
runs) and filesystem-safe: ``<field>=<value>`` pairs joined by ``,``, each field shortened to its
shortest dotted suffix that is unique in the base config (``budgets``, ``supernet.kd_loss``), each
list of budgets shown by its names; whenever that is not an exact spelling of the value (lists,
dicts, characters replaced, length cut) an 8-hex hash of the overrides is appended.

``collect`` reads every run's ``overrides.json``, ``sweep_run.json`` and stage results
(``search/``, ``export/``, ``retrain/``, ``finetune/``, ``evaluate/``, ``teacher/result.json``)
into one row per (run, model) and writes ``ROOT/sweep.md`` and ``ROOT/sweep.csv``.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import csv
import dataclasses
import hashlib
import inspect
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from elm_jax import config as config_lib
from elm_jax.fileio import atomic_write_bytes, atomic_write_json
from elm_jax.pipeline import parse_stages
from elm_jax.report import fmt, load_json, markdown_table, model_results

OVERRIDES_FILE = "overrides.json"
STATUS_FILE = "sweep_run.json"
CONFIG_FILE = "config.py"
LOG_FILE = "run.log"
MAX_NAME = 120
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


class SweepError(ValueError):
    """A sweep that cannot run as written (bad field, invalid point, duplicate run, ...)."""


# ----------------------------------------------------------------------------------
# Loading a sweep and applying a point
# ----------------------------------------------------------------------------------

def _split_spec(spec: str) -> tuple[str, str | None]:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SweepError(f"sweep config file {path} does not exist")
    return os.path.abspath(path), arg or None


def load_sweep(spec: str) -> tuple[ml_collections.ConfigDict, list[dict[str, Any]]]:
    """``(base config, points)`` of ``path/to/sweep.py[:arg]``: ``get_config(arg)`` and
    ``get_sweep(arg)`` (or ``get_sweep()`` when it takes no argument)."""
    path, arg = _split_spec(spec)
    module = runpy.run_path(path)
    for fn in ("get_config", "get_sweep"):
        if not callable(module.get(fn)):
            raise SweepError(f"{path} defines no {fn}(); a sweep config file needs get_config(arg) "
                             f"and get_sweep(arg)")
    takes_arg = bool(inspect.signature(module["get_sweep"]).parameters)
    try:
        base = module["get_config"](arg)
        points = module["get_sweep"](arg) if takes_arg else module["get_sweep"]()
    except (ValueError, TypeError, KeyError) as e:
        raise SweepError(f"{path}:{arg or ''}: {e}") from None
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"{path}: get_sweep() must return a non-empty list of dicts, got {points!r}")
    for i, p in enumerate(points):
        if not isinstance(p, Mapping) or not all(isinstance(k, str) for k in p):
            raise SweepError(f"{path}: sweep point {i} must be a dict {{dotted field: value}}, got {p!r}")
    return base, [dict(p) for p in points]


def _check_literal(field: str, value: Any) -> None:
    try:
        ok = ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError):
        ok = False
    if not ok:
        raise SweepError(f"sweep field {field}: value {value!r} is not a Python literal "
                         f"(numbers, strings, booleans, None, lists, tuples, dicts of these)")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with each ``{dotted field: value}`` set. The field must exist and be a
    leaf (not a sub-config); a list given for a tuple field becomes a tuple (JSON has no tuples);
    the config's own type checks apply."""
    out = copy.deepcopy(cfg)
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = out
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise SweepError(f"sweep field {field}: config has no field "
                                 f"{'.'.join(parents[:i + 1])}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise SweepError(f"sweep field {field}: config has no such field")
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise SweepError(f"sweep field {field}: is a group of fields; override its leaves "
                             f"({', '.join(f'{field}.{k}' for k in node[leaf])})")
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise SweepError(f"sweep field {field}: {e}") from None
    return out


def point_config(source: str, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config of one sweep point: the sweep file's ``get_config(arg)`` (``source`` is
    ``path[:arg]``) with ``overrides`` applied. Used by the generated ``ROOT/<run>/config.py``."""
    path, arg = _split_spec(source)
    base = runpy.run_path(path)["get_config"](arg)
    return apply_overrides(base, overrides)


# ----------------------------------------------------------------------------------
# Run names
# ----------------------------------------------------------------------------------

def leaf_fields(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of ``cfg``."""
    out = []
    for k in cfg:
        v = cfg[k]
        name = f"{prefix}{k}"
        out += leaf_fields(v, name + ".") if isinstance(v, ml_collections.ConfigDict) else [name]
    return out


def short_field(field: str, fields: Sequence[str]) -> str:
    """The shortest dotted suffix of ``field`` that no other of ``fields`` ends with."""
    parts = field.split(".")
    others = [f for f in fields if f != field]
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if not any(f == suffix or f.endswith("." + suffix) for f in others):
            return suffix
    return field


def _name_value(v: Any) -> tuple[str, bool]:
    """``(text, exact)``: a short spelling of a value and whether it determines the value."""
    if isinstance(v, bool) or v is None:
        return str(v).lower(), True
    if isinstance(v, (int, float)):
        return repr(v), True
    if isinstance(v, str):
        return v, not any(c in v for c in ",=")
    if isinstance(v, (list, tuple)) and v and all(isinstance(b, Mapping) and "name" in b for b in v):
        return "+".join(str(b["name"]) for b in v), False  # a budget list: its names
    if isinstance(v, (list, tuple)):
        return "+".join(_name_value(x)[0] for x in v), False
    return "dict", False


def point_hash(overrides: Mapping[str, Any]) -> str:
    """8 hex digits of the canonical JSON of a point."""
    text = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def run_name(overrides: Mapping[str, Any], fields: Sequence[str]) -> str:
    """The stable, filesystem-safe name of a point (see the module docstring); ``base`` for no
    overrides. ``fields``: the base config's leaf fields (for the short field names)."""
    if not overrides:
        return "base"
    exact, parts = True, []
    for field, value in overrides.items():
        text, ok = _name_value(value)
        exact &= ok
        parts.append(f"{short_field(field, fields)}={text}")
    name = ",".join(parts)
    safe = _SAFE.sub("_", name).lstrip(".-") or "run"
    if safe != name or len(safe) > MAX_NAME:
        exact = False
    safe = safe[:MAX_NAME]
    return safe if exact else f"{safe}-{point_hash(overrides)}"


# ----------------------------------------------------------------------------------
# Planning and running
# ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: its run name, overrides, work directory and the command that runs it."""

    name: str
    overrides: dict[str, Any]
    workdir: Path
    command: tuple[str, ...]


def plan(spec: str, root: str | os.PathLike, stages: str = "all") -> list[Point]:
    """Every point of the sweep, checked before anything runs: fields exist, values are
    literals, each overridden config passes :func:`elm_jax.config.validate` for ``stages``, run
    names are unique."""
    base, points = load_sweep(spec)
    stage_list = parse_stages(stages)
    fields = leaf_fields(base)
    root = Path(root).absolute()
    out, seen = [], {}
    for i, overrides in enumerate(points):
        for field, value in overrides.items():
            _check_literal(field, value)
        name = run_name(overrides, fields)
        if name in seen:
            raise SweepError(f"sweep points {seen[name]} and {i} have the same run name {name!r} "
                             f"(identical overrides?)")
        seen[name] = i
        cfg = apply_overrides(base, overrides)
        try:
            config_lib.validate(cfg, stage_list)
        except config_lib.ConfigError as e:
            raise SweepError(f"sweep point {name}: {e}") from None
        wd = root / name
        command = (sys.executable, "-m", "elm_jax.main", f"--config={wd / CONFIG_FILE}",
                   f"--workdir={wd}", f"--stages={stages}")
        out.append(Point(name, overrides, wd, command))
    return out


def _source(spec: str) -> str:
    path, arg = _split_spec(spec)
    return path if arg is None else f"{path}:{arg}"


def config_file_text(source: str, point: Point) -> str:
    """The generated ``ROOT/<run>/config.py`` of a point."""
    return (f'"""Sweep point {point.name} of {source}, written by `python -m elm_jax.sweep run`.\n\n'
            f"Run it alone with: python -m elm_jax.main --config={point.workdir / CONFIG_FILE} "
            f"--workdir={point.workdir}\n"
            f'"""\n\n'
            f"from elm_jax.sweep import point_config\n\n"
            f"SOURCE = {source!r}\n"
            f"OVERRIDES = {point.overrides!r}\n\n\n"
            f"def get_config(arg=None):\n"
            f"    del arg  # the point is fixed\n"
            f"    return point_config(SOURCE, OVERRIDES)\n")


def _done(point: Point, stages: str) -> bool:
    status = load_json(point.workdir / STATUS_FILE)
    if status.get("returncode") != 0:
        return False
    return set(parse_stages(stages)) <= set(parse_stages(status.get("stages", "all")))


def check_owner(point: Point, source: str) -> None:
    """Refuses a run directory that holds another point (another sweep file or other overrides)."""
    existing = load_json(point.workdir / OVERRIDES_FILE)
    if existing and (existing.get("source"), existing.get("overrides")) != (
            source, json.loads(json.dumps(point.overrides))):
        raise SweepError(f"{point.workdir} holds another sweep point ({existing.get('source')}, "
                         f"{existing.get('overrides')}); use another --root or delete it")


def prepare(point: Point, source: str) -> None:
    """Writes the point's ``overrides.json`` and ``config.py`` (after :func:`check_owner`)."""
    check_owner(point, source)
    record = {"name": point.name, "source": source, "overrides": point.overrides}
    atomic_write_json(point.workdir / OVERRIDES_FILE, record)
    atomic_write_bytes(point.workdir / CONFIG_FILE, config_file_text(source, point).encode())


def execute(point: Point, stages: str, stream: bool) -> dict[str, Any]:
    """Runs the point's command (output to ``run.log``, and to stdout when ``stream``) and
    writes ``sweep_run.json``; returns that record."""
    t0 = time.time()
    with open(point.workdir / LOG_FILE, "wb") as log:
        proc = subprocess.Popen(point.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        while chunk := proc.stdout.read1(65536):  # bytes as they come (keeps progress bars)
            log.write(chunk)
            log.flush()
            if stream:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        rc = proc.wait()
    record = {"name": point.name, "returncode": rc, "stages": stages, "command": list(point.command),
              "wall_s": round(time.time() - t0, 3), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(point.workdir / STATUS_FILE, record)
    return record


def run_sweep(spec: str, root: str | os.PathLike, stages: str = "all", jobs: int = 1,
              dry_run: bool = False) -> int:
    """Plans the sweep, prints one line per point (its command), and unless ``dry_run`` runs the
    points not complete yet, ``jobs`` at a time. Returns 0 when every point succeeded, else 1."""
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1 (got {jobs})")
    points = plan(spec, root, stages)
    source = _source(spec)
    todo = []
    print(f"[sweep] {len(points)} point(s) of {source} under {Path(root).absolute()}")
    for p in points:
        check_owner(p, source)
        done = _done(p, stages)
        print(f"[sweep] {p.name}: {json.dumps(p.overrides)}{'  (complete: skipped)' if done else ''}")
        print("  " + shlex.join(p.command))
        if not done:
            todo.append(p)
    if dry_run:
        return 0
    for p in todo:
        prepare(p, source)
    results = []
    if jobs == 1:
        for p in todo:
            print(f"[sweep] running {p.name}", flush=True)
            results.append(execute(p, stages, stream=True))
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(execute, p, stages, False): p for p in todo}
            for f in concurrent.futures.as_completed(futures):
                r = f.result()
                print(f"[sweep] {r['name']}: exit {r['returncode']} after {r['wall_s']:.0f} s "
                      f"(log: {futures[f].workdir / LOG_FILE})", flush=True)
                results.append(r)
    failed = [r["name"] for r in results if r["returncode"] != 0]
    print(f"[sweep] ran {len(results)}, skipped {len(points) - len(todo)}, failed {len(failed)}"
          + (f": {', '.join(failed)} (see their {LOG_FILE})" if failed else "")
          + f"; table: python -m elm_jax.sweep collect --root={root}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------
# Collecting
# ----------------------------------------------------------------------------------

RESULT_COLUMNS = ("model", "kind", "architecture", "params", "search loss", "val loss (inherited)",
                  "val loss (retrained)", "perplexity", "polarity test acc.", "teacher val loss")


def show_value(v: Any) -> str:
    """A compact, table-safe spelling of an override value (budgets as ``name(bound=value)``)."""
    if isinstance(v, (list, tuple)) and v and all(isinstance(b, Mapping) and "name" in b for b in v):
        text = "; ".join(f"{b['name']}(" + ", ".join(f"{k}={fmt(x)}" for k, x in b.items() if k != "name")
                         + ")" for b in v)
    elif isinstance(v, (str, int, float, bool)) or v is None:
        text = fmt(v)
    else:
        text = json.dumps(v, separators=(",", ":"))
    return text.replace("|", "/")


def _csv_value(v: Any) -> Any:
    """Strings and numbers as they are, anything else as JSON."""
    return v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v)


def _status(run_dir: Path) -> str:
    s = load_json(run_dir / STATUS_FILE)
    if not s:
        return "not run"
    return f"done ({s.get('stages')})" if s.get("returncode") == 0 else f"failed (exit {s.get('returncode')})"


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One dict per model of a run (keys :data:`RESULT_COLUMNS`, raw values, ``None`` = missing);
    a run without any model yet gives one row with only the teacher."""
    search = load_json(run_dir / "search" / "result.json").get("budgets", {})
    export = load_json(run_dir / "export" / "result.json")
    retrain = load_json(run_dir / "retrain" / "result.json")
    finetune = load_json(run_dir / "finetune" / "result.json")
    evaluate = model_results(load_json(run_dir / "evaluate" / "result.json"))
    teacher = evaluate.get("teacher", {}).get("loss")
    if teacher is None:
        teacher = load_json(run_dir / "teacher" / "result.json").get("eval", {}).get("loss")
    names = list(dict.fromkeys([*export, *search, *retrain, *finetune, *evaluate]))
    names = [n for n in names if n != "teacher"]
    rows = []
    for n in names:
        e, s = export.get(n, {}), search.get(n, {})
        ev, rt, ft = evaluate.get(n, {}), retrain.get(n, {}), finetune.get(n, {})
        rows.append({"model": n, "kind": e.get("kind", "found" if s else None),
                     "architecture": e.get("describe", s.get("describe")),
                     "params": e.get("params", s.get("params")), "search loss": s.get("score"),
                     "val loss (inherited)": rt.get("before", {}).get("loss"),
                     "val loss (retrained)": ev.get("loss", rt.get("after", {}).get("loss")),
                     "perplexity": ev.get("perplexity", rt.get("after", {}).get("perplexity")),
                     "polarity test acc.": ft.get("test_accuracy"), "teacher val loss": teacher})
    return rows or [{"model": None, "teacher val loss": teacher}]


def collect(root: str | os.PathLike) -> str:
    """Writes ``ROOT/sweep.md`` and ``ROOT/sweep.csv`` (one row per run and model: run, status,
    one column per swept field, the results) and returns the markdown."""
    root = Path(root)
    if not root.is_dir():
        raise SweepError(f"{root} is not a directory")
    runs = sorted(p.parent for p in root.glob(f"*/{OVERRIDES_FILE}"))
    if not runs:
        raise SweepError(f"{root} holds no sweep runs (no */{OVERRIDES_FILE}); run "
                         f"`python -m elm_jax.sweep run --root={root} ...` first")
    points = {r: load_json(r / OVERRIDES_FILE) for r in runs}
    fields = list(dict.fromkeys(f for p in points.values() for f in p.get("overrides", {})))
    header = ["run", "status", *fields, *RESULT_COLUMNS]
    md_rows, csv_rows = [], []
    for r in runs:
        ov = points[r].get("overrides", {})
        status = _status(r)
        for row in run_rows(r):
            values = [row.get(c) for c in RESULT_COLUMNS]
            arch = values[2]
            md_rows.append([r.name, status, *(show_value(ov[f]) if f in ov else "-" for f in fields),
                            *values[:2], None if arch is None else f"`{arch}`", *values[3:]])
            csv_rows.append([r.name, status, *(_csv_value(ov[f]) if f in ov else None for f in fields),
                             *values])
    sources = sorted({p.get("source", "?") for p in points.values()})
    intro = f"Config: {', '.join(sources)}; {len(runs)} run(s)."
    text = "\n".join([f"# elm-jax sweep: {root}", "", intro, "", *markdown_table(header, md_rows)]) + "\n"
    atomic_write_bytes(root / "sweep.md", text.encode())
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in csv_rows])
    atomic_write_bytes(root / "sweep.csv", buf.getvalue().encode())
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m elm_jax.sweep run|collect ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m elm_jax.sweep",
                                     description="Run a sweep of elm-jax pipelines and collect the results.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every point of a sweep config file in ROOT/<run>")
    run.add_argument("--config", required=True, help="sweep config file[:arg] (get_config, get_sweep)")
    run.add_argument("--root", required=True, help="directory for the runs' work directories")
    run.add_argument("--stages", default="all", help="the pipeline stages of every run (as elm_jax.main)")
    run.add_argument("--jobs", type=int, default=1, help="runs at a time")
    run.add_argument("--dry_run", action="store_true", help="print the points and commands only")
    col = sub.add_parser("collect", help="collect the results of ROOT's runs into ROOT/sweep.md and .csv")
    col.add_argument("--root", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return run_sweep(args.config, args.root, args.stages, args.jobs, args.dry_run)
        print(collect(args.root), end="")
        return 0
    except (SweepError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
