"""Model FLOP utilisation (MFU) of the real supernet train step, against the machine's measured peak.

    python bench/mfu.py [--config=configs/mlm.py:demo] [--steps=10] [--warmup=2]
                        [--precision=auto|float32|bfloat16] [--synthetic] [--widths=grown|initial]
                        [--note=TEXT] [--out=BENCHMARKS.md] [--config.FIELD=VALUE ...]

Peak: the best of ``--peak-runs`` runs of one jitted chain of ``--peak-iters`` square ``n x n``
matmuls in the run's compute dtype (float32 on CPU, bfloat16 on accelerators under
``precision='auto'``), measured before AND after the step timing (the larger counts), times the
number of devices of the mesh.

Achieved: the supernet stage's own compiled step (:func:`elm_jax.students.supernet_trainer`, KD
from a randomly initialised teacher of the stage's teacher shape, see ``supernet_setup.py``) runs
``--warmup`` untimed then ``--steps`` timed steps, each on the architectures the stage's sampler
draws for it, with pre-built device batches (host batch building is timed separately). Model FLOPs
of a step, summed over the timed steps and divided by their wall time:

    3 x (student forward + KD projections) + teacher forward

- student forward: :func:`elm_jax.accounting.count_flops` of each step's sampled architecture at the
  chosen widths (``grown``: every candidate at its cap, the end state of PCA growth, the default;
  ``initial``: the start of training), times its rows of the batch;
- KD projections: the learned maps of the student's embedding, block and attention outputs to the
  teacher width, for the active layers (``flop_count.kd_projection_flops``);
- teacher forward: embedding and blocks in closed form (``flop_count.dense_forward_flops``, no LM
  head: the loss never reads the teacher's logits and XLA removes them); cross-checked against XLA's
  cost analysis of the compiled teacher feature forward (all ops, so a little higher).

Training is counted as 3 x forward (forward + backward) and the teacher as forward only; work the
masked supernet does beyond the sampled architecture (max-width masked FFNs, skipped layers, the
other family's projections) and rematerialisation (``supernet.remat``) are not model FLOPs: this is
MFU, not hardware utilisation. Also printed: tokens/s (timed steps x batch x seq / time) and peak
memory (``device.memory_stats()['peak_bytes_in_use']`` where the backend has it, else the process's
peak RSS). The synthetic data default is on for the ``paper`` variant (no corpus or tokenizer).
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from flop_count import dense_forward_flops, kd_projection_flops
from ml_collections import config_flags
from report_util import append_section, markdown_table
from supernet_setup import build, recorded_command

from elm_jax.engine import sharding
from elm_jax.precision import compute_dtype
from elm_jax.accounting import count_flops

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mlm.py:demo", "Config file[:variant].")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed train steps first (the first one compiles).")
_PRECISION = flags.DEFINE_enum("precision", None, ["auto", "float32", "bfloat16"],
                               "Overrides config.precision.")
_SYNTHETIC = flags.DEFINE_bool("synthetic", None, "Random-token batches (default: on for the paper variant).")
_WIDTHS = flags.DEFINE_enum("widths", "grown", ["grown", "initial"], "Widths of the sampled architectures.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 0, "n of the n x n peak matmul (0: 2048 CPU, 8192 accelerator).")
_PEAK_ITERS = flags.DEFINE_integer("peak_iters", 0, "Matmuls per timed call (0: 4 CPU, 50 accelerator).")
_PEAK_RUNS = flags.DEFINE_integer("peak_runs", 5, "Timed calls; the fastest counts.")
_NOTE = flags.DEFINE_string("note", "", "An extra line for the BENCHMARKS.md section.")
_OUT = flags.DEFINE_string("out", "BENCHMARKS.md", "Markdown file to append to ('' = print only).")


def measure_peak(dtype: jnp.dtype, n: int, iters: int, runs: int) -> float:
    """Best FLOP/s of one device over ``runs`` calls of a jitted chain of ``iters`` ``n x n`` matmuls
    (``x <- x @ b`` with ``b`` scaled by ``1/sqrt(n)`` so values stay O(1); 2n^3 FLOPs each)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
    chain = jax.jit(lambda a, b: jax.lax.fori_loop(0, iters, lambda i, x: x @ b, a))
    jax.block_until_ready(chain(a, b))  # compile
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 * iters / best


def teacher_xla_flops(teacher: nnx.Module, batch: int, seq: int) -> float:
    """XLA's cost-analysis FLOPs of the compiled teacher forward to its features (embedding,
    attention and block outputs, as the distillation loss reads them), on abstract inputs."""
    graphdef, state = nnx.split(teacher)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def features(st, x):
        out = nnx.merge(graphdef, st)(x, jnp.ones_like(x), jnp.zeros_like(x))
        return out.embedding, out.attn_outs, out.block_outs

    return float(jax.jit(features).lower(abstract, ids).compile().cost_analysis()["flops"])


def peak_memory() -> str:
    """Peak device memory where the backend reports it, else this process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
        return f"{peak / 2**30:.2f} GiB (device)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (host RSS)"


def si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def main(argv: list[str]) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = _CONFIG.value
    if _STEPS.value < 1 or _WARMUP.value < 1:
        raise app.UsageError("--steps and --warmup must be >= 1 (the first warm-up step compiles)")
    if _PRECISION.value is not None:
        if "precision" not in cfg:
            raise app.UsageError("--precision: this config has no 'precision' field")
        cfg.precision = _PRECISION.value
    dtype = compute_dtype(cfg)
    synthetic = _SYNTHETIC.value if _SYNTHETIC.value is not None else cfg.get("variant") == "paper"
    on_cpu = jax.default_backend() == "cpu"
    n = _PEAK_SIZE.value or (2048 if on_cpu else 8192)
    iters = _PEAK_ITERS.value or (4 if on_cpu else 50)

    peak_before = measure_peak(dtype, n, iters, _PEAK_RUNS.value)
    t0 = time.perf_counter()
    bench = build(cfg, synthetic=synthetic, widths=_WIDTHS.value)
    setup_s = time.perf_counter() - t0
    space, trainer, mesh = bench.space, bench.trainer, bench.mesh
    widths = bench.train.widths()
    seq, batch = int(cfg.data.seq_len), int(cfg.data.batch_size)
    tcfg = bench.teacher.cfg

    # Batches (host-built once, then placed on the devices) and each step's model FLOPs.
    total = _WARMUP.value + _STEPS.value
    t0 = time.perf_counter()
    locals_ = [bench.train.batch(s) for s in range(total)]
    host_ms = 1000 * (time.perf_counter() - t0) / total
    batches = [sharding.global_batch(b, mesh) for b in locals_]
    student = kd = 0
    for s in range(_WARMUP.value, total):
        archs = bench.train.archs(s)
        rows = batch // len(archs)
        student += sum(count_flops(space, a, widths, seq) for a in archs) * rows
        kd += sum(kd_projection_flops(space, a, tcfg.hidden, seq) for a in archs) * rows
    teacher = dense_forward_flops(tcfg, seq, head=False) * batch * _STEPS.value
    model_flops = 3 * (student + kd) + teacher

    state = trainer.init_state()
    t0 = time.perf_counter()
    state, m = trainer.train_step(state, batches[0])
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    for b in batches[1:_WARMUP.value]:
        state, m = trainer.train_step(state, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in batches[_WARMUP.value:]:
        state, m = trainer.train_step(state, b)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - t0
    if not np.isfinite(float(m["loss"])):
        raise RuntimeError(f"non-finite loss {float(m['loss'])} in the timed steps")
    compiles = trainer.train_step._cache_size()  # pylint: disable=protected-access
    memory = peak_memory()
    peak_after = measure_peak(dtype, n, iters, _PEAK_RUNS.value)
    devices = int(mesh.devices.size)
    peak = max(peak_before, peak_after) * devices
    achieved = model_flops / elapsed
    xla_teacher = teacher_xla_flops(bench.teacher, batch, seq)
    closed_teacher = dense_forward_flops(tcfg, seq, head=False) * batch

    steps = _STEPS.value
    header = ("config", "precision", "widths", "batch x seq", "steps", "step ms", "tokens/s",
              "model FLOP/step", "achieved", "peak", "MFU", "peak memory")
    variant = f"{cfg.task} {cfg.get('variant', '')}".strip()
    row = (variant, jnp.dtype(dtype).name, _WIDTHS.value, f"{batch} x {seq}", steps,
           round(1000 * elapsed / steps, 1), round(steps * batch * seq / elapsed),
           si(model_flops / steps, "FLOP"), si(achieved, "FLOP/s"), si(peak, "FLOP/s"),
           f"{100 * achieved / peak:.1f}%", memory)
    table = markdown_table(header, [row])
    print(table)
    extra = (
        f"Model FLOPs per step: student forward x3 {si(3 * student / steps, 'FLOP')}, KD projections x3 "
        f"{si(3 * kd / steps, 'FLOP')}, teacher forward {si(teacher / steps, 'FLOP')} (XLA cost analysis "
        f"of the teacher feature forward: {si(xla_teacher, 'FLOP')}, {xla_teacher / closed_teacher:.3f}x the "
        f"closed form). Teacher: random-init {len(tcfg.blocks)} x {tcfg.hidden} ({tcfg.blocks[0].family}, "
        f"vocab {tcfg.vocab_size}); supernet {trainer.num_params():,} parameters (with projections), "
        f"remat {bool(cfg.supernet.get('remat', False))}; {'synthetic' if synthetic else 'corpus'} batches.  \n"
        f"Peak: {n} x {n} {jnp.dtype(dtype).name} matmul chain of {iters}, best of {_PEAK_RUNS.value}, "
        f"{si(peak_before, 'FLOP/s')} before / {si(peak_after, 'FLOP/s')} after the steps, x{devices} "
        f"device(s). Set-up {setup_s:.0f} s, compile + first step {first_s:.1f} s, host batch build "
        f"{host_ms:.1f} ms/step, train-step compilations {compiles}.")
    if _NOTE.value:
        extra += f"  \n{_NOTE.value}"
    print(extra)
    if _OUT.value:
        cmd = recorded_command("bench/mfu.py", sys.argv[1:])
        append_section(_OUT.value, "MFU of the supernet train step", cmd, table, extra)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
