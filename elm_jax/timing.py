"""Timing on the device: interleaved, quantile-of-calls measurement of jitted functions and of whole dense models (DESIGN §2, §8).

A timing is a quantile of single, blocking calls after ``warmup`` untimed calls (the first
compiles), see :func:`measure_many`. Measurements that are compared with each other are
*interleaved*: every round times each item once (right after one untimed call of the same
executable, so caches hold that item's data, as when a model is served repeatedly), in a freshly
shuffled order, so a burst of load from other processes hits all items alike instead of
corrupting a few; rounds go on for at least ``repeats`` rounds and ``min_time_s`` seconds so
that short bursts of load are not the whole sample; the garbage collector is paused while
timing.

**One policy for everything that is compared.** :class:`TimingPolicy` (repeats, warm-up calls,
re-warm calls, statistic, least wall time) is the ONE description of how a latency that is
compared with another one is measured: the per-layer latency table and its check
(:mod:`elm_jax.latency`) and the end-to-end latency of an exported model
(:func:`measure_model_ms`, the export stage) take the same policy, read from ``cfg.latency`` by
:meth:`TimingPolicy.from_config` alone, so a prediction and a measurement estimate the same
statistic. :func:`measure` (the median of a few calls, no least time) is a quick utility whose
number is compared with nothing.

All timing runs on ONE device, ``jax.devices()[0]`` (:func:`device`); :func:`device_fingerprint`
says which one it was.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elm_jax.fields import get as get_field
from elm_jax.models.dense import (
    DenseLM,
)


def device() -> jax.Device:
    """The one device latency is measured on: ``jax.devices()[0]``."""
    return jax.devices()[0]


def on_device(tree: Any) -> Any:
    return jax.device_put(tree, device())


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How a latency that is compared with another latency is measured (:func:`measure_many`):
    at least ``repeats`` interleaved rounds spanning at least ``min_time_s`` seconds, after
    ``warmup`` untimed calls per item, each timed call preceded by ``rewarm`` untimed calls of
    the same executable; the statistic of the timed calls is their ``quantile``.

    The default statistic is the **minimum** (``quantile=0``), for the table's parts, its
    calibration models, its check and the exported models alike. A prediction is made from
    parts timed at one time (the table is built once per device and cached) and compared with
    a model timed at another (the export stage, a check), and on a shared machine the
    background load changes in between; a timed call can only be slowed by load, never sped
    up, so the minimum is the statistic that estimates the same quantity -- the unloaded
    device, what a dedicated target device shows -- at both times, and is the least sensitive
    to that drift. The median mixes in however much load there was at each time
    (``bench/latency_check.py --quantile=0.5`` measures the median's error beside the
    minimum's on the same models). ``min_time_s`` (2 s) makes a sample span
    more than one short burst of load, so a minimum over it is reached at each time.

    Set by the user in ``cfg.latency`` (``repeats``, ``warmup``, ``quantile``, ``min_time_s``),
    read by :meth:`from_config` only; the defaults here serve partial configs."""

    repeats: int = 20
    warmup: int = 3
    quantile: float = 0.0
    min_time_s: float = 2.0
    rewarm: int = 1

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {self.quantile}")
        if self.min_time_s < 0 or self.warmup < 0 or self.rewarm < 0:
            raise ValueError(f"min_time_s, warmup and rewarm must be >= 0, got {self}")

    @classmethod
    def from_config(cls, latency_cfg: Any) -> TimingPolicy:
        """The policy of ``cfg.latency`` (``repeats``, ``warmup``, ``quantile``,
        ``min_time_s``; an absent or None field takes the default)."""
        d = cls()
        def field(name: str) -> Any:
            return get_field(latency_cfg, name, getattr(d, name), none_is_default=True)
        return cls(repeats=int(field("repeats")), warmup=int(field("warmup")),
                   quantile=float(field("quantile")), min_time_s=float(field("min_time_s")))

    def describe(self) -> str:
        stat = "minimum" if self.quantile == 0 else (
            "median" if self.quantile == 0.5 else f"quantile {self.quantile:g}")
        return (f"{stat} of >= {self.repeats} interleaved rounds over >= {self.min_time_s:g} s "
                f"({self.warmup} warm-up, {self.rewarm} re-warm call(s))")


DEFAULT_POLICY = TimingPolicy()


def measure_many(items: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]],
                 policy: TimingPolicy = DEFAULT_POLICY, *, seed: int = 0) -> dict[str, float]:
    """Wall time in seconds of one call of each jitted ``fn(*args)`` in ``items`` (name ->
    ``(fn, args)``), measured interleaved under ``policy``: the ``policy.quantile``
    (0.5 = median, 0 = minimum) of the timed calls of each item.

    Every function is jitted and called ``max(1, warmup)`` times untimed (the first call
    compiles, so compile time is excluded). Then rounds visit every item in an order
    reshuffled every round (seeded): ``rewarm`` untimed calls, then one timed call,
    blocking on its result (``jax.block_until_ready``). Rounds go on until at least
    ``repeats`` rounds and ``min_time_s`` seconds have passed. Interleaving shares the
    machine's background load among the items, which is what makes differences and sums
    of these times meaningful on a busy machine; the re-warm call makes each timed call
    follow a call of the same executable, as when one model serves requests back to back.
    Python's garbage collector is disabled while timing."""
    repeats, warmup, rewarm = policy.repeats, policy.warmup, policy.rewarm
    quantile, min_time_s = policy.quantile, policy.min_time_s
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
    (compile excluded); see :func:`measure_many` for the timing loop. Not for latencies that
    are compared with the table (those use a :class:`TimingPolicy`)."""
    policy = TimingPolicy(repeats=repeats, warmup=warmup, quantile=0.5, min_time_s=0.0)
    return measure_many({"fn": (fn, tuple(args))}, policy)["fn"]


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


def measure_model_ms(model: DenseLM, batch: int, seq_len: int,
                     policy: TimingPolicy = DEFAULT_POLICY, *, seed: int = 0) -> float:
    """End-to-end inference latency (ms) of a dense model under ``policy`` (the statistic of
    the latency table, :class:`TimingPolicy`): one jitted forward (parameters as arguments,
    logits out) on random ids ``[batch, seq_len]`` with a padding mask of ones, on
    ``jax.devices()[0]`` (:func:`measure_many`)."""
    ids, mask = model_inputs(model.cfg.vocab_size, batch, seq_len, seed)
    fn, args = model_item(model, ids, mask)
    return 1e3 * measure_many({"model": (fn, args)}, policy, seed=seed)["model"]
