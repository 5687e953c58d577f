"""Student recipes, logged: run the pipeline after the teacher as a user would and record how far
every student gets below the trivial answer (issue 29 part 1).

    python bench/student_recipe.py [--config=configs/mlm.py:demo] [--seeds 0,1,2]
        [--set supernet.train.steps=1500 retrain.train.steps=600 ...] [--tag NAME]
    python bench/student_recipe.py --report-only

Each seed runs every stage (``python -m elm_jax.main``, one process, as ``make run`` does) in a
fresh work directory with the persistent compilation cache off, so every student stage's wall time
includes a cold compile. The data and teacher stages reuse the tokenizer and the teacher cached
for the same key (:mod:`elm_jax.teacher_cache`; the first run of a seed trains and stores it), so
a recipe is timed on its student stages. ``--stages`` leaves out stages (e.g. ``finetune``);
with ``--reuse DIR`` (a finished work directory) only ``--stages`` run, on a copy of ``DIR``
(e.g. ``--stages finetune,evaluate`` to try a fine-tuning recipe on the same models).
``--host-devices N`` runs the pipeline on N CPU devices (``--xla_force_host_platform_device_count``),
as a recipe that needs several data-parallel devices does (``supernet.sample_per=device``, the
sandwich rule); the line records ``host_devices``.

Appends one JSON line to ``bench/results/student_recipe.jsonl`` (``--log search_recipe``:
``search_recipe.jsonl``, runs that change one thing of the search or the supernet, issue 31
part 3; its own BENCHMARKS section, "Search recipes"): the commit, config, overrides,
the resolved student recipe (:data:`RECIPE_FIELDS`), seed, seconds per stage, the supernet's
validation curve (``[step, loss]``), the search's scored fitness (best, the spread of all scored
candidates), the context-free answer ``cf`` of the validation split and every evaluated model's
loss, ``gain = cf - loss`` (nats) and parameters, the fine-tuning test accuracies when run, and the
1-minute load average before and after. The "Student recipes" section of BENCHMARKS.md is then
rewritten from all the lines, grouped by recipe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_run_cost import _commit, timed_run  # noqa: E402  (bench/ is the script directory)
from report_util import append_jsonl, markdown_table, read_jsonl, replace_section, write_jsonl  # noqa: E402
from teacher_recipe import resolved_recipe  # noqa: E402

from elm_jax import pipeline  # noqa: E402
from elm_jax.evaluation import COMPARISONS, finetune_accuracy  # noqa: E402

TITLE = "Student recipes"
LOG = REPO / "bench" / "results" / "student_recipe.jsonl"
# --log search_recipe: runs that change one thing of the search or supernet (issue 31 part 3),
# in their own log and BENCHMARKS section; RESULTS.md reads each against the demo of its seed
LOGS = {"student_recipe": (TITLE, "student_recipe.jsonl"), "search_recipe": ("Search recipes", "search_recipe.jsonl")}
STUDENT_STAGES = "data,teacher,supernet,search,export,retrain,finetune,evaluate"

RECIPE_FIELDS = ("task", "data.corpus", "data.mask_rate", "teacher.train.steps",
                 "supernet.train.steps", "supernet.train.lr", "supernet.train.decay_start_frac",
                 "supernet.gt_weight", "supernet.kd_loss", "supernet.sample_per", "supernet.sandwich",
                 "supernet.paths_per_device", "supernet.epoch_steps", "search.eval_batches",
                 "retrain.train.steps", "retrain.train.lr", "retrain.train.decay_start_frac",
                 "retrain.gt_weight", "finetune.train.steps", "finetune.train.lr",
                 "finetune.pooling", "space.head_choices", "space.families", "search.rerank_top",
                 "search.rerank_steps", "search.rerank_tie_level", "export.cka_heads",
                 "export.cka_threshold")


def recorded_fields(workdir: Path) -> dict:
    """Every config field of the per-stage fingerprints of ``workdir`` (``{}`` without them)."""
    path = workdir / "fingerprints.json"
    used: dict = {}
    if path.is_file():
        for stage in json.loads(path.read_text()).get("stages", {}).values():
            used.update(stage.get("fields", {}))
    return used


def recipe_of_workdir(workdir: Path, fields: tuple[str, ...] = RECIPE_FIELDS) -> dict | None:
    """The recipe a run actually used: ``fields`` from the per-stage config fields of its
    ``fingerprints.json`` (so a config file edited while the run goes cannot be logged in its
    place); None when the file lacks any of them."""
    used = recorded_fields(workdir)
    return {f: used[f] for f in fields} if all(f in used for f in fields) else None


def logged_recipe(workdir: Path, config: str, overrides: list[str]) -> dict:
    """The recipe a line logs: :func:`recipe_of_workdir`, or where the fingerprints lack a field
    (one no stage's results depend on in this config, e.g. the tie rule of a re-ranking that is
    off) the resolved config for that field alone, the recorded fields kept."""
    full = recipe_of_workdir(workdir)
    if full is not None:
        return full
    used = recorded_fields(workdir)
    resolved = resolved_recipe(config, overrides, fields=RECIPE_FIELDS)
    return {f: used.get(f, resolved[f]) for f in RECIPE_FIELDS}


def curve_of(metrics: Path, key: str = "eval/loss") -> list[list[float]]:
    """``[step, value]`` of every record of ``key`` in an engine ``metrics.jsonl``."""
    out = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if key in rec:
                out.append([int(rec["step"]), float(rec[key])])
    return out


def search_fitness(workdir: Path) -> dict:
    """Per budget: the best fitness and the spread (max - min, sample sd) of every scored candidate
    (the search's own score cache, ``search/state_<budget>.json``), and, where the search stage
    wrote it, the spread's ratio to the paired standard error (``noise`` of ``search/result.json``,
    :mod:`elm_jax.search.fitness_noise`)."""
    out = {}
    result = workdir / "search" / "result.json"
    budgets = json.loads(result.read_text()).get("budgets", {}) if result.is_file() else {}
    for state in sorted((workdir / "search").glob("state_*.json")):
        scores = [float(v) for v in json.loads(state.read_text())["cache"].values()]
        name = state.stem.removeprefix("state_")
        out[name] = {"scored": len(scores), "best": min(scores), "range": max(scores) - min(scores),
                     "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0}
        noise = budgets.get(name, {}).get("noise")
        if noise:
            out[name].update(paired_se=noise["paired_se"], noise_ratio=noise["ratio"])
    return out


def finetune_accuracies(workdir: Path) -> dict:
    """Per fine-tuned model: the first seed's and the reported (mean over seeds) test accuracy,
    every seed's, the from-scratch mean, and each paired comparison's difference, interval and
    verdict (``finetune/result.json``, :mod:`elm_jax.stages.finetune`)."""
    path = workdir / "finetune" / "result.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    out = {}
    for name, v in res.items():
        if not (isinstance(v, dict) and "test_accuracy" in v):
            continue
        out[name] = {k: v.get(k) for k in ("test_accuracy", "scratch_test_accuracy")}
        out[name]["mean_test_accuracy"] = finetune_accuracy(v)
        for key, field in (("seeds", "seed_accuracies"), ("scratch", "scratch_accuracies")):
            if v.get(key):
                out[name][field] = v[key]["test_accuracy"]
        if v.get("comparisons"):
            out[name]["comparisons"] = {k: {f: c[f] for f in ("diff", "lo", "hi", "level", "verdict")}
                                        for k, c in v["comparisons"].items()}
    return out


def versus_of(workdir: Path) -> dict:
    """Per found model: each baseline's validation loss minus the found model's with its 90%
    paired interval and verdict (``evaluate/result.json`` ``versus``, :mod:`elm_jax.stages.evaluate`)."""
    path = workdir / "evaluate" / "result.json"
    models = json.loads(path.read_text()).get("models", {}) if path.is_file() else {}
    return {name: {b: {k: v.get(k) for k in ("gain", "lo", "hi", "verdict")} for b, v in m["versus"].items()}
            for name, m in models.items() if m.get("versus")}


def archs_of(workdir: Path) -> dict:
    """Per exported model: its architecture as :meth:`Arch.describe` writes it
    (``export/result.json``)."""
    path = workdir / "export" / "result.json"
    exported = json.loads(path.read_text()) if path.is_file() else {}
    return {name: e["describe"] for name, e in exported.items() if isinstance(e, dict) and "describe" in e}


def reuse_workdir(source: Path, dest: Path, stages: str) -> None:
    """``dest``: a copy of the finished work directory ``source`` without the outputs of the
    ``stages`` to be run again (their directories and the report), so a recipe of the later
    stages (e.g. ``finetune,evaluate``) is run on the very models the earlier ones made."""
    if not (source / "evaluate" / "result.json").is_file():
        raise SystemExit(f"--reuse {source}: not a finished work directory (no evaluate/result.json)")
    names = pipeline.parse_stages(stages)
    tail = list(pipeline.STAGE_NAMES[pipeline.STAGE_NAMES.index(names[0]):])
    if names != tail:  # a changed stage invalidates every stage after it: the pipeline refuses
        raise SystemExit(f"--reuse reruns the last stages of the pipeline: --stages={','.join(tail)}, "
                         f"not {','.join(names)}")
    shutil.copytree(source, dest, symlinks=True)
    for s in names:
        shutil.rmtree(dest / s, ignore_errors=True)
    for stale in ("report.md", "report"):
        p = dest / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def host_devices_env(n: int, env: dict | None = None) -> dict:
    """``env`` (default ``os.environ``) with XLA's host platform split into ``n`` CPU devices
    (an earlier device-count flag is replaced)."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={int(n)}"])
    return env


def run_seed(config: str, seed: int, overrides: list[str], stages: str, tag: str,
             keep: Path | None, reuse: Path | None = None, host_devices: int = 0) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"student_recipe_{tag}_s{seed}_", dir=keep))
    if reuse is not None:
        reuse_workdir(reuse, tmp / "w", stages)
    ov = [*overrides, f"seed={seed}"]
    commit = _commit()  # the code the run starts from
    load0 = os.getloadavg()[0]
    run = timed_run(config, tmp / "w", None, tmp / "run.log",
                    [f"--stages={stages}", "--config.compile_cache_dir=none",
                     *[f"--config.{o}" for o in ov]],
                    env=host_devices_env(host_devices) if host_devices else None)
    load1 = os.getloadavg()[0]
    w = tmp / "w"
    ev = run["evaluate"]
    cf = next(float(v) for k, v in ev["baselines"].items() if k.endswith("_loss"))
    return {"date": datetime.date.today().isoformat(), "commit": commit, "config": config,
            "overrides": overrides,
            "recipe": logged_recipe(w, config, overrides),
            "tag": tag, "seed": seed, "stages_s": run["stages"], "total_s": run["total_s"],
            "teacher_reused": run["teacher_reused"], "teacher_gain": run["teacher_gain_nats"],
            "cf": cf, "models": ev["models"],
            "supernet_curve": curve_of(w / "supernet" / "metrics.jsonl"),
            "search": search_fitness(w), "finetune": finetune_accuracies(w), "versus": versus_of(w),
            "archs": archs_of(w),
            "load_1m": [load0, load1], "workdir": str(w),
            **({"reused": str(reuse), "stages": stages} if reuse is not None else {}),
            **({"host_devices": int(host_devices)} if host_devices else {})}


def _recipe_key(rec: dict) -> tuple:
    return tuple(sorted(rec["recipe"].items()))


def _finetune_cell(name: str, v: dict) -> str:
    """``name acc`` (the mean over seeds when several), the from-scratch mean and each paired
    comparison's 90% interval."""
    acc = v.get("mean_test_accuracy", v["test_accuracy"])
    seeds = v.get("seed_accuracies")
    cell = f"{name} {acc:.3f}" + (f" (mean of {len(seeds)} seeds)" if seeds else "")
    if v.get("scratch_test_accuracy") is not None:
        cell += f", scratch {v['scratch_test_accuracy']:.3f}"
    for k, c in (v.get("comparisons") or {}).items():
        cell += f"; {COMPARISONS.get(k, k)} {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
    return cell


def render(records: list[dict], title: str = TITLE, log_name: str = "student_recipe.jsonl") -> str:
    rows, curves = [], []
    for r in records:
        recipe = r["recipe"]
        models = r["models"]
        found = [m for m in models.values() if m.get("kind") == "found"]
        others = ", ".join(f"{n} {m['gain_nats']:+.3f}" for n, m in models.items()
                           if m.get("kind") not in ("found", "teacher"))
        fit = ", ".join(f"{b}: best {s['best']:.3f}, range {s['range']:.3f} over {s['scored']}"
                        + (f", sd / paired SE {s['noise_ratio']:.1f}x" if s.get("noise_ratio") else "")
                        for b, s in r["search"].items())
        ft = ", ".join(_finetune_cell(n, v) for n, v in r["finetune"].items() if v.get("test_accuracy") is not None)
        ov = " ".join(r["overrides"]) or "(defaults)"
        if r.get("reused"):
            ov += f" (only {r['stages']}, on the models of a finished run)"
        rows.append([r["recipe"]["task"], ov, str(r["seed"]),
                     f"{r['cf']:.3f}", ", ".join(f"{m['gain_nats']:+.3f}" for m in found) or "-",
                     others or "-", fit or "-", ft or "-",
                     " / ".join(f"{s} {t:.0f}" for s, t in r["stages_s"].items() if s not in ("data", "teacher")),
                     f"{r['total_s']:.0f}", r["commit"]])
        curves.append(f"- `{r['config']}` {' '.join(r['overrides']) or '(defaults)'}, seed {r['seed']}: supernet "
                      + " / ".join(f"{loss:.3f}@{step}" for step, loss in r["supernet_curve"])
                      + f" (cf {r['cf']:.3f}; recipe {', '.join(f'{k}={v}' for k, v in recipe.items())})")
    body = markdown_table(["task", "overrides", "seed", "cf", "found gain (nats)", "baselines' gain",
                           "search fitness", "polarity test accuracy", "student stages s", "total s",
                           "commit"], rows)
    log_flag = "" if log_name == "student_recipe.jsonl" else f" --log {log_name.removesuffix('.jsonl')}"
    return (f"\n### {title} ({records[-1]['date']})\n\n"
            f"Command: `python bench/student_recipe.py{log_flag} --config=CONFIG --seeds S --set OVERRIDES` "
            f"(one JSON line per run in `bench/results/{log_name}`; this section is written "
            f"from all of them)  \nMachine: {os.uname().machine}, {os.cpu_count()} cores; all stages in one "
            f"process with the compile cache off, the teacher reused from the teacher cache\n\n"
            f"Gain = the context-free answer of the validation split minus the model's validation loss "
            f"(nats; positive: it learnt more than word frequencies). Search fitness: the search split's "
            f"loss of the best scored candidate, the range over all scored ones and, where recorded, "
            f"their sd over the paired standard error of a fitness difference (at least 5x: the search "
            f"ranks signal).\n\n{body}\n\n"
            f"Supernet validation curves (loss@step):\n\n" + "\n".join(curves) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", nargs="*", default=[], help="dotted config overrides (without --config.)")
    ap.add_argument("--stages", default=STUDENT_STAGES)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--keep", default=None, help="directory for the work directories (default: /tmp)")
    ap.add_argument("--reuse", default=None,
                    help="a finished work directory (one seed): copy it and run only --stages on it")
    ap.add_argument("--host-devices", type=int, default=0,
                    help="run on this many CPU devices (XLA's host platform split; 0: as the machine has)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--fill-archs", action="store_true",
                    help="add each exported model's architecture to the lines logged before it was "
                         "recorded, read from their work directories where these still exist")
    ap.add_argument("--log", choices=sorted(LOGS), default="student_recipe",
                    help="search_recipe: a run that changes one thing of the search or supernet (issue 31 part 3)")
    args = ap.parse_args()
    title, log_name = LOGS[args.log]
    log = LOG.with_name(log_name)  # beside LOG (tests move it)
    if args.fill_archs:
        lines = read_jsonl(log)
        filled = [r | {"archs": archs_of(Path(r["workdir"]))} if not r.get("archs") and
                  (Path(r["workdir"]) / "export" / "result.json").is_file() else r for r in lines]
        write_jsonl(log, filled)
        print(f"[student_recipe] architectures added to {sum(a is not b for a, b in zip(filled, lines))} line(s)")
    elif not args.report_only:
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            rec = run_seed(args.config, seed, list(args.set), args.stages, args.tag,
                           Path(args.keep) if args.keep else None, Path(args.reuse) if args.reuse else None,
                           args.host_devices)
            append_jsonl(log, rec)
            found = {n: m["gain_nats"] for n, m in rec["models"].items() if m.get("kind") == "found"}
            print(f"[student_recipe] seed {seed}: cf {rec['cf']:.4f}, found gain {found}, "
                  f"total {rec['total_s']:.0f} s", flush=True)
    records = read_jsonl(log) if log.is_file() else []
    if not records:
        raise SystemExit(f"{log} holds no line yet")
    text = render(records, title, log_name)
    print(text)
    replace_section(args.out, (title,), text)
    if args.fill_archs or not args.report_only:  # a line is new or changed: RESULTS.md follows it
        import results_md  # here: results_md reads this module's fields

        results_md.write()


if __name__ == "__main__":
    main()
