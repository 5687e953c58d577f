"""RESULTS.md, written from the committed result logs: does the search earn its keep?

Every figure and every sentence that states a finding is computed here from the JSON lines in
``bench/results/`` (issue 31 part 5), never typed: rerun this script after a new line lands.

- ``student_recipe.jsonl``: full pipeline runs. The runs whose resolved recipe equals the demo
  config's defaults are *the demo* (one row per seed, the latest line of each seed); the others
  are recipes tried on the way (what they changed is read from the recipe they logged).
- ``supernet_rank.jsonl``: the supernet's fitness against the same architectures retrained.
- ``search_noise.jsonl``: the search's fitness noise against its number of batches.
- ``search_recipe.jsonl``: full runs that change one thing of the search or the supernet, each
  read against the demo run of its seed (what makes the found model lose).
- ``rerank_rule.jsonl``: the re-ranking rule re-applied at other tie levels to the short
  trainings of a logged run (``bench/rerank_rule.py``).

Reading a comparison: ``found vs X`` is X's validation loss minus the found model's (nats; positive:
the found model is better), with the 90% paired bootstrap interval over validation batches of
the evaluate stage. Its verdict: *better* when the interval lies above 0, *worse* below, else
*inside the noise*. That interval covers the evaluation's noise, not a rerun's: the spread over
seeds is the table itself.

    python bench/results_md.py [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report_util import markdown_table, read_jsonl  # noqa: E402  (bench/ is the script directory)
from student_recipe import RECIPE_FIELDS  # noqa: E402
from supernet_rank import early_cell, tau_cell  # noqa: E402
from teacher_recipe import resolved_recipe  # noqa: E402

RESULTS = REPO / "bench" / "results"
OUT = REPO / "RESULTS.md"
DEMOS = {"mlm": "configs/mlm.py:demo", "clm": "configs/clm.py:demo"}
BASELINES = (("matched", "baseline_matched", "bert"), ("largest", "baseline_largest", "bert"),
             ("random", "random_best", None))


def verdict(v: dict | None) -> str:
    """*better* / *worse* / *inside the noise* for a ``versus`` entry (interval of the found
    model's advantage), ``-`` when absent."""
    if not v:
        return "-"
    return "better" if v["lo"] > 0 else "worse" if v["hi"] < 0 else "inside the noise"


def meets_search_target(v: dict | None) -> bool | None:
    """Issue 31's bar against a baseline: the interval of baseline minus found above 0, or
    containing 0 with the found model's mean ahead."""
    return None if not v else bool(v["lo"] > 0 or (v["hi"] >= 0 and v["gain"] > 0))


def default_recipe(task: str) -> dict:
    """The demo config's recipe (:data:`student_recipe.RECIPE_FIELDS`) as a logged line holds it
    (JSON values: a tuple is a list)."""
    path, _, variant = DEMOS[task].partition(":")
    return json.loads(json.dumps(resolved_recipe(f"{REPO / path}:{variant}", [], fields=RECIPE_FIELDS)))


# The value a logged line that lacks a field ran with, where the field's default has changed since
# it was added to the recipe (a line without it ran one architecture per device).
LEGACY_VALUES = {"supernet.paths_per_device": 1}


def changed_fields(recipe: dict, defaults: dict) -> dict:
    """The fields of a logged ``recipe`` that differ from ``defaults``. A field the line lacks (it
    was added to the recipe after the line was logged, when no run had changed it) counts as its
    default, or as its :data:`LEGACY_VALUES` value where the default has changed since."""
    full = {**recipe, **{k: v for k, v in LEGACY_VALUES.items() if k in defaults and k not in recipe}}
    return {k: v for k, v in full.items() if defaults.get(k) != v}


def departed_from(r: dict, student: Sequence[dict], demo: dict[str, list[dict]]) -> dict | None:
    """The run a recipe line ``r`` departs from: the run whose work directory it reused; else the
    latest full run of its task and seed whose recipe differs from its own only in the fields its
    overrides set; else the demo run of its seed at today's defaults."""
    if r.get("reused"):
        return next((d for d in reversed(list(student)) if d.get("workdir") == r["reused"]), None)
    task, set_by_r = r["recipe"].get("task"), {o.split("=")[0] for o in r.get("overrides", [])}
    for d in reversed(list(student)):
        if (d is not r and d["recipe"].get("task") == task and d["seed"] == r["seed"] and not d.get("reused")
                and not d.get("host_devices") and set(changed_fields(r["recipe"], d["recipe"])) <= set_by_r
                and set(changed_fields(d["recipe"], r["recipe"])) <= set_by_r):
            return d
    return next((d for d in demo.get(task, []) if d["seed"] == r["seed"]), None)


def split_runs(records: list[dict]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Per task, the latest line of each seed at that task's demo defaults (by seed); and every
    other line."""
    demo: dict[str, dict[int, dict]] = {}
    other = []
    defaults = {t: default_recipe(t) for t in DEMOS}
    for r in records:
        task = r["recipe"].get("task")
        if (task in defaults and not changed_fields(r["recipe"], defaults[task]) and not r.get("reused")
                and not r.get("host_devices")):
            demo.setdefault(task, {})[int(r["seed"])] = r
        else:
            other.append(r)
    return {t: [runs[s] for s in sorted(runs)] for t, runs in demo.items()}, other


def _by_kind(r: dict, kind: str, family: str | None) -> tuple[str, dict] | None:
    for name, m in r["models"].items():
        if m.get("kind") == kind and (family is None or name.endswith(f"_{family}")):
            return name, m
    return None


def _found(r: dict) -> tuple[str, dict]:
    return next((n, m) for n, m in r["models"].items() if m.get("kind") == "found")


def _vs(r: dict, found: str, other: str) -> dict | None:
    return (r.get("versus") or {}).get(found, {}).get(other)


def _vs_cell(v: dict | None, unpaired: float | None = None) -> str:
    if v:
        return f"{v['gain']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}] {verdict(v)}"
    return f"{unpaired:+.3f} (unpaired)" if unpaired is not None else "-"


def _arch(r: dict, name: str) -> str:
    d = (r.get("archs") or {}).get(name)
    return f"`{d}` " if d else ""


def _polarity(r: dict, found: str) -> dict:
    ft = (r.get("finetune") or {}).get(found) or {}
    comp = ft.get("comparisons") or {}
    out = {"acc": ft.get("mean_test_accuracy"), "scratch": ft.get("scratch_test_accuracy"),
           "vs_scratch": comp.get("pretrained_minus_scratch"), "vs_bow": comp.get("minus_bag_of_words")}
    out["bow"] = (out["acc"] - out["vs_bow"]["diff"]) if out["vs_bow"] and out["acc"] is not None else None
    return out


def _diff_cell(c: dict | None) -> str:
    return f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" if c else "-"


def demo_table(runs: list[dict], task: str) -> str:
    header = ["seed", "commit", "teacher gain", "found (params)", "found gain"]
    header += [f"vs {label} {fam or ''}".strip() for label, _, fam in BASELINES]
    header += ["search sd / SE"]
    if task == "mlm":
        header += ["polarity found / scratch / BoW", "pretrained - scratch", "found - BoW"]
    rows = []
    for r in runs:
        fname, f = _found(r)
        row = [str(r["seed"]), r["commit"], f"{r['teacher_gain']:+.3f}",
               f"{_arch(r, fname)}{f['params']:,}", f"{f['gain_nats']:+.3f}"]
        for _, kind, fam in BASELINES:
            b = _by_kind(r, kind, fam)
            row.append("-" if b is None else
                       f"{_arch(r, b[0])}{b[1]['params']:,}: {_vs_cell(_vs(r, fname, b[0]), f['gain_nats'] - b[1]['gain_nats'])}")
        s = (r.get("search") or {}).get(fname) or {}
        row.append(f"{s['noise_ratio']:.1f}x" if s.get("noise_ratio") else "-")
        if task == "mlm":
            p = _polarity(r, fname)
            row.append(" / ".join("-" if x is None else f"{x:.3f}" for x in (p["acc"], p["scratch"], p["bow"])))
            row += [_diff_cell(p["vs_scratch"]), _diff_cell(p["vs_bow"])]
        rows.append(row)
    return markdown_table(header, rows)


def _count(items, pred) -> int:
    return sum(1 for x in items if pred(x))


def demo_findings(runs: list[dict], task: str) -> list[str]:
    """The sentences that state what the demo runs show, each computed from them."""
    n = len(runs)
    gains = [_found(r)[1]["gain_nats"] for r in runs]
    bar = 0.5 if task == "mlm" else 1.0
    span = f"{gains[0]:+.3f}" if n == 1 else f"{min(gains):+.3f} to {max(gains):+.3f}"
    out = [f"The found model learns: its validation loss is {span} nats "
           f"below the context-free answer over {n} seed(s) (bar {bar}: met on "
           f"{_count(gains, lambda g: g >= bar)} of {n})."]
    for label, kind, fam in BASELINES:
        vs = []
        for r in runs:
            fname = _found(r)[0]
            b = _by_kind(r, kind, fam)
            vs.append(_vs(r, fname, b[0]) if b else None)
        paired = [v for v in vs if v]
        if not paired:
            continue
        name = {"matched": "the size-matched uniform BERT", "largest": "the largest uniform BERT under the budget",
                "random": "the best of a random search with as many evaluations"}[label]
        words = {w: _count(paired, lambda v, w=w: verdict(v) == w) for w in ("better", "worse", "inside the noise")}
        line = (f"Against {name}, the found model is better on {words['better']}, worse on {words['worse']} "
                f"and inside the noise on {words['inside the noise']} of the {len(paired)} seed(s) with a paired "
                f"interval (mean advantage {sum(v['gain'] for v in paired) / len(paired):+.3f} nats)")
        if label in ("matched", "random"):
            line += (f"; issue 31's bar (not worse, or inside the noise with the found model ahead) is met on "
                     f"{_count(paired, meets_search_target)} of {len(paired)}")
        out.append(line + ".")
    ratios = [s["noise_ratio"] for r in runs for s in (r.get("search") or {}).values() if s.get("noise_ratio")]
    if ratios:
        span = f"{ratios[0]:.1f}x" if len(ratios) == 1 else f"{min(ratios):.1f}x to {max(ratios):.1f}x"
        out.append(f"The search's population spread is {span} its fitness "
                   f"standard error (5x: it ranks signal; met on {_count(ratios, lambda x: x >= 5)} of {len(ratios)}).")
    if task == "mlm":
        pol = [_polarity(r, _found(r)[0]) for r in runs]
        sc = [p["vs_scratch"] for p in pol if p["vs_scratch"]]
        bw = [p["vs_bow"] for p in pol if p["vs_bow"]]
        if sc:
            out.append(f"Pre-training helps polarity (pretrained minus scratch, interval above 0) on "
                       f"{_count(sc, lambda c: c['lo'] > 0)} of {len(sc)} seed(s); the interval lies below 0 on "
                       f"{_count(sc, lambda c: c['hi'] < 0)}.")
        if bw:
            out.append(f"The found model is within 3 points of bag-of-words or above it (interval of found "
                       f"minus bag-of-words above -0.03) on {_count(bw, lambda c: c['lo'] > -0.03)} of {len(bw)}.")
    return out


def other_table(records: list[dict]) -> str:
    defaults = {t: default_recipe(t) for t in DEMOS}
    rows = []
    for r in records:
        task = r["recipe"].get("task")
        changed = changed_fields(r["recipe"], defaults.get(task, {}))
        what = ", ".join([*(f"{k}={v}" for k, v in changed.items()),
                          *([f"on {r['host_devices']} CPU devices"] if r.get("host_devices") else [])]
                         ) or "(recipe at the defaults)"
        if r.get("reused"):
            what += f"; only {r.get('stages')}"
        fname, f = _found(r)
        m = _by_kind(r, "baseline_matched", "bert")
        rows.append([r.get("tag", "-"), task, what, str(r["seed"]), r["commit"], f"{_arch(r, fname)}{f['params']:,}",
                     f"{f['gain_nats']:+.3f}", "-" if m is None else
                     f"{m[1]['params']:,}: {_vs_cell(_vs(r, fname, m[0]), f['gain_nats'] - m[1]['gain_nats'])}"])
    return markdown_table(["tag", "task", "differs from today's demo", "seed", "commit", "found (params)",
                           "found gain", "vs matched BERT"], rows)


def _arch_table(r: dict) -> str:
    """The architectures of one supernet-rank run, by retrained loss, with both ranks."""
    fit = sorted(a["fitness"] for a in r["archs"])
    ret = sorted(a["retrained_loss"] for a in r["archs"])
    return markdown_table(
        ["architecture", "params", "fitness", "retrained loss", "fitness rank", "retrained rank", "near"],
        [[f"`{x['describe']}`", f"{x['params']:,}", f"{x['fitness']:.4f}", f"{x['retrained_loss']:.4f}",
          str(1 + fit.index(x["fitness"])), str(1 + ret.index(x["retrained_loss"])), "yes" if x["near"] else ""]
         for x in sorted(r["archs"], key=lambda a: a["retrained_loss"])])


def _families(describe: str) -> list[str]:
    """The family of each active layer of an architecture's ``describe`` (``b0h4 - m2h1 -``)."""
    names = {"b": "bert", "m": "mobilebert"}
    return [names[t[0]] for t in describe.split() if t != "-" and t[0] in names and t[1:2].isdigit()]


def _by_end_family(archs: list[dict]) -> str:
    """The mean retrained loss of the architectures grouped by the family of their first and of
    their last active layer: where in the stack a family sits, which the fitness may not see."""
    out = []
    for which, idx in (("first", 0), ("last", -1)):
        groups: dict[str, list[float]] = {}
        for a in archs:
            fams = _families(a["describe"])
            if fams:
                groups.setdefault(fams[idx], []).append(a["retrained_loss"])
        out.append(f"{which} layer " + ", ".join(
            f"{f} {np.mean(v):.4f} (n={len(v)})" for f, v in sorted(groups.items())))
    return "; ".join(out)


def rank_section(records: list[dict]) -> str:
    if not records:
        return ("Not measured yet: `python bench/supernet_rank.py --workdir DIR` on a finished demo run "
                "writes `bench/results/supernet_rank.jsonl`.\n")
    rows, lines = [], []
    for r in records:
        for group in ("all", "near"):
            s = r[group]
            label = f"all {s['n']}" if group == "all" else f"{s['n']} within {r['near_frac']:.0%} in parameters"
            cells = [tau_cell(s[k]) for k in ("kendall_fitness", "spearman_fitness", "kendall_params")]
            cells.append(early_cell(r, s))
            rows.append([r["config"], str(r["source"]).split("/")[-2] if "/" in str(r["source"]) else r["source"],
                         label, *cells, r["commit"]])
        a, p = r["all"]["kendall_fitness"], r["all"]["kendall_params"]
        ranks = ("ranks the retrained models better than their parameter counts do" if a["lo"] > p["hi"] else
                 "ranks them worse than their parameter counts do" if a["hi"] < p["lo"] else
                 "is not distinguishable from ranking them by parameter count")
        near = r["near"]["kendall_fitness"]
        close = [x for x in r["archs"] if x["near"]]
        fspan = max(x["fitness"] for x in close) - min(x["fitness"] for x in close)
        rspan = max(x["retrained_loss"] for x in close) - min(x["retrained_loss"] for x in close)
        lines.append(f"On the run of commit {r['commit']} the supernet's fitness {ranks} (Kendall tau "
                     f"{a['value']:+.2f} against {p['value']:+.2f}); among architectures within "
                     f"{r['near_frac']:.0%} in parameters its tau is {near['value']:+.2f} "
                     f"[{near['lo']:+.2f}, {near['hi']:+.2f}]"
                     + (", above 0" if near["lo"] > 0 else ", an interval that includes 0" if near["hi"] >= 0
                        else ", below 0")
                     + f"; their fitness spans {fspan:.4f} nats, their retrained loss {rspan:.4f}.")
        lines.append(f"Mean retrained loss by the family of the {_by_end_family(r['archs'])}.")
        if "kendall_early" in r["all"]:
            e = r["all"]["kendall_early"]
            lines.append(f"Each model's own validation loss at step {r['early_step']} of its retraining ranks "
                         f"the final losses with tau {e['value']:+.2f} [{e['lo']:+.2f}, {e['hi']:+.2f}]"
                         + (", better than the supernet's fitness does (intervals apart)" if e["lo"] > a["hi"]
                            else ", an interval that overlaps the fitness's") + ".")
    return (markdown_table(["config", "source run", "architectures", "Kendall tau (fitness)",
                            "Spearman (fitness)", "Kendall tau (params)", "Kendall tau (early retrain loss)",
                            "commit"], rows)
            + "\n\n" + "\n".join(f"- {x}" for x in lines) + "\n\n"
            + "The architectures of the latest run, by retrained loss (rank 1: the lowest):\n\n"
            + _arch_table(records[-1]) + "\n")


def noise_section(records: list[dict]) -> str:
    if not records:
        return "Not measured.\n"
    rows = []
    for r in sorted(records, key=lambda r: r["eval_batches"]):
        for b, s in r["budgets"].items():
            rows.append([r["source"].split("/")[-2], str(r["eval_batches"]), b,
                         f"{s['ratio']:.1f}x", s.get("describe", "-"), r["commit"]])
    return markdown_table(["source run", "search batches", "budget", "sd / paired SE", "best", "commit"], rows) + "\n"


#: Config sections a search recipe changes (an override under one is shown even where the line's
#: recipe predates its field).
SEARCH_RECIPE_PREFIXES = ("space.", "supernet.", "search.", "retrain.", "export.cka")


def search_recipe_table(records: list[dict], demo: dict[str, list[dict]], student: Sequence[dict] = ()) -> str:
    """One row per ``search_recipe.jsonl`` line: what it changed from the demo, its found model
    against the size-matched BERT and the random search's best (paired), beside the run it departs
    from (:func:`departed_from`, among the ``student`` lines), so each change reads against it."""
    defaults = {t: default_recipe(t) for t in DEMOS}
    rows = []
    for r in records:
        task = r["recipe"].get("task")
        changed = changed_fields(r["recipe"], defaults.get(task, {}))
        fname, f = _found(r)
        cells = []
        for kind, fam in (("baseline_matched", "bert"), ("random_best", None)):
            b = _by_kind(r, kind, fam)
            cells.append("-" if b is None else _vs_cell(_vs(r, fname, b[0]), f["gain_nats"] - b[1]["gain_nats"]))
        base = departed_from(r, student, demo)
        ref = "-"
        if base is not None:
            bname, bf = _found(base)
            m = _by_kind(base, "baseline_matched", "bert")
            ref = f"{base.get('tag', '-')}: {_arch(base, bname)}{bf['gain_nats']:+.3f}; vs matched " + (
                "-" if m is None else _vs_cell(_vs(base, bname, m[0]), bf["gain_nats"] - m[1]["gain_nats"]))
        # an override of the model or search the line's recipe predates (not an evaluation setting)
        unrecorded = [o for o in r.get("overrides", []) if o.split("=")[0] not in r["recipe"]
                      and o.split("=")[0].startswith(SEARCH_RECIPE_PREFIXES) and not o.startswith("search.random_control")]
        what = ", ".join([*(f"{k}={v}" for k, v in changed.items()), *unrecorded,
                          *([f"on {r['host_devices']} CPU devices"] if r.get("host_devices") else [])]) or "(none)"
        if r.get("reused"):
            what += f"; only {r.get('stages')}, on the earlier stages of the demo run"
        rows.append([r.get("tag", "-"), task, what,
                     str(r["seed"]), r["commit"], f"{_arch(r, fname)}{f['params']:,}", f"{f['gain_nats']:+.3f}",
                     *cells, ref])
    return markdown_table(["tag", "task", "differs from today's demo", "seed", "commit", "found (params)",
                           "found gain", "vs matched BERT", "vs random", "the run it departs from: found gain"],
                          rows)


def first_family_finding(records: Sequence[dict]) -> str | None:
    """Over every logged run whose found architecture is recorded (one per set of models: a rerun
    of the last stages on the same models counts once), the found model's advantage over the
    size-matched BERT (matched loss minus found; negative: the found model loses), grouped by
    the family of the found model's first active layer."""
    seen, groups = set(), {}
    for r in records:
        fname, f = _found(r)
        d = (r.get("archs") or {}).get(fname)
        m = _by_kind(r, "baseline_matched", "bert")
        if not d or m is None or not _families(d):
            continue
        key = (d, round(f["gain_nats"], 4), round(m[1]["gain_nats"], 4))  # a rerun of evaluate: equal to 1e-4
        if key in seen:
            continue
        seen.add(key)
        groups.setdefault(_families(d)[0], []).append(f["gain_nats"] - m[1]["gain_nats"])
    if not groups:
        return None
    return ("Over every logged run with its found architecture recorded (each set of models once), the "
            "found model's advantage over the size-matched BERT by the family of its first active layer: "
            + "; ".join(f"{fam} mean {np.mean(v):+.3f} nats, range {min(v):+.3f} to {max(v):+.3f} (n={len(v)})"
                        for fam, v in sorted(groups.items())) + ".")


def rerank_rule_section(lines: Sequence[dict]) -> str:
    """One row per (line, tie level, side) of ``rerank_rule.jsonl``: which candidate the rule picks,
    whether that is the run's own pick and the fitness's, and every candidate's short loss with its
    paired standard error against the lowest (``*``: tied with the lowest)."""
    rows = []
    for r in lines:
        for level, budgets in sorted(r["levels"].items(), key=lambda kv: float(kv[0])):
            for budget, sides in budgets.items():
                for side, x in sides.items():
                    cands = ", ".join(f"`{c['describe']}` {c['short_loss']:.4f} ± {c['short_se']:.4f}"
                                      + ("*" if c["tied"] else "") for c in x["candidates"])
                    rows.append([r["source"], str(r["seed"]), f"{float(level):g}", f"{budget} {side}",
                                 f"`{x['describe']}`", "yes" if x["same_as_run"] else "no",
                                 "yes" if x["pick"] == x["fitness_best"] else "no", cands])
    return markdown_table(["run", "seed", "tie level", "search", "pick", "the run's pick", "the fitness's pick",
                           "candidates in fitness order: short loss ± paired SE (* tied)"], rows)


def rerank_rule_findings(lines: Sequence[dict], search: Sequence[dict], demo: dict[str, list[dict]],
                         student: Sequence[dict] = ()) -> list[str]:
    """Where the rule, re-applied, picks for a found model another architecture that the demo run
    the re-ranked run was copied from already retrained from the same supernet, that run's verdict
    against the size-matched BERT, and its loss against the re-ranked random control's (unpaired:
    two runs) where the rule keeps the control: the pick's result without training it again."""
    out = []
    for r in lines:
        tag = r["source"].split(":", 1)[-1]
        src = next((x for x in reversed(list(search)) if x.get("tag") == tag and x["seed"] == r["seed"]
                    and x.get("workdir") == r["workdir"]), None)
        if src is None:
            continue
        runs = [d for d in [*student, *demo.get(src["recipe"].get("task"), [])]
                if d.get("workdir") == src.get("reused")][:1]
        rnd = _by_kind(src, "random_best", None)
        for level, budgets in sorted(r["levels"].items(), key=lambda kv: float(kv[0])):
            for sides in budgets.values():
                x = sides.get("found")
                if x is None or x["same_as_run"]:
                    continue
                for run in runs:
                    fname, f = _found(run)
                    if (run.get("archs") or {}).get(fname) != x["describe"]:
                        continue
                    m = _by_kind(run, "baseline_matched", "bert")
                    vs_m = "-" if m is None else _vs_cell(_vs(run, fname, m[0]))
                    vs_r = "-"
                    if rnd is not None and (sides.get("random") or {}).get("same_as_run") \
                            and "loss" in f and "loss" in rnd[1]:
                        vs_r = f"{rnd[1]['loss'] - f['loss']:+.4f} (unpaired: two runs)"
                    out.append(f"At tie level {float(level):g} the rule picks `{x['describe']}` for seed "
                               f"{r['seed']}'s {tag} run (it picked `{_arch_name(src)}`); the demo run of this "
                               f"seed retrained that architecture from the same supernet: vs matched BERT "
                               f"{vs_m}; vs the re-ranked random control {vs_r}.")
                    break
    return out


def _arch_name(r: dict) -> str:
    fname, _ = _found(r)
    return (r.get("archs") or {}).get(fname, "?")


def render(student: list[dict], rank: list[dict], noise: list[dict], search: Sequence[dict] = (),
           rule: Sequence[dict] = ()) -> str:
    demo, other = split_runs(student)
    parts = ["# Results: does the search earn its keep?\n",
             "Written by `python bench/results_md.py` from the committed JSON lines in `bench/results/`; "
             "do not edit by hand. Every run ran on a 2-core x86-64 CPU with the models of the `demo` "
             "configs (a 4 x 192 BERT teacher trained here; supernets of 4 layers x 128, BERT and "
             "MobileBERT blocks; budget `small`). The commit beside each row is the code the run started from.\n",
             "Gain: the context-free answer of the validation split minus the model's validation loss "
             "(nats). `vs X`: X's validation loss minus the found model's, with its 90% paired interval "
             "over validation batches and the verdict *better*, *worse* or *inside the noise* (an "
             "unpaired difference where the run predates the paired comparison). The interval is the "
             "evaluation's noise only; the seeds show a rerun's.\n"]
    for task, title in (("mlm", "MLM demo (`configs/mlm.py`) at its defaults"),
                        ("clm", "CLM demo (`configs/clm.py`) at its defaults")):
        runs = demo.get(task, [])
        parts.append(f"## {title}\n")
        if not runs:
            parts.append("No run at today's defaults is logged yet; see the recipes below.\n")
            continue
        parts.append(demo_table(runs, task) + "\n")
        parts.append("\n".join(f"- {s}" for s in demo_findings(runs, task)) + "\n")
    parts.append("## What makes the found model lose?\n")
    parts.append("Runs (`python bench/student_recipe.py --log search_recipe --set ...`, lines in "
                 "`bench/results/search_recipe.jsonl`) that change one thing of the search or the supernet "
                 "(issue 31 part 3), each against its own size-matched BERT and random search, beside the "
                 "run it departs from: the run whose earlier stages it reused, or the run of its seed at "
                 "its recipe without its overrides.\n")
    parts.append(search_recipe_table(list(search), demo, student) + "\n" if search else "None logged yet.\n")
    finding = first_family_finding([*student, *search])
    if finding:
        parts.append(f"- {finding}\n")
    if rule:
        parts.append("### The re-ranking rule at other tie levels\n")
        parts.append("`python bench/rerank_rule.py --tag TAG --seed S` re-applies the rule of "
                     "`search.rerank_top` (`elm_jax/search/rerank.py`) to the short trainings a logged run "
                     "made, without training again: at tie level 0 the lowest short loss wins; at a level "
                     "above 0 the best fitness among the short losses whose paired interval against the "
                     "lowest contains 0. Lines in `bench/results/rerank_rule.jsonl`.\n")
        parts.append(rerank_rule_section(rule) + "\n")
        found = rerank_rule_findings(rule, search, demo, student)
        if found:
            parts.append("\n".join(f"- {x}" for x in found) + "\n")
    parts.append("## Does the supernet rank?\n")
    parts.append("The search's fitness (search-split loss with shared weights) of architectures it scored, "
                 "against their validation loss once retrained standalone, beside ranking by parameters and "
                 "by each model's validation loss early in its own retraining (90% bootstrap interval over "
                 "architectures).\n")
    parts.append(rank_section(rank))
    parts.append("## The search's fitness noise against its batches\n")
    parts.append(noise_section(noise))
    parts.append("## Recipes tried on the way\n")
    parts.append("Every other full run, with what it changed from today's demo recipe.\n")
    parts.append(other_table(other) + "\n" if other else "None.\n")
    parts.append("## Earlier\n")
    parts.append("A replication of ELM's ablations at a 100-step recipe, from before any student learnt more "
                 "than word frequencies, is `git show a84fed8:RESULTS.md`; `bench/replicate.py` still runs it "
                 "(into its own root). Its figures are not repeated here: its models had learnt little more "
                 "than word frequencies, as its own discussion says.\n")
    return "\n".join(parts)


def write(results: Path | None = None, out: Path | None = None) -> str:
    """Render RESULTS.md from the logs in ``results`` (default :data:`RESULTS`) into ``out``
    (default :data:`OUT`); the text written. The bench scripts that append to these logs call it
    after each new line, so RESULTS.md never lags them."""
    results, out = Path(results or RESULTS), Path(out or OUT)
    load = lambda name: read_jsonl(results / name) if (results / name).is_file() else []  # noqa: E731
    text = render(load("student_recipe.jsonl"), load("supernet_rank.jsonl"), load("search_noise.jsonl"),
                  load("search_recipe.jsonl"), load("rerank_rule.jsonl"))
    Path(out).write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    print(write(Path(args.results), Path(args.out)))


if __name__ == "__main__":
    main()
