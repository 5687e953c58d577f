"""Compilations of the supernet stage's compiled functions over many sampled architectures.

    python bench/compile_count.py [--config=configs/mlm.py:demo] [--archs=200] [--populations=4]
                                  [--synthetic] [--note=TEXT] [--out=BENCHMARKS.md] [--config.FIELD=VALUE ...]

DESIGN §3: one compiled step for every architecture. This runs the supernet stage's own engine
(:func:`elm_jax.students.supernet_trainer`: relational KD from a teacher -- here randomly
initialised, since weights do not change compilation) for ``--archs`` steps, each with the
architectures the stage's sampler (:class:`elm_jax.data.arch_batches.ArchBatches`) draws for it, and
with the stage's hooks (:class:`elm_jax.stages.supernet.SupernetHooks`: PCA/CKA statistics every
``calc_every`` steps, width growth at every epoch end), so the widths change during the run as
they do in the stage. Then the eval step runs each of those architectures once (alternating the
initial and the grown widths), and the search's :class:`elm_jax.search.scoring.PopulationScorer` scores
``--populations`` populations of ``search.population`` fresh architectures plus one population
2.5 times larger than its capacity (scored in several calls). Each compiled function must
compile exactly once; the script exits with status 1 otherwise.

Printed and appended to BENCHMARKS.md: compiled function, calls, distinct architectures, distinct
width states, compilations (``jitted._cache_size()``).
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from report_util import append_section, markdown_table
from supernet_setup import build, recorded_command

from elm_jax.engine import sharding
from elm_jax.engine.metrics import MetricWriter
from elm_jax.search.scoring import PopulationScorer
from elm_jax.stages.supernet import SupernetHooks
from elm_jax.data.arch_batches import arch_rows

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mlm.py:demo", "Config file[:variant].")
_ARCHS = flags.DEFINE_integer("archs", 200, "Training steps, each with its own sampled architectures.")
_POPULATIONS = flags.DEFINE_integer("populations", 4, "Populations scored by the population scorer.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Random-token batches instead of the corpus.")
_NOTE = flags.DEFINE_string("note", "", "An extra line for the BENCHMARKS.md section.")
_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to append to ('' = print only).")


def main(argv: list[str]) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds / orbax chatter
    cfg = _CONFIG.value
    if _ARCHS.value < 2 or _POPULATIONS.value < 1:
        raise app.UsageError("--archs must be >= 2 and --populations >= 1")
    t_start = time.perf_counter()
    hooks: SupernetHooks | None = None
    bench = build(cfg, synthetic=_SYNTHETIC.value, widths=lambda: hooks.widths,
                  eval_batches=max(int(cfg.search.eval_batches), 1))
    space, mesh, trainer = bench.space, bench.mesh, bench.trainer
    epoch_steps = int(cfg.supernet.epoch_steps) or 25
    hooks = SupernetHooks(cfg, space, trainer, epoch_steps)
    rows = []

    # 1. train step (+ the hooks' statistics function), the stage's loop without checkpoints
    state = trainer.init_state()
    seen, width_states = {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        writer = MetricWriter(tmp, enabled=False)
        for step in range(_ARCHS.value):
            local = bench.train.batch(step)
            seen.update({a.arch_id: a for a in bench.train.archs(step)})
            width_states.add(hooks.widths.tobytes())
            state, metrics = trainer.train_step(state, sharding.global_batch(local, mesh))
            hooks.after_step(step + 1, state, local, writer)
        jax.block_until_ready(metrics)
    stats_calls = _ARCHS.value // int(cfg.supernet.calc_every)
    grown = sum(len(e["grown"]) for e in hooks.history)
    rows.append(("train_step (supernet KD)", _ARCHS.value, len(seen), len(width_states),
                 trainer.train_step._cache_size()))  # pylint: disable=protected-access
    rows.append(("PCA/CKA statistics (hooks)", stats_calls, "-", "-",
                 hooks._stats._cache_size()))  # pylint: disable=protected-access

    # 2. eval step over the same architectures, alternating initial and grown widths
    archs = list(seen.values())
    evals = [space.initial_widths(), hooks.widths]
    base = bench.eval_batches[0]
    for k, a in enumerate(archs):
        b = base | arch_rows([space.to_arrays(a, evals[k % 2])], len(base["inputs"]))
        out = trainer.eval_step(state, sharding.global_batch(b, mesh))
    jax.block_until_ready(out)
    n_widths = len({w.tobytes() for w in evals})
    rows.append(("eval_step", len(archs), len(archs), n_widths,
                 trainer.eval_step._cache_size()))  # pylint: disable=protected-access

    # 3. the search's population scorer on the trained supernet
    net = trainer.model_from_state(state).net
    pop = int(cfg.search.population)
    scorer = PopulationScorer(net, hooks.widths, bench.eval_batches, mesh, capacity=pop)
    rng = np.random.default_rng(1)
    scored = 0
    for size in [pop] * _POPULATIONS.value + [pop * 5 // 2]:
        population = [space.sample(rng) for _ in range(size)]
        scores = scorer.scores(population)
        if not np.all(np.isfinite(scores)):
            raise RuntimeError("the population scorer returned non-finite scores")
        scored += size
    rows.append((f"PopulationScorer ({_POPULATIONS.value + 1} populations)", scorer.calls, scored, 1,
                 scorer.compilations()))

    wall = time.perf_counter() - t_start
    header = ("compiled function", "calls", "distinct architectures", "width states", "compilations")
    table = markdown_table(header, rows)
    print(table)
    ok = all(r[-1] == 1 for r in rows)
    extra = (f"Teacher: random-init `{cfg.teacher.source}` shape ({len(bench.teacher.cfg.blocks)} x "
             f"{bench.teacher.cfg.hidden}); {grown} width increments during the run; "
             f"train-step traces: {trainer.train_step_traces}; wall {wall:.0f} s.")
    if _NOTE.value:
        extra += f"  \n{_NOTE.value}"
    print(extra)
    if _OUT.value:
        cmd = recorded_command("bench/compile_count.py", sys.argv[1:])
        append_section(_OUT.value, "Compilations over sampled architectures (supernet stage)", cmd,
                       table, extra)
    if not ok:
        print("FAIL: a compiled function compiled more than once", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
