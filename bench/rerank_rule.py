"""The re-ranking rule at other tie levels, on the short trainings a finished run already made.

A search stage run with ``search.rerank_top = k`` trained each budget's ``k`` best candidates (and
the random control's) for ``search.rerank_steps`` steps and kept those trainings under
``WORKDIR/search/rerank/<budget>[_random]/r<i>_<arch_id>``. Which of them the rule of
:mod:`elm_jax.search.rerank` picks depends only on their search-split rows and the tie level
(``search.rerank_tie_level``), so the rule can be re-applied at any level without training again:
this script restores each finished training (the engine only evaluates a finished run), takes its
rows on the search split (:func:`elm_jax.lm.lm_row_sums`), checks that they give the short loss the
run recorded, and applies :func:`elm_jax.search.rerank.rerank` at each ``--levels`` value. It
appends one JSON line per run to ``bench/results/rerank_rule.jsonl``: for each level and side
(``found``, ``random``) the pick, whether it is the one the run made, and every candidate's short
loss, paired standard error against the lowest and tie.

    python bench/rerank_rule.py --log search_recipe --tag rerank4 --seed 1 [--levels 0 0.9]

The run is found by its line in ``bench/results/<log>.jsonl`` (its config, overrides, seed and
work directory, which must still exist).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from make_run_cost import _commit  # noqa: E402  (bench/ is the script directory)
from report_util import append_jsonl, apply_overrides, read_jsonl  # noqa: E402

LOG = REPO / "bench" / "results" / "rerank_rule.jsonl"


def arch_of(describe: str, families) -> "Arch":
    """The architecture a ``describe()`` string names, for extraction: ``b2h4 - m0h1 ...`` (an
    inactive layer's genes, which its describe drops, do not change the extracted model)."""
    from elm_jax.arch import Arch, LayerChoice

    by_initial = {f[0]: f for f in families}
    layers = []
    for tok in describe.split():
        if tok == "-":
            layers.append(LayerChoice(families[0], 0, 1, False))
            continue
        cand, _, heads = tok[1:].partition("h")
        layers.append(LayerChoice(by_initial[tok[0]], int(cand), int(heads), True))
    return Arch(tuple(layers))


def reapply(line: dict, levels: list[float]) -> dict:
    """One record (module docstring) for the logged run ``line``."""
    from elm_jax.config import load_config
    from elm_jax.data.prepare import prepare_data
    from elm_jax.engine import sharding
    from elm_jax.lm import load_teacher
    from elm_jax.models.io import load_supernet
    from elm_jax.search.rerank import ShortTraining, rerank

    w = Path(line["workdir"])
    result = json.loads((w / "search" / "result.json").read_text())
    cfg = load_config(line["config"])
    apply_overrides(cfg, [*line.get("overrides", []), f"seed={line['seed']}"])
    data = prepare_data(cfg)
    net, widths, _ = load_supernet(w / "supernet" / "final")
    short = ShortTraining(cfg, load_teacher(w), data, sharding.make_mesh(cfg.mesh), w / "search" / "rerank",
                          net, widths)
    families = list(cfg.space.families)
    out: dict = {"levels": {}}
    worst = 0.0
    for budget, b in result["budgets"].items():
        sides = {"found": (b.get("rerank"), b["arch_id"], budget),
                 "random": ((b.get("random") or {}).get("rerank"), (b.get("random") or {}).get("arch_id"),
                            f"{budget}_random")}
        for side, (rr, made, runs) in sides.items():
            if not rr:
                continue
            cands = rr["candidates"]
            archs = {c["arch_id"]: arch_of(c["describe"], families) for c in cands}
            scores = {c["arch_id"]: c["fitness"] for c in cands}
            logged = {c["arch_id"]: c["short_loss"] for c in cands}
            cache: dict = {}

            def rows(arch, name, runs=runs, cache=cache):
                if name not in cache:
                    cache[name] = short.rows(arch, f"{runs}/{name}")
                return cache[name]

            for level in levels:
                pick, table = rerank(list(scores), scores, archs, rows, tie_level=level)
                for r in table:
                    worst = max(worst, abs(r["short_loss"] - logged[r["arch_id"]]))
                out["levels"].setdefault(str(level), {}).setdefault(budget, {})[side] = {
                    "pick": pick, "describe": archs[pick].describe(), "run_pick": made,
                    "same_as_run": pick == made, "fitness_best": rr["fitness_best"],
                    "candidates": table}
    out["max_abs_short_loss_diff"] = worst  # recomputed against logged: the same trainings
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default="search_recipe")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.9])
    args = ap.parse_args()
    lines = [x for x in read_jsonl(REPO / "bench" / "results" / f"{args.log}.jsonl")
             if x.get("tag") == args.tag and x.get("seed") == args.seed]
    if not lines:
        raise SystemExit(f"no line tagged {args.tag!r} with seed {args.seed} in {args.log}.jsonl")
    line = lines[-1]
    if not (Path(line["workdir"]) / "search" / "rerank").is_dir():
        raise SystemExit(f"{line['workdir']}: no search/rerank trainings (gone, or a run without rerank_top)")
    rec = {"date": datetime.date.today().isoformat(), "commit": _commit(), "source": f"{args.log}:{args.tag}",
           "seed": args.seed, "workdir": line["workdir"], "config": line["config"],
           "overrides": line.get("overrides", []), **reapply(line, args.levels)}
    append_jsonl(LOG, rec)
    import results_md  # here, not at the top: results_md imports the bench scripts

    results_md.write()
    for level, budgets in rec["levels"].items():
        for budget, sides in budgets.items():
            for side, s in sides.items():
                same = "the run's pick" if s["same_as_run"] else "NOT the run's pick"
                print(f"level {level} {budget} {side}: {s['describe']} ({same}); "
                      + ", ".join(f"{c['describe']} {c['short_loss']:.4f}+-{c['short_se']:.4f}"
                                  + ("*" if c["tied"] else "") for c in s["candidates"]))
    print(f"recomputed short losses agree with the logged ones to {rec['max_abs_short_loss_diff']:.2e}")


if __name__ == "__main__":
    main()
