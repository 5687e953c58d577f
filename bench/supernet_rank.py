"""Does the supernet rank? Its fitness against the same architectures retrained standalone.

The search trusts the supernet's fitness (each candidate's search-split loss with the shared
weights) to order architectures as they would order after training on their own. This measures
that trust (issue 31 part 2). From a finished run's search (``--workdir``: its supernet,
teacher, data and ``search/state_<budget>.json``, whose score cache holds every scored
architecture), it picks ``--n`` architectures of one budget, ``--near`` of them within
``--near-frac`` (5%) of each other in parameters (where parameters cannot rank them) and the rest
spread over the others, each group evenly over its fitness ranks; exports each as a standalone
model (no CKA heads: the retrained model is the scored architecture) and retrains it with the
run's own retraining recipe, by the pipeline itself on a copy
(``python -m elm_jax.main --stages=export,retrain,evaluate``); and compares, on the validation
split, their retrained losses with

- the supernet's fitness: Kendall's tau and Spearman's rho (``scipy.stats``);
- ranking by parameters (more parameters, lower loss predicted): Kendall's tau of
  ``-params`` against the loss;

each with a 90% percentile bootstrap interval over architectures (``--boot`` resamples; a
resample where a ranking is constant is dropped), over all of them and over the near-equal
group alone. One JSON line per run goes to ``bench/results/supernet_rank.jsonl`` and the
"Does the supernet rank?" section of BENCHMARKS.md is rewritten from all the lines.

    python bench/supernet_rank.py --workdir DIR [--config configs/mlm.py:demo] [--set ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_run_cost import _commit  # noqa: E402  (bench/ is the script directory)
from report_util import append_jsonl, markdown_table, read_jsonl, replace_section, write_jsonl  # noqa: E402
from search_noise import UPSTREAM, copy_upstream  # noqa: E402  (what the search's successors read too)

TITLE = "Does the supernet rank?"
LOG = REPO / "bench" / "results" / "supernet_rank.jsonl"
STAGES = "export,retrain,evaluate"


def candidates(workdir: Path, budget: str | None) -> tuple[str, list[dict]]:
    """The budget (the first of the search's when ``None``) and every architecture its search
    scored that satisfies it: ``{arch_id, arch, score, params}`` from the search's state file
    (score cache and architectures) and ``result.json`` (parameters)."""
    result = json.loads((workdir / "search" / "result.json").read_text())
    name = budget or result["budget_names"][0]
    if name not in result["budgets"]:
        raise SystemExit(f"budget {name!r} is not in {workdir / 'search' / 'result.json'}")
    state = json.loads((workdir / "search" / f"state_{name}.json").read_text())
    params = {e["arch_id"]: int(e["params"]) for e in result["scored"]}
    evaluated = state.get("evaluated") or list(state["cache"])  # a state written before: the cache
    out = [{"arch_id": k, "arch": state["archs"][k], "score": float(state["cache"][k]), "params": params[k]}
           for k in dict.fromkeys(evaluated) if k in state["cache"] and np.isfinite(state["cache"][k])]
    return name, out


def _spread(items: list[dict], k: int) -> list[dict]:
    """``k`` of ``items`` evenly over their fitness ranks (best and worst included)."""
    ranked = sorted(items, key=lambda e: (e["score"], e["arch_id"]))
    if k >= len(ranked):
        return ranked
    idx = np.unique(np.round(np.linspace(0, len(ranked) - 1, k)).astype(int))
    return [ranked[i] for i in idx]


def select(items: list[dict], n: int, near: int, near_frac: float) -> tuple[list[dict], list[dict]]:
    """``near`` architectures within ``near_frac`` of each other in parameters (the window
    ``[p, (1 + near_frac) p]`` holding the most candidates, ties: the larger ``p``), spread over
    their fitness ranks, and ``n - near`` of the rest spread likewise. Deterministic."""
    if len(items) < n:
        raise SystemExit(f"the search scored {len(items)} architectures; {n} are needed")
    ps = sorted({e["params"] for e in items})
    best = max(ps, key=lambda p: (sum(p <= e["params"] <= (1 + near_frac) * p for e in items), p))
    window = [e for e in items if best <= e["params"] <= (1 + near_frac) * best]
    if len(window) < near:
        raise SystemExit(f"no {near} scored architectures lie within {near_frac:.0%} of each other in "
                         f"parameters (at most {len(window)})")
    close = _spread(window, near)
    taken = {e["arch_id"] for e in close}
    rest = _spread([e for e in items if e["arch_id"] not in taken], n - near)
    return close, rest


def _tau(x, y) -> float:
    return float(stats.kendalltau(x, y).statistic)


def rank_stats(fitness, loss, params, boot: int, seed: int = 0, early=None) -> dict:
    """Kendall's tau and Spearman's rho of the supernet's fitness against the retrained loss,
    Kendall's tau of ranking by parameters (``-params``) and, given ``early`` (each model's
    validation loss at the retraining's first evaluation), Kendall's tau of that early loss
    against the final one (``kendall_early``: how well a shorter standalone training ranks);
    each with its 90% percentile bootstrap interval over architectures."""
    f, l, p = (np.asarray(a, np.float64) for a in (fitness, loss, params))
    fns = {"kendall_fitness": lambda i: _tau(f[i], l[i]),
           "spearman_fitness": lambda i: float(stats.spearmanr(f[i], l[i]).statistic),
           "kendall_params": lambda i: _tau(-p[i], l[i])}
    if early is not None:
        e = np.asarray(early, np.float64)
        fns["kendall_early"] = lambda i: _tau(e[i], l[i])
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(l), len(l)) for _ in range(boot)]
    out = {"n": int(len(l))}
    for name, fn in fns.items():
        with warnings.catch_warnings():  # a constant resample: NaN, dropped below
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            vals = np.array([fn(i) for i in draws])
        vals = vals[np.isfinite(vals)]
        lo, hi = (np.quantile(vals, [0.05, 0.95]) if vals.size else (np.nan, np.nan))
        out[name] = {"value": fn(np.arange(len(l))), "lo": float(lo), "hi": float(hi),
                     "resamples": int(vals.size)}
    return out


def make_copy(source: Path, dest: Path, budget: str, chosen: list[dict]) -> None:
    """``dest``: the upstream stages of ``source`` and a search result whose budgets are the
    chosen architectures (``r00``, ``r01``, ...), nothing downstream."""
    copy_upstream(source, dest)  # data, teacher, supernet and the fingerprints
    fp = dest / "fingerprints.json"
    # the upstream stages' fields only (the search result here is this script's), checked without
    # --allow_config_change: a config that differs upstream (forgotten --set) is refused, never redone
    if fp.is_file():
        rec = json.loads(fp.read_text())
        rec["stages"] = {k: v for k, v in rec.get("stages", {}).items() if k in UPSTREAM}
        fp.write_text(json.dumps(rec, indent=1))
    (dest / "search").mkdir()
    budgets = {f"r{i:02d}": {"arch": e["arch"], "arch_id": e["arch_id"], "score": e["score"],
                             "latency_ms": None, "params": e["params"]} for i, e in enumerate(chosen)}
    (dest / "search" / "result.json").write_text(json.dumps(
        {"complete": True, "budget_names": list(budgets), "budgets": budgets,
         "source_budget": budget}, indent=1))


def run_one(config: str, source: Path, budget: str | None, n: int, near: int, near_frac: float,
            overrides: list[str], keep: Path | None, boot: int) -> dict:
    name, items = candidates(source, budget)
    close, rest = select(items, n, near, near_frac)
    chosen = close + rest
    tmp = Path(tempfile.mkdtemp(prefix="supernet_rank_", dir=keep))
    w = tmp / "w"
    make_copy(source, w, name, chosen)
    cmd = [sys.executable, "-u", "-m", "elm_jax.main", f"--config={config}", f"--workdir={w}",
           f"--stages={STAGES}", "--config.compile_cache_dir=none",
           "--config.export.baselines=()", "--config.export.cka_heads=False",
           "--config.export.measure_latency=False", *[f"--config.{o}" for o in overrides]]
    commit = _commit()  # the code the run starts from (a commit landing while it runs is not it)
    t0 = time.perf_counter()
    with open(tmp / "run.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {rc}; see {tmp / 'run.log'}")
    return record_of(w, chosen, len(close), config=config, overrides=overrides, source=source, budget=name,
                     candidates=len(items), near_frac=near_frac, boot=boot, commit=commit, wall=wall)


def _eval_curve(metrics: Path) -> list[list[float]]:
    """``[step, validation loss]`` of each evaluation in a retraining's ``metrics.jsonl``."""
    if not metrics.is_file():
        return []
    recs = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    return [[int(r["step"]), float(r["eval/loss"])] for r in recs if "eval/loss" in r]


def record_of(w: Path, chosen: list[dict], n_near: int, *, config: str, overrides: list[str], source: Path | str,
              budget: str, candidates: int, near_frac: float, boot: int, commit: str, wall: float,
              date: str | None = None) -> dict:
    """The JSON line of a finished copy ``w`` whose budgets ``r00``, ``r01``, ... are ``chosen``
    (the first ``n_near`` the near-equal group): each architecture's fitness, retrained loss and
    retraining curve, and the rank statistics over all and over the near group."""
    ev = json.loads((w / "evaluate" / "result.json").read_text())
    exported = json.loads((w / "export" / "result.json").read_text())
    archs = []
    for i, e in enumerate(chosen):
        m = ev["models"][f"r{i:02d}"]
        if m["params"] != e["params"]:
            raise SystemExit(f"r{i:02d}: retrained {m['params']} parameters, the search scored {e['params']}")
        archs.append({"arch_id": e["arch_id"], "describe": exported[f"r{i:02d}"]["describe"],
                      "params": e["params"], "fitness": e["score"], "retrained_loss": m["loss"],
                      "near": i < n_near,
                      "retrain_curve": _eval_curve(w / "retrain" / f"r{i:02d}_run" / "metrics.jsonl")})
    early_ok = all(len(a["retrain_curve"]) >= 2 for a in archs) and \
        len({a["retrain_curve"][0][0] for a in archs}) == 1

    def group(rows):
        return rank_stats([a["fitness"] for a in rows], [a["retrained_loss"] for a in rows],
                          [a["params"] for a in rows], boot,
                          early=[a["retrain_curve"][0][1] for a in rows] if early_ok else None)

    return {"date": date or datetime.date.today().isoformat(), "commit": commit, "config": config,
            "overrides": overrides, "source": str(source), "budget": budget,
            "candidates": candidates, "near_frac": near_frac, "archs": archs,
            "cf": next(float(v) for k, v in ev["baselines"].items() if k.endswith("_loss")),
            "all": group(archs), "near": group([a for a in archs if a["near"]]),
            "early_step": archs[0]["retrain_curve"][0][0] if early_ok else None,
            "near_params": [min(a["params"] for a in archs if a["near"]), max(a["params"] for a in archs if a["near"])],
            "process_s": round(wall, 1), "load_1m": os.getloadavg()[0], "workdir": str(w)}


def collect(line: dict, boot: int) -> dict:
    """``line`` recomputed from its finished copy (``line["workdir"]``): what a newer version of
    this script records (e.g. the retraining curves), with the line's own run facts kept."""
    w = Path(line["workdir"])
    budgets = json.loads((w / "search" / "result.json").read_text())["budgets"]
    chosen = [{"arch_id": b["arch_id"], "score": b["score"], "params": b["params"]}
              for _, b in sorted(budgets.items())]
    return {**record_of(w, chosen, sum(a["near"] for a in line["archs"]), config=line["config"],
                        overrides=line["overrides"], source=line["source"], budget=line["budget"],
                        candidates=line["candidates"], near_frac=line["near_frac"], boot=boot,
                        commit=line["commit"], wall=line["process_s"], date=line["date"]),
            "load_1m": line["load_1m"]}


def tau_cell(s: dict) -> str:
    """``tau [lo, hi]``; a ranking constant over the group (e.g. equal parameters) has none."""
    if not np.isfinite(s["value"]):
        return "- (constant over the group)"
    return f"{s['value']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]"


def early_cell(r: dict, s: dict) -> str:
    """The early-retraining tau of group ``s`` of line ``r`` with its step, or ``-``."""
    return tau_cell(s["kendall_early"]) + f" (step {r['early_step']})" if "kendall_early" in s else "-"


def render(records: list[dict]) -> str:
    rows, details = [], []
    for r in records:
        for group in ("all", "near"):
            s = r[group]
            label = (f"all {s['n']}" if group == "all" else
                     f"{s['n']} within {r['near_frac']:.0%} ({r['near_params'][0]:,}-{r['near_params'][1]:,} params)")
            rows.append([r["config"], " ".join(r["overrides"]) or "(defaults)", r["budget"], label,
                         tau_cell(s["kendall_fitness"]), tau_cell(s["spearman_fitness"]),
                         tau_cell(s["kendall_params"]), early_cell(r, s),
                         f"{r['process_s']:.0f}", r["commit"]])
        details.append(f"- `{r['config']}` {' '.join(r['overrides']) or '(defaults)'} ({r['date']}, "
                       f"cf {r['cf']:.3f}): " + "; ".join(
                           f"{a['params']:,} params fitness {a['fitness']:.4f} retrained {a['retrained_loss']:.4f}"
                           + (" (near)" if a["near"] else "") for a in sorted(r["archs"], key=lambda a: a["fitness"])))
    body = markdown_table(["config", "overrides", "budget", "architectures", "Kendall tau (fitness)",
                           "Spearman (fitness)", "Kendall tau (params)", "Kendall tau (early retrain loss)",
                           "process s", "commit"], rows)
    return (f"\n### {TITLE} ({records[-1]['date']})\n\n"
            f"Command: `python bench/supernet_rank.py --workdir DIR` (one JSON line per run in "
            f"`bench/results/supernet_rank.jsonl`; this section is written from all of them)  \n"
            f"Machine: {os.uname().machine}, {os.cpu_count()} cores; export, retrain and evaluate of the "
            f"chosen architectures on a copy of a finished run, one process, the compile cache off\n\n"
            f"The search's fitness (search-split loss with the supernet's shared weights) of architectures "
            f"it scored, against their validation loss once exported (no CKA heads) and retrained "
            f"standalone with the run's retraining recipe; beside it, ranking by parameters (more "
            f"parameters: lower loss), and each model's own validation loss at its retraining's first "
            f"evaluation (how well a short standalone training would rank). Positive: the ranking "
            f"agrees with the retrained order. "
            f"[90% bootstrap interval over architectures.]\n\n{body}\n\n"
            f"Architectures (by fitness):\n\n" + "\n".join(details) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--workdir", help="a finished work directory (supernet and search)")
    ap.add_argument("--budget", default=None, help="default: the search's first budget")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--near", type=int, default=6)
    ap.add_argument("--near-frac", type=float, default=0.05)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--set", nargs="*", default=[], help="dotted config overrides the work directory was made with")
    ap.add_argument("--keep", default=None, help="directory for the copy (default: /tmp)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--collect", default=None,
                    help="a logged run's copy (its line's workdir): recompute that line from it, in place")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = ap.parse_args()
    if args.collect:
        lines = read_jsonl(LOG)
        at = [i for i, r in enumerate(lines) if Path(r["workdir"]).resolve() == Path(args.collect).resolve()]
        if not at:
            raise SystemExit(f"no line of {LOG} has workdir {args.collect}")
        lines[at[-1]] = collect(lines[at[-1]], args.boot)
        write_jsonl(LOG, lines)
    elif not args.report_only:
        if not args.workdir:
            ap.error("--workdir is required (or --report-only)")
        if not 2 <= args.near <= args.n - 2:
            ap.error("--near must be between 2 and --n minus 2")
        rec = run_one(args.config, Path(args.workdir).resolve(), args.budget, args.n, args.near,
                      args.near_frac, list(args.set), Path(args.keep) if args.keep else None, args.boot)
        append_jsonl(LOG, rec)
        print(f"[supernet_rank] tau fitness {rec['all']['kendall_fitness']['value']:+.3f}, params "
              f"{rec['all']['kendall_params']['value']:+.3f}; near group tau fitness "
              f"{rec['near']['kendall_fitness']['value']:+.3f}; {rec['process_s']:.0f} s", flush=True)
    records = read_jsonl(LOG)
    text = render(records)
    print(text)
    replace_section(args.out, (TITLE,), text)
    if args.collect or not args.report_only:  # a line is new or changed: RESULTS.md follows it
        import results_md  # here: results_md reads this module's cells

        results_md.write()


if __name__ == "__main__":
    main()
