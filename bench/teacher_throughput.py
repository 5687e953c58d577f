"""Training throughput of the demo teacher on this machine (tokens/s), appended to BENCHMARKS.md.

    python bench/teacher_throughput.py [--config=configs/mlm.py:demo] [--steps=30]

Measures the compiled train step alone (after 3 warm-up steps, compile excluded), with the real
data pipeline feeding it, and reports the host-side batch time separately.
"""

from __future__ import annotations

import argparse
import datetime
import time

import jax
from ml_collections import ConfigDict

from elm_jax import config as config_lib
from elm_jax.engine import sharding
from elm_jax import engine as train_lib
from elm_jax.data.prepare import prepare_data
from elm_jax.models.dense import count_params, init_dense
from elm_jax.lm import dense_config_from, lm_eval_fn, lm_loss_fn

from report_util import append_section, markdown_table  # noqa: E402  (bench/ is the script directory)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()

    cfg = config_lib.load_config(args.config)
    data = prepare_data(cfg)
    model = init_dense(dense_config_from(cfg, data.tokenizer.vocab_size), seed=0)
    tc = ConfigDict(cfg.teacher.train.to_dict() | {"seed": 0})
    trainer = train_lib.Trainer(model, lm_loss_fn, lm_eval_fn, tc, sharding.make_mesh(cfg.mesh))
    state = trainer.init_state()

    t0 = time.perf_counter()
    batches = [data.train.batch(s) for s in range(args.steps + 3)]
    host_s = (time.perf_counter() - t0) / len(batches)
    for s in range(3):
        state, m = trainer.train_step(state, sharding.global_batch(batches[s], trainer.mesh))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for s in range(3, args.steps + 3):
        state, m = trainer.train_step(state, sharding.global_batch(batches[s], trainer.mesh))
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / args.steps
    tokens = cfg.data.batch_size * cfg.data.seq_len
    row = {
        "date": datetime.date.today().isoformat(),
        "config": args.config,
        "params": count_params(model),
        "tokens/step": tokens,
        "step ms": round(1000 * step_s, 1),
        "tokens/s": round(tokens / step_s),
        "batch build ms (host)": round(1000 * host_s, 2),
    }
    table = markdown_table(list(row), [list(row.values())])
    print(table)
    append_section(args.out, "Teacher training throughput",
                   f"python bench/teacher_throughput.py --config={args.config} --steps={args.steps}", table)


if __name__ == "__main__":
    main()
