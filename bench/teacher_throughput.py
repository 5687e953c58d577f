"""Training throughput of the demo teacher on this machine (tokens/s), appended to BENCHMARKS.md.

    python bench/teacher_throughput.py [--config=configs/mlm.py:demo] [--steps=30]
        [--set data.mask_rate=0.4 ...]

Measures the compiled train step alone (after 3 warm-up steps, compile excluded), with the real
data pipeline feeding it, and reports the host-side batch time separately. For MLM it measures,
side by side in one run, the LM head at every position (``data.max_predictions=0``, what the
code did before issue 28) and at the scored positions only (the config's own setting, default
auto), rounds interleaved so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import datetime
import time

import jax
import numpy as np
from ml_collections import ConfigDict

from elm_jax import config as config_lib
from elm_jax.engine import sharding
from elm_jax import engine as train_lib
from elm_jax.data.prepare import prepare_data
from elm_jax.models.dense import count_params, init_dense
from elm_jax.lm import dense_config_from, lm_eval_fn, lm_loss_fn

from report_util import append_section, apply_overrides, markdown_table  # noqa: E402  (bench/ is the script directory)


def _measure(cfg, steps: int, rounds: int) -> dict:
    data = prepare_data(cfg)
    model = init_dense(dense_config_from(cfg, data.tokenizer.vocab_size), seed=0)
    tc = ConfigDict(cfg.teacher.train.to_dict() | {"seed": 0})
    trainer = train_lib.Trainer(model, lm_loss_fn, lm_eval_fn, tc, sharding.make_mesh(cfg.mesh))
    state = trainer.init_state()
    t0 = time.perf_counter()
    batches = [data.train.batch(s) for s in range(steps + 3)]
    host_s = (time.perf_counter() - t0) / len(batches)
    gb = [sharding.global_batch(b, trainer.mesh) for b in batches]
    for s in range(3):
        state, m = trainer.train_step(state, gb[s])
    jax.block_until_ready(m)

    def one_round():
        nonlocal state
        t = time.perf_counter()
        for s in range(3, steps + 3):
            state, m = trainer.train_step(state, gb[s])
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    return {"params": count_params(model), "host_s": host_s, "round": one_round,
            "max_predictions": data.stats["max_predictions"], "vocab": data.tokenizer.vocab_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mlm.py:demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per mode (median)")
    ap.add_argument("--set", nargs="*", default=[], help="dotted overrides, e.g. data.mask_rate=0.4")
    ap.add_argument("--out", default="BENCHMARKS.md")
    args = ap.parse_args()

    cfg = config_lib.load_config(args.config)
    apply_overrides(cfg, args.set)
    config_lib.validate(cfg, ["data", "teacher"])
    modes = {"scored positions": cfg}
    if cfg.task == "mlm" and cfg.data.max_predictions != 0:
        full = cfg.copy_and_resolve_references()
        with full.unlocked():
            full.data.max_predictions = 0
        modes = {"every position": full, "scored positions": cfg}
    runs = {name: _measure(c, args.steps, args.rounds) for name, c in modes.items()}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, r in runs.items():
            times[name].append(r["round"]())
    rows = []
    tokens = cfg.data.batch_size * cfg.data.seq_len
    base = None
    for name, r in runs.items():
        step_s = float(np.median(times[name]))
        base = base or step_s
        rows.append([datetime.date.today().isoformat(), args.config + "".join(f" {x}" for x in args.set),
                     name, r["max_predictions"] or cfg.data.seq_len, r["vocab"], r["params"], tokens,
                     round(1000 * step_s, 1), round(tokens / step_s), f"{base / step_s:.2f}x",
                     round(1000 * r["host_s"], 2)])
    header = ["date", "config", "LM head at", "head positions/row", "vocab", "params", "tokens/step",
              "step ms (median)", "tokens/s", "speed vs first row", "batch build ms (host)"]
    table = markdown_table(header, rows)
    print(table)
    sets = "".join(f" {x}" for x in args.set)
    append_section(args.out, "Teacher training throughput",
                   f"python bench/teacher_throughput.py --config={args.config} --steps={args.steps} "
                   f"--rounds={args.rounds}" + (f" --set{sets}" if sets else ""), table)


if __name__ == "__main__":
    main()
