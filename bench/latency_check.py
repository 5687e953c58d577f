"""Checks the per-device latency table against end-to-end timing, appended to BENCHMARKS.md.

    python bench/latency_check.py [--config=configs/mlm.py:demo] [--archs=10] [--rebuild]

Builds (or loads from the cache) the latency table of the config's search space on
``jax.devices()[0]`` (``cfg.latency``: batch, seq_len, repeats, warm-up), then for ``--archs``
random architectures, each under the initial widths and under fully grown widths, builds the
extracted dense model with random init, times it end to end (all models of one widths set
interleaved) and compares with the table's prediction:
``rel_err = |predicted - measured| / measured``. Run it on one device (no
``--xla_force_host_platform_device_count``).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import jax
import numpy as np
from report_util import machine  # bench/ is the script directory (on sys.path)

from elm_jax import config as config_lib
from elm_jax import latency
from elm_jax.data.corpus import default_cache_dir
from elm_jax.fileio import atomic_write_json
from elm_jax.space import SearchSpace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--archs", type=int, default=10, help="random architectures to check")
    ap.add_argument("--seed", type=int, default=1, help="seed of the checked architectures")
    ap.add_argument("--repeats", type=int, default=0,
                    help="timed calls per model in the check (0 = cfg.latency.repeats)")
    ap.add_argument("--rebuild", action="store_true", help="measure the table again")
    ap.add_argument("--cache-dir", default="", help="'' = cfg.latency.cache_dir or "
                    "<data cache dir>/latency")
    ap.add_argument("--quantile", type=float, default=latency.DEFAULT_QUANTILE,
                    help="timing statistic of a rebuilt table and the check (0 = minimum)")
    ap.add_argument("--min-time", type=float, default=latency.DEFAULT_MIN_TIME_S,
                    help="least seconds each interleaved measurement spans")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()

    cfg = config_lib.load_config(args.config)
    space = SearchSpace.from_config(
        cfg.space, vocab_size=cfg.data.tokenizer.vocab_size, max_len=cfg.data.seq_len,
        task=cfg.task)
    lc = cfg.latency
    seq_len = lc.seq_len or cfg.data.seq_len
    cache_dir = Path(args.cache_dir or lc.cache_dir
                     or Path(cfg.data.cache_dir or default_cache_dir()) / "latency")
    key = latency.LatencyTable.key(space, lc.batch, seq_len)
    path = cache_dir / f"latency-{key}.json"
    if args.rebuild or not path.is_file():
        table = latency.LatencyTable.build(space, lc.batch, seq_len, lc.repeats, lc.warmup,
                                           quantile=args.quantile, min_time_s=args.min_time)
        atomic_write_json(path, table.to_dict())
        source = f"measured in {table.build_s:.1f} s"
    else:
        table = latency.load_or_build(space, lc, cfg.data.seq_len, cache_dir)
        source = f"loaded from cache (measured {table.created})"
    print(f"table {path}: {len(table.blocks_ms)} blocks, {source}")
    print(f"  embedding {table.embedding_ms:.3f} ms, head {table.head_ms:.3f} ms, "
          f"overhead {table.overhead_ms:.3f} ms, dispatch "
          + ", ".join(f"{k} {v:.3f}" for k, v in table.dispatch_ms.items()) + " ms")

    rng = np.random.default_rng(args.seed)
    archs = [space.sample(rng) for _ in range(args.archs)]
    repeats = args.repeats or lc.repeats
    rows = []
    for name, widths in (("initial", space.initial_widths()), ("grown", space.max_widths())):
        for r in latency.check(table, space, widths, archs, repeats=repeats,
                               warmup=lc.warmup, seed=args.seed):
            rows.append({"widths": name} | r)
    summary = latency.summarize(rows)

    header = ("widths", "arch", "params", "predicted ms", "measured ms", "rel err")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {r['widths']} | `{r['describe']}` | {r['params']} | {r['predicted_ms']:.3f} | "
              f"{r['measured_ms']:.3f} | {100 * r['rel_err']:.1f}% |" for r in rows]
    calib = "; ".join(f"`{c['describe']}` ({c['widths']}) {c['measured_ms']:.3f} ms measured vs "
                      f"{c['parts_ms']:.3f} ms parts" for c in table.calibration)
    stat = "minimum" if table.quantile == 0 else f"quantile {table.quantile:g}"
    text = (f"Latency table: batch {table.batch}, seq {table.seq_len}, {len(table.blocks_ms)} "
            f"blocks, {stat} of >= {table.repeats} interleaved rounds over >= "
            f"{table.min_time_s:g} s, {source}; embedding "
            f"{table.embedding_ms:.3f} ms, head {table.head_ms:.3f} ms, fitted overhead "
            f"{table.overhead_ms:.3f} ms; dispatch subtracted per part: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in table.dispatch_ms.items())
            + f".  \nOverhead calibration models: {calib}.  \n"
            f"Result over {summary['n']} models: mean |rel err| "
            f"{100 * summary['mean_rel_err']:.1f}%, max {100 * summary['max_rel_err']:.1f}%, "
            f"mean signed {100 * summary['mean_signed_rel_err']:+.1f}% "
            f"(positive = over-prediction).\n\n" + "\n".join(lines) + "\n")
    print(text)

    cmd = f"python bench/latency_check.py --config={args.config} --archs={args.archs}"
    if args.rebuild:
        cmd += " --rebuild"
    with open(args.out, "a") as f:
        f.write(f"\n### Latency table vs. end-to-end timing ({datetime.date.today().isoformat()})"
                f"\n\nCommand: `{cmd}`  \nMachine: {machine()}, jax {jax.__version__}  \n{text}")


if __name__ == "__main__":
    main()
