"""Population scoring: one compiled call for 64 candidates vs. extract-compile-evaluate each.

    python bench/population_scoring.py [--config=configs/mlm.py:demo] [--population=64] [--eval-batches=4]

Both paths score the same candidates on the same fixed validation batches with the same
(randomly initialised) supernet weights; the per-candidate path extracts the dense model, compiles
its evaluation and runs it, which is what a search without a weight-shared compiled supernet
would pay. Reported: candidates per second of each path (the population path with and without its
one compilation) and the ratio, plus the largest difference between the two paths' scores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from elm_jax import config as config_lib
from elm_jax.engine import sharding
from elm_jax.data.prepare import prepare_data
from elm_jax.models.elastic import init_supernet
from elm_jax.search.scoring import PopulationScorer
from elm_jax.stages.supernet import space_of

from report_util import append_section, markdown_table  # noqa: E402  (bench/ is the script directory)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--reference", type=int, default=8, help="candidates timed on the per-candidate path")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()

    cfg = config_lib.load_config(args.config)
    data = prepare_data(cfg)
    space = space_of(cfg, data.tokenizer.vocab_size)
    net = init_supernet(space, seed=0)
    widths = space.initial_widths()
    batches = [data.search.global_batch(k) for k in range(args.eval_batches)]
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(args.population)]
    scorer = PopulationScorer(net, widths, batches, sharding.make_mesh(cfg.mesh), capacity=args.population)

    t0 = time.perf_counter()
    first = scorer.scores(archs)
    with_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = scorer.scores(archs[::-1])[::-1]
    steady = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [scorer.score_one(a) for a in archs[: args.reference]]
    per_candidate = (time.perf_counter() - t0) / args.reference
    diff = float(np.max(np.abs(np.asarray(ref) - scores[: args.reference])))
    assert np.allclose(first, scores, atol=1e-5)

    pop_rate = args.population / steady
    pop_rate_c = args.population / with_compile
    ref_rate = 1.0 / per_candidate
    header = ("population", "eval batches", "one call (s)", "first call incl. compile (s)",
              "extract+compile+eval per candidate (s)", "ratio (steady)", "ratio (incl. compile)",
              "max |score diff|")
    row = (args.population, args.eval_batches, round(steady, 2), round(with_compile, 2),
           round(per_candidate, 2), round(pop_rate / ref_rate, 1), round(pop_rate_c / ref_rate, 1),
           f"{diff:.1e}")
    table = markdown_table(header, [row])
    print(table)
    print(f"compilations of the population scorer: {scorer.compilations()}")
    cmd = (f"python bench/population_scoring.py --config={args.config} --population={args.population} "
           f"--eval-batches={args.eval_batches}")
    append_section(args.out, "Population scoring", cmd, table,
                   f"Scorer compilations: {scorer.compilations()}; the per-candidate path was timed on "
                   f"the first {args.reference} candidates.")

if __name__ == "__main__":
    main()
