"""Timing on the device: interleaved, quantile-of-calls measurement of jitted functions and of whole dense models (DESIGN §2, §8).

A timing is a quantile of single, blocking calls after ``warmup`` untimed calls (the first
compiles), see :func:`measure_many`. Measurements that are compared with each other are
*interleaved*: every round times each item once (right after one untimed call of the same
executable, so caches hold that item's data, as when a model is served repeatedly), in a freshly
shuffled order, so a burst of load from other processes hits all items alike instead of
corrupting a few; rounds go on for at least ``repeats`` rounds and ``min_time_s`` seconds so
that short bursts of load are not the whole sample; the garbage collector is paused while
timing. :func:`measure` returns the median; the latency table (:mod:`elm_jax.latency`) uses
the minimum.

All timing runs on ONE device, ``jax.devices()[0]`` (:func:`device`); :func:`device_fingerprint`
says which one it was.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elm_jax.models.dense import (
    DenseLM,
)


def device() -> jax.Device:
    """The one device latency is measured on: ``jax.devices()[0]``."""
    return jax.devices()[0]


def on_device(tree: Any) -> Any:
    return jax.device_put(tree, device())


def measure_many(items: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]],
                 repeats: int, warmup: int, *, seed: int = 0, quantile: float = 0.5,
                 min_time_s: float = 0.0, rewarm: int = 1) -> dict[str, float]:
    """Wall time in seconds of one call of each jitted ``fn(*args)`` in ``items`` (name ->
    ``(fn, args)``), measured interleaved: the ``quantile`` (0.5 = median, 0 = minimum) of
    the timed calls of each item.

    Every function is jitted and called ``max(1, warmup)`` times untimed (the first call
    compiles, so compile time is excluded). Then rounds visit every item in an order
    reshuffled every round (seeded): ``rewarm`` untimed calls, then one timed call,
    blocking on its result (``jax.block_until_ready``). Rounds go on until at least
    ``repeats`` rounds and ``min_time_s`` seconds have passed. Interleaving shares the
    machine's background load among the items, which is what makes differences and sums
    of these times meaningful on a busy machine; the re-warm call makes each timed call
    follow a call of the same executable, as when one model serves requests back to back.
    Python's garbage collector is disabled while timing."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    compiled: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
    for name, (fn, args) in items.items():
        f = jax.jit(fn)
        for _ in range(max(1, warmup)):
            jax.block_until_ready(f(*args))
        compiled[name] = (f, args)
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    order = list(compiled)
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t_begin, rounds = time.perf_counter(), 0
        while rounds < repeats or time.perf_counter() - t_begin < min_time_s:
            rounds += 1
            rng.shuffle(order)
            for name in order:
                f, args = compiled[name]
                for _ in range(rewarm):
                    jax.block_until_ready(f(*args))
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                samples[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: float(np.quantile(np.asarray(s), quantile)) for name, s in samples.items()}


def measure(fn: Callable[..., Any], args: Sequence[Any], repeats: int = 20,
            warmup: int = 3) -> float:
    """Median wall time in seconds of one call of ``jax.jit(fn)(*args)`` (blocking on the
    result), over ``repeats`` timed calls after ``max(1, warmup)`` untimed warm-up calls
    (compile excluded); see :func:`measure_many` for the timing loop."""
    return measure_many({"fn": (fn, tuple(args))}, repeats, warmup, quantile=0.5)["fn"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint() -> dict[str, Any]:
    """What identifies the target device: platform, ``device_kind`` of
    ``jax.devices()[0]`` and the jax version; on a CPU (whose device kind is just 'cpu')
    also the CPU model and the number of cores, since those set the speed."""
    dev = device()
    fp: dict[str, Any] = {"platform": dev.platform, "device_kind": dev.device_kind,
                          "jax": jax.__version__}
    if dev.platform == "cpu":
        fp.update(cpu=cpu_model(), cpu_count=os.cpu_count())
    return fp


def model_fn(graphdef: Any) -> Callable[..., jax.Array]:
    """Inference forward of a whole DenseLM: logits (or last hidden without a head)."""
    def fwd(state: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        out = nnx.merge(graphdef, state)(ids, mask)
        return out.logits if out.logits is not None else out.last_hidden
    return fwd


def model_item(model: DenseLM, ids: jax.Array, mask: jax.Array
                ) -> tuple[Callable[..., jax.Array], tuple[Any, ...]]:
    graphdef, state = nnx.split(model)
    return model_fn(graphdef), (on_device(state), ids, mask)


def model_inputs(vocab_size: int, batch: int, seq_len: int, seed: int
                  ) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int32)
    return on_device((jnp.asarray(ids), jnp.ones((batch, seq_len), jnp.int32)))


def measure_model_ms(model: DenseLM, batch: int, seq_len: int, repeats: int = 20,
                     warmup: int = 3, *, seed: int = 0, quantile: float = 0.5,
                     min_time_s: float = 0.0) -> float:
    """End-to-end inference latency (ms) of a dense model: the ``quantile`` (default the
    median) of the time of one jitted forward (parameters as arguments, logits out) on
    random ids ``[batch, seq_len]`` with a padding mask of ones, on ``jax.devices()[0]``
    (:func:`measure_many`; pass ``quantile=DEFAULT_QUANTILE`` to compare with a table)."""
    ids, mask = model_inputs(model.cfg.vocab_size, batch, seq_len, seed)
    fn, args = model_item(model, ids, mask)
    return 1e3 * measure_many({"model": (fn, args)}, repeats, warmup, seed=seed,
                              quantile=quantile, min_time_s=min_time_s)["model"]
