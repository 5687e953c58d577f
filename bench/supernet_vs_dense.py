"""Supernet train step vs. the extracted dense model's train step, side by side in one run.

    python bench/supernet_vs_dense.py [--config=configs/mlm.py:demo] [--steps=10] [--rounds=3]

For the largest, median and smallest architecture of the config's search space (median and
smallest by parameter count over 200 samples), with fully grown widths (every candidate at its
cap, the end state of PCA growth) and with the initial widths, it times the supernet's compiled
train step (architecture as an argument) and the dense model's own train step on the same
batches, interleaving rounds to share the machine's noise, and reports the median ratio. It also
counts the supernet step's compilations over 200 sampled architectures (must be 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from elm_jax import config as config_lib
from elm_jax.engine import sharding
from elm_jax import engine as train_lib
from elm_jax.data.prepare import prepare_data
from elm_jax.models.elastic import init_supernet
from elm_jax.models.extract import extract
from elm_jax.data.arch_batches import arch_rows
from elm_jax.lm import supernet_lm_fns
from elm_jax.lm import lm_eval_fn, lm_loss_fn

from report_util import append_section, markdown_table  # noqa: E402  (bench/ is the script directory)
from elm_jax.accounting import count_params
from elm_jax.space import SearchSpace


def timed(step_fn, state, batches):
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in batches:
        state, m = step_fn(state, b)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - t0) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()

    cfg = config_lib.load_config(args.config)
    data = prepare_data(cfg)
    space = SearchSpace.from_config(cfg.space, vocab_size=data.tokenizer.vocab_size,
                                             max_len=cfg.data.seq_len, task=cfg.task)
    mesh = sharding.make_mesh(cfg.mesh)
    tc = ConfigDict(cfg.teacher.train.to_dict() | {"seed": 0})
    supernet = init_supernet(space, seed=0)
    loss_fn, eval_fn = supernet_lm_fns(mesh)
    sn_trainer = train_lib.Trainer(supernet, loss_fn, eval_fn, tc, mesh)
    sn_state = sn_trainer.init_state()
    local = [data.train.batch(s) for s in range(args.steps)]

    rng = np.random.default_rng(0)
    init_w, max_w = space.initial_widths(), space.max_widths()
    samples = sorted((count_params(space, a, init_w), a.arch_id, a)
                     for a in (space.sample(rng) for _ in range(200)))
    # compilation count over 200 architectures
    for _, _, a in samples:
        b = local[0] | arch_rows([space.to_arrays(a, init_w)], len(local[0]["inputs"]))
        sn_state, _ = sn_trainer.train_step(sn_state, sharding.global_batch(b, mesh))
    compiles = sn_trainer.train_step._cache_size()

    cases = [("largest", space.largest(), max_w), ("median", samples[len(samples) // 2][2], max_w),
             ("smallest", space.smallest(), max_w), ("median", samples[len(samples) // 2][2], init_w)]
    rows = []
    for name, a, widths in cases:
        arrays = space.to_arrays(a, widths)
        sn_batches = [sharding.global_batch(b | arch_rows([arrays], len(b["inputs"])), mesh) for b in local]
        dense = extract(supernet, widths, a)
        d_trainer = train_lib.Trainer(dense, lm_loss_fn, lm_eval_fn, tc, mesh)
        d_state = d_trainer.init_state()
        d_batches = [sharding.global_batch(b, mesh) for b in local]
        d_state, _ = timed(d_trainer.train_step, d_state, d_batches[:2])  # compile
        sn_t, d_t = [], []
        for _ in range(args.rounds):
            sn_state, t = timed(sn_trainer.train_step, sn_state, sn_batches)
            sn_t.append(t)
            d_state, t = timed(d_trainer.train_step, d_state, d_batches)
            d_t.append(t)
        s_ms, d_ms = 1000 * statistics.median(sn_t), 1000 * statistics.median(d_t)
        rows.append((name, "grown" if widths is max_w else "initial", a.describe(),
                     count_params(space, a, widths), round(s_ms, 1), round(d_ms, 1),
                     round(s_ms / d_ms, 3)))
    header = ("arch", "widths", "layers", "params", "supernet step ms", "dense step ms", "ratio")
    table = markdown_table(header, rows)
    print(table)
    print(f"supernet train-step compilations over 200 architectures: {compiles}")
    cmd = f"python bench/supernet_vs_dense.py --config={args.config} --steps={args.steps} --rounds={args.rounds}"
    append_section(args.out, "Supernet vs. extracted dense train step", cmd, table,
                   f"Supernet train-step compilations over 200 sampled architectures: {compiles}")

if __name__ == "__main__":
    main()
