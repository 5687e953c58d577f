"""Error of the export stage's predicted latency against its measured latency, over exported models.

    python bench/latency_check.py [--config=configs/mlm.py:demo] [--models=20] [--rebuild]
    python bench/latency_check.py --report-only      # the BENCHMARKS.md section from the JSON

Loads (or builds, ``--rebuild``) the latency table of the config's search space on
``jax.devices()[0]`` exactly as the search and export stages do (``latency.load_or_build`` with
``cfg.latency``: shape and the one timing policy, ``elm_jax.timing.TimingPolicy``). Then, for
``--models`` exported models, it does what the export stage does to each: extract a random valid
architecture from a random-init supernet (``models.extract.extract``; random grown widths per
model), apply head counts as the CKA head module would (each active layer re-split into a random
head count of ``space.head_choices`` no larger than its own, ``models.extract.with_heads``),
measure it end to end (``latency.measure_exported_ms``, the export stage's call) and predict it
(``latency.predict_exported_ms`` on the exported model's config, the export stage's call):
``rel_err = |predicted - measured| / measured``. The headline figure is the median of rel_err.

Writes ``bench/results/latency_check.json`` (every model, the table's parts, the policy, the
machine and its load average) and replaces the section ``### Export latency: predicted vs.
measured`` of ``--out`` (BENCHMARKS.md) with text generated from that JSON. Run it on one device
(no ``--xla_force_host_platform_device_count``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from report_util import machine, markdown_table, replace_section  # bench/ is the script directory (on sys.path)

from elm_jax import config as config_lib
from elm_jax import latency
from elm_jax.arch import Arch, LayerChoice
from elm_jax.data.corpus import default_cache_dir
from elm_jax.fileio import atomic_write_json
from elm_jax.models.elastic import init_supernet
from elm_jax.models.extract import extract, with_heads
from elm_jax.space import SearchSpace
from elm_jax.timing import TimingPolicy

TITLE = "Export latency: predicted vs. measured"
OLD_TITLES = ("Latency table vs. end-to-end timing",)  # this script's section before, replaced
RESULT = Path(__file__).resolve().parent / "results" / "latency_check.json"
TARGET = 0.10  # the median |rel err| the table is meant to reach


def random_widths(space: SearchSpace, rng: np.random.Generator) -> np.ndarray:
    """Grown widths as PCA growth leaves them: each candidate f0 * k above its initial width,
    k random, capped at the family's maximum (so always a width the table holds)."""
    init, top = space.initial_widths(), space.max_widths()
    steps = rng.integers(0, (top - init) // space.f0 + 2, size=init.shape)
    return np.minimum(init + space.f0 * steps, top).astype(init.dtype)


def cka_like_heads(space: SearchSpace, arch: Arch, rng: np.random.Generator) -> list[int]:
    """Per active layer, a head count the CKA module could return: one of ``head_choices``
    no larger than the layer's own (CKA only merges heads)."""
    return [int(rng.choice([h for h in space.head_choices if h <= lc.heads]))
            for lc in arch.layers if lc.active]


def run(args: argparse.Namespace) -> dict:
    cfg = config_lib.load_config(args.config)
    if args.quantile is not None:
        cfg.latency.quantile = args.quantile
    if args.min_time is not None:
        cfg.latency.min_time_s = args.min_time
    lc = cfg.latency
    space = SearchSpace.from_config(
        cfg.space, vocab_size=cfg.data.tokenizer.vocab_size, max_len=cfg.data.seq_len,
        task=cfg.task)
    cache_dir = Path(args.cache_dir or lc.cache_dir
                     or Path(cfg.data.cache_dir or default_cache_dir()) / "latency")
    if args.rebuild:
        key = latency.LatencyTable.key(space, lc.batch, lc.seq_len or cfg.data.seq_len)
        (cache_dir / f"latency-{key}.json").unlink(missing_ok=True)
    load0 = os.getloadavg()
    table = latency.load_or_build(space, lc, cfg.data.seq_len, cache_dir)
    print(f"table: {len(table.blocks_ms)} blocks, measured {table.created} in {table.build_s:.1f} s")

    rng = np.random.default_rng(args.seed)
    net = init_supernet(space, seed=args.seed)
    rows = []
    for i in range(args.models):
        arch, widths = space.sample(rng), random_widths(space, rng)
        model = extract(net, widths, arch)
        heads = cka_like_heads(space, arch, rng)
        model = with_heads(model, heads)
        post = iter(heads)
        exported = Arch(tuple(LayerChoice(c.family, c.candidate, next(post) if c.active else c.heads,
                                          c.active) for c in arch.layers))
        pred = latency.predict_exported_ms(table, space, model.cfg)
        meas = latency.measure_exported_ms(model, lc, cfg.data.seq_len, seed=args.seed + i)
        rows.append({"describe": arch.describe(), "exported": exported.describe(),
                     "widths": [b.ffn for b in model.cfg.blocks], "heads": heads,
                     "predicted_ms": pred, "measured_ms": meas,
                     "rel_err": abs(pred - meas) / meas})
        print(f"{i:3d} {exported.describe():40s} predicted {pred:8.3f} ms  measured "
              f"{meas:8.3f} ms  {100 * rows[-1]['rel_err']:5.1f}%", flush=True)
    load1 = os.getloadavg()
    cmd = " ".join(["python bench/latency_check.py"] + sys.argv[1:])
    return {
        "command": cmd, "date": datetime.date.today().isoformat(), "machine": machine(),
        "jax": jax.__version__, "device": table.device, "config": args.config,
        "load_average_1m": {"start": load0[0], "end": load1[0]},
        "policy": dataclasses.asdict(TimingPolicy.from_config(lc)),
        "table": {"batch": table.batch, "seq_len": table.seq_len, "blocks": len(table.blocks_ms),
                  "created": table.created, "build_s": table.build_s,
                  "embedding_ms": table.embedding_ms, "head_ms": table.head_ms,
                  "overhead_ms": table.overhead_ms, "dispatch_ms": table.dispatch_ms},
        "summary": latency.summarize(rows), "target_median_rel_err": TARGET, "models": rows,
    }


def render(res: dict) -> str:
    """The BENCHMARKS.md section, every number from ``res`` (the JSON)."""
    s, t, p = res["summary"], res["table"], TimingPolicy(**res["policy"])
    verdict = "meets" if s["median_rel_err"] <= res["target_median_rel_err"] else "misses"
    rows = [(f"`{r['exported']}`", str(r["widths"]), f"{r['predicted_ms']:.3f}",
             f"{r['measured_ms']:.3f}", f"{100 * r['rel_err']:.1f}%") for r in res["models"]]
    la = res["load_average_1m"]
    return (
        f"\n### {TITLE} ({res['date']})\n\n"
        f"Command: `{res['command']}`  \n"
        f"Machine: {res['machine']}, jax {res['jax']}; 1-minute load average "
        f"{la['start']:.2f} at the start, {la['end']:.2f} at the end  \n"
        f"Each model is exported as the export stage exports it (random architecture and grown "
        f"widths, heads re-split as the CKA module would), measured by `latency.measure_exported_ms` "
        f"and predicted by `latency.predict_exported_ms`, the export stage's two calls; table and "
        f"models share one timing policy: {p.describe()}.  \n"
        f"Table: batch {t['batch']}, seq {t['seq_len']}, {t['blocks']} blocks, measured "
        f"{t['created']} in {t['build_s']:.1f} s; embedding {t['embedding_ms']:.3f} ms, head "
        f"{t['head_ms']:.3f} ms, fitted overhead {t['overhead_ms']:.3f} ms.  \n"
        f"**Median |rel err| over {s['n']} exported models: {100 * s['median_rel_err']:.1f}%** "
        f"({verdict} the {100 * res['target_median_rel_err']:.0f}% target); mean "
        f"{100 * s['mean_rel_err']:.1f}%, max {100 * s['max_rel_err']:.1f}%, mean signed "
        f"{100 * s['mean_signed_rel_err']:+.1f}% (positive = over-prediction). Result file: "
        f"`bench/results/latency_check.json`.\n\n"
        + markdown_table(("exported arch", "FFN widths", "predicted ms", "measured ms", "rel err"),
                         rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--models", type=int, default=20, help="exported models to check (>= 20)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the models and their weights")
    ap.add_argument("--rebuild", action="store_true", help="measure the table again")
    ap.add_argument("--cache-dir", default="", help="'' = cfg.latency.cache_dir or "
                    "<data cache dir>/latency")
    ap.add_argument("--quantile", type=float, default=None,
                    help="override cfg.latency.quantile (table and models alike)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="override cfg.latency.min_time_s (table and models alike)")
    ap.add_argument("--result", default=str(RESULT), help="the JSON result file")
    ap.add_argument("--report-only", action="store_true",
                    help="only regenerate the BENCHMARKS.md section from --result")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()
    if args.report_only:
        res = json.loads(Path(args.result).read_text())
    else:
        res = run(args)
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.result, res)
    text = render(res)
    print(text)
    replace_section(args.out, (TITLE, *OLD_TITLES), text)


if __name__ == "__main__":
    main()
