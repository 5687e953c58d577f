"""Per-device latency table and its end-to-end check (DESIGN §2).

Search constraints on *measured* latency need a latency for every candidate architecture,
and timing hundreds of models end to end is too slow. Instead the forward pass of the
extracted dense model (``dense_config(space, arch, widths)``) is decomposed into parts that
are measured once per device:

    latency(arch) = embedding + sum_{active layers l} block[family_l, ffn_l, heads_l]
                    + head + overhead                                        (1)

- ``embedding``: the factorised embedding of the space (lookup, neighbour concat,
  ``3E -> H`` projection, positions, LayerNorm) on ``[batch, seq_len]`` token ids.
- ``block[f, F, h]``: one dense block (:class:`~elm_jax.models.dense.BertBlock` or
  :class:`~elm_jax.models.dense.MobileBertBlock`) of family ``f``, FFN width ``F`` and
  ``h`` heads on a fixed random input ``[batch, seq_len, H]`` with a padding mask of ones
  (plus the causal mask for 'clm'). The table holds every block the space can produce:
  each family on the menu x every reachable width (multiples of ``f0`` from ``f0`` up to
  the family cap, plus the cap itself) x every head count in ``space.head_choices``.
- ``head``: the LM head (MLM transform + tied decoder, or the CLM projection + decoder).
- ``overhead``: a fixed per-model term, fitted on a few whole models (below).

**Dispatch correction.** Each part is measured as its own jitted call taking its own
parameters as arguments (as the whole model takes all of them). Its raw time holds the
compute, the handling of its parameter leaves (about 1-2 us per leaf on a CPU, which the
whole model pays for the same leaves) and one *base* dispatch (the jit fast path,
launching an executable, the output buffer; about 10 us on a CPU), which the whole model
pays only once. Summing raw part times would charge ``n_parts`` base dispatches and make
the error grow with the number of active layers, so every part is stored net of it::

    part_net = max(0, t(part) - t(noop_part))                                (2)

where ``noop_part`` is a jitted function of the part's inputs only (no parameters) that
returns a one-element slice of its first input. The references are kept in
``dispatch_ms``.

**Overhead.** The model's own dispatch, the attention-mask construction and any glue
between parts (or fusion across part boundaries, which makes it negative) is captured by
a constant fitted on ``C`` calibration models (the largest, the smallest and random
architectures of the space, under grown and initial widths)::

    overhead = median_c ( t(model_c) - [embedding + sum blocks_c + head] )    (3)

**Noise: one timing policy.** Timings come from :mod:`elm_jax.timing` (interleaved rounds, a
quantile of single blocking calls) under ONE :class:`~elm_jax.timing.TimingPolicy`, read from
``cfg.latency`` by ``TimingPolicy.from_config``: the parts and calibration models of the table,
:func:`check` and the end-to-end measurement of every exported model
(:func:`measure_exported_ms`, the export stage) use the same statistic, the same least wall time
and the same repeats, warm-up and re-warm calls, so predicted and measured latency estimate the
same thing. The statistic is the **minimum** (``quantile=0``) of >= 20 rounds over >= 2 s: the
table is built at one time and the models it predicts are timed at another, and on a shared
machine the load changes in between; the minimum estimates the unloaded device at both times
(the reasons and the figures are in the ``TimingPolicy`` docstring). A cached table measured
under another policy is measured again.

**Exported models.** The export stage predicts the model AS EXPORTED, after the CKA head module
re-split its heads (:func:`predict_exported_ms` on the exported model's own config), not the
search's prediction for the pre-CKA head counts (kept as ``search_predicted_latency_ms``);
``bench/latency_check.py`` reports the error of exactly that prediction against exactly that
measurement.

**Cache.** A table depends on the device, the jax version, the space fields that change
the parts (hidden, inner, embed_size, vocab_size, type_vocab_size, families,
head_choices, f0, caps, task) and on batch / seq_len -- not on the number of layers, the
candidates per layer or elastic depth. :meth:`LatencyTable.key` hashes exactly these;
:func:`load_or_build` keeps the table as ``<cache_dir>/latency-<key>.json`` (atomic
write), so it is measured once per device and reused.

:func:`check` validates (1) on the target device: it builds random-init dense models of
given architectures, times them end to end and reports the relative error
``|predicted - measured| / measured`` per architecture (:func:`summarize` gives the mean
and max).

All latency code runs on ONE device, ``jax.devices()[0]``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elm_jax import timing
from elm_jax.accounting import count_params
from elm_jax.arch import Arch
from elm_jax.fields import get as get_field
from elm_jax.fileio import atomic_write_json
from elm_jax.models.dense import (
    BertBlock,
    BlockSpec,
    DenseConfig,
    MobileBertBlock,
    dense_config,
    init_dense,
)
from elm_jax.models.layers import attention_mask
from elm_jax.space import SearchSpace
from elm_jax.timing import (
    DEFAULT_POLICY,
    TimingPolicy,
    device_fingerprint,
    model_inputs,
    model_item,
    on_device,
)

# Bump when the measurement method changes: old cached tables then stop matching. (The
# timing policy is stored in the table and compared on load, see load_or_build.)
TABLE_VERSION = 1

_BLOCKS: dict[str, type[nnx.Module]] = {"bert": BertBlock, "mobilebert": MobileBertBlock}

BlockKey = tuple[str, int, int]  # (family, ffn, heads)


# ----------------------------------------------------------------------------------
# Keys and fingerprints
# ----------------------------------------------------------------------------------


def space_fields(space: SearchSpace) -> dict[str, Any]:
    """The fields of ``space`` that change some part of the table (JSON-ready). The number
    of layers, candidates per layer, elastic depth, min_layers and max_len do not."""
    return {
        "hidden": space.hidden, "inner": space.inner, "embed_size": space.embed_size,
        "vocab_size": space.vocab_size, "type_vocab_size": space.type_vocab_size,
        "families": list(space.families), "head_choices": list(space.head_choices),
        "f0": space.f0, "max_ffn": {f: space.max_ffn_of(f) for f in space.families},
        "task": space.task,
    }


def reachable_widths(space: SearchSpace, family: str) -> list[int]:
    """FFN widths a candidate of ``family`` can have: the multiples of ``f0`` from ``f0``
    up to the family cap, plus the cap itself (initial widths are ``min(f0 (j+1), cap)``
    and growth adds ``f0`` up to the cap)."""
    cap = space.max_ffn_of(family)
    widths = list(range(space.f0, cap + 1, space.f0))
    if cap not in widths:
        widths.append(cap)
    return widths


def expected_block_keys(space: SearchSpace) -> list[BlockKey]:
    """Every ``(family, ffn, heads)`` the space can produce: families on the menu x
    :func:`reachable_widths` x ``space.head_choices``."""
    return [(f, w, h) for f in space.families for w in reachable_widths(space, f)
            for h in space.head_choices]


def _block_name(key: BlockKey) -> str:
    return f"{key[0]}:{key[1]}:{key[2]}"


# ----------------------------------------------------------------------------------
# Part forwards
# ----------------------------------------------------------------------------------

def _parts_config(space: SearchSpace, seq_len: int) -> DenseConfig:
    """The DenseConfig of the space's extracted models without blocks (the settings of
    ``models.dense.dense_config``: factorised embedding, head = task, causal for 'clm')."""
    arch = space.smallest(space.initial_widths())
    cfg = dense_config(space, arch, space.initial_widths())
    if seq_len > cfg.max_len:
        raise ValueError(f"seq_len={seq_len} exceeds the space's max_len={cfg.max_len}")
    return dataclasses.replace(cfg, blocks=())


def _inputs(space: SearchSpace, batch: int, seq_len: int, seed: int) -> dict[str, jax.Array]:
    """Fixed random inputs: token ids ``[B, L]``, a padding mask of ones ``[B, L]``, the
    block input ``x [B, L, H]`` and the boolean attention mask of the blocks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, space.vocab_size, size=(batch, seq_len), dtype=np.int32)
    ones = np.ones((batch, seq_len), np.int32)
    x = rng.normal(size=(batch, seq_len, space.hidden)).astype(np.float32)
    amask = attention_mask(jnp.asarray(ones), seq_len, space.task == "clm")
    return on_device({"ids": jnp.asarray(ids), "mask": jnp.asarray(ones),
                       "x": jnp.asarray(x), "amask": amask})


def _noop(x: jax.Array, *rest: Any) -> jax.Array:
    """The inputs of a part, no parameters, (almost) no work: the base dispatch cost of
    (2)."""
    return x.reshape(-1)[:1]


def _calibration_archs(space: SearchSpace, n: int, seed: int) -> list[tuple[Arch, np.ndarray]]:
    """``n`` (arch, widths) pairs spanning the space: the largest under grown widths, the
    smallest under initial widths, then random architectures alternating the two."""
    init_w, max_w = space.initial_widths(), space.max_widths()
    out = [(space.largest(max_w), max_w), (space.smallest(init_w), init_w)]
    rng = np.random.default_rng((seed, 1))  # a stream of its own: check() archs drawn
    i = 0                                   # from default_rng(k) are out of sample
    while len(out) < n:
        out.append((space.sample(rng), max_w if i % 2 == 0 else init_w))
        i += 1
    return out[:max(1, n)]


# ----------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------

@dataclasses.dataclass
class LatencyTable:
    """Forward latencies (ms, inference, ``batch`` x ``seq_len``) of the parts of the
    space's models on one device, and the prediction (1) of the module docstring.

    Fields: ``device`` (:func:`device_fingerprint`), ``space`` (:func:`space_fields`),
    ``batch``, ``seq_len``, ``embedding_ms``, ``head_ms``, ``blocks_ms`` ((family, ffn,
    heads) -> ms; parts are net of dispatch, (2)), ``overhead_ms`` ((3)),
    ``dispatch_ms`` (the base dispatch cost (2) subtracted from the embedding, the head
    and every block), ``calibration`` (the models (3) was fitted on: arch, measured and
    sum-of-parts ms), the timing policy's ``repeats``, ``warmup``, ``quantile``,
    ``min_time_s`` and ``rewarm`` (:attr:`policy`; :func:`check` reuses it), ``created`` (ISO
    time), ``build_s`` (seconds to build) and the format ``version``."""

    device: dict[str, Any]
    space: dict[str, Any]
    batch: int
    seq_len: int
    embedding_ms: float
    head_ms: float
    blocks_ms: dict[BlockKey, float]
    overhead_ms: float = 0.0
    dispatch_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    calibration: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    repeats: int = 0
    warmup: int = 0
    quantile: float = DEFAULT_POLICY.quantile
    min_time_s: float = DEFAULT_POLICY.min_time_s
    created: str = ""
    build_s: float = 0.0
    version: int = TABLE_VERSION
    rewarm: int = DEFAULT_POLICY.rewarm

    @property
    def policy(self) -> TimingPolicy:
        """The :class:`~elm_jax.timing.TimingPolicy` the table was measured under."""
        return TimingPolicy(repeats=self.repeats or DEFAULT_POLICY.repeats, warmup=self.warmup,
                            quantile=self.quantile, min_time_s=self.min_time_s,
                            rewarm=self.rewarm)

    # ------------------------------------------------------------------ keys

    @staticmethod
    def key(space: SearchSpace, batch: int, seq_len: int) -> str:
        """16 hex digits of sha256 over the canonical JSON of the table version, the
        device fingerprint (device kind + platform, jax version, CPU model on a CPU),
        :func:`space_fields` and ``batch`` / ``seq_len``."""
        payload = {"version": TABLE_VERSION, "device": device_fingerprint(),
                   "space": space_fields(space), "batch": int(batch),
                   "seq_len": int(seq_len)}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, space: SearchSpace, batch: int, seq_len: int,
              policy: TimingPolicy = DEFAULT_POLICY, *, calibration_models: int = 4,
              seed: int = 0) -> LatencyTable:
        """Measures every part of (1) and fits the overhead (3) on
        ``calibration_models`` whole models, all interleaved in the same timing rounds
        (:func:`~elm_jax.timing.measure_many` under ``policy``), on
        ``jax.devices()[0]``. Parameters are random (``seed``): latency does not depend on
        their values."""
        if batch < 1 or seq_len < 1:
            raise ValueError(f"batch and seq_len must be >= 1, got {batch}, {seq_len}")
        t_start = time.perf_counter()
        base = _parts_config(space, seq_len)
        inp = _inputs(space, batch, seq_len, seed)
        items: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}

        # Embedding and head: the modules of a block-less DenseLM of the space, each
        # with only its own parameters as arguments (the head also gets the tied table).
        lm = init_dense(base, seed)
        embed_gd, embed_st = nnx.split(lm.embed)
        head_gd, head_st = nnx.split(lm.head)
        table_ve = on_device(lm.embed.token_table())

        def embed_fn(st: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
            return nnx.merge(embed_gd, st)(ids, mask)

        def head_fn(st: Any, x: jax.Array, tbl: jax.Array) -> jax.Array:
            return nnx.merge(head_gd, st)(x, tbl)

        items["embedding"] = (embed_fn, (on_device(embed_st), inp["ids"], inp["mask"]))
        items["head"] = (head_fn, (on_device(head_st), inp["x"], table_ve))
        # Base dispatch references (2): the parts' inputs, no parameters, no work.
        items["noop:embedding"] = (_noop, (inp["ids"], inp["mask"]))
        items["noop:head"] = (_noop, (inp["x"], table_ve))
        items["noop:block"] = (_noop, (inp["x"], inp["amask"]))

        def block_fn(gd: Any) -> Callable[..., jax.Array]:
            def fwd(st: Any, x: jax.Array, amask: jax.Array) -> jax.Array:
                return nnx.merge(gd, st)(x, amask).out
            return fwd

        keys = expected_block_keys(space)
        for key in keys:
            fam, ffn, heads = key
            blk = _BLOCKS[fam](base, BlockSpec(fam, ffn, heads), rngs=nnx.Rngs(seed))
            gd, st = nnx.split(blk)
            st = on_device(st)
            items[_block_name(key)] = (block_fn(gd), (st, inp["x"], inp["amask"]))

        calib = _calibration_archs(space, calibration_models, seed)
        for c, (a, w) in enumerate(calib):
            model = init_dense(dense_config(space, a, w), seed)
            items[f"model:{c}"] = model_item(model, inp["ids"], inp["mask"])

        t = {k: 1e3 * v for k, v in timing.measure_many(items, policy, seed=seed).items()}

        dispatch = {k.split(":", 1)[1]: t[k] for k in t if k.startswith("noop:")}
        table = cls(
            device=device_fingerprint(), space=space_fields(space), batch=int(batch),
            seq_len=int(seq_len),
            embedding_ms=max(0.0, t["embedding"] - dispatch["embedding"]),
            head_ms=max(0.0, t["head"] - dispatch["head"]),
            blocks_ms={k: max(0.0, t[_block_name(k)] - dispatch["block"]) for k in keys},
            dispatch_ms=dispatch, repeats=policy.repeats, warmup=policy.warmup,
            quantile=policy.quantile, min_time_s=policy.min_time_s, rewarm=policy.rewarm,
            created=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        rows = []
        for c, (a, w) in enumerate(calib):
            parts = table.predict_ms(space, a, w)  # overhead is still 0 here
            rows.append({"arch": a.to_json(), "describe": a.describe(),
                         "widths": "grown" if np.array_equal(w, space.max_widths()) else "initial",
                         "measured_ms": t[f"model:{c}"], "parts_ms": parts})
        table.overhead_ms = statistics.median(r["measured_ms"] - r["parts_ms"] for r in rows)
        table.calibration = rows
        table.build_s = time.perf_counter() - t_start
        return table

    # ------------------------------------------------------------------ predict

    def block_ms(self, family: str, ffn: int, heads: int) -> float:
        """Net latency of one block; ValueError naming the widths the table has when
        ``(family, ffn, heads)`` is not in it."""
        key = (family, int(ffn), int(heads))
        if key not in self.blocks_ms:
            have = sorted({k[1] for k in self.blocks_ms if k[0] == family})
            heads_have = sorted({k[2] for k in self.blocks_ms if k[0] == family})
            raise ValueError(
                f"latency table has no block {family}/ffn={ffn}/heads={heads}; it holds "
                f"{family} widths {have} and heads {heads_have}. Rebuild the table for this "
                f"space (LatencyTable.build / load_or_build) or use reachable widths")
        return self.blocks_ms[key]

    def predict_config_ms(self, cfg: DenseConfig) -> float:
        """(1) for a dense model's config: embedding + its blocks + head + overhead (ms)."""
        return (self.embedding_ms + sum(self.block_ms(b.family, b.ffn, b.heads)
                                        for b in cfg.blocks)
                + self.head_ms + self.overhead_ms)

    def predict_ms(self, space: SearchSpace, arch: Arch, widths: Any) -> float:
        """Predicted latency (ms) of the model extracted for ``arch`` under ``widths``:
        ``embedding + sum over active layers of block[family, width, heads] + head +
        overhead``. ValueError if the table was built for a space whose relevant fields
        differ, or if a width is not in the table."""
        self.check_space(space)
        return self.predict_config_ms(dense_config(space, arch, widths))

    def check_space(self, space: SearchSpace) -> None:
        """ValueError naming the differing fields when the table was built for another space."""
        fields = space_fields(space)
        if fields != self.space:
            diff = sorted(k for k in set(fields) | set(self.space)
                          if fields.get(k) != self.space.get(k))
            raise ValueError(f"latency table was built for a different search space "
                             f"(fields {diff} differ); rebuild it for this space")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["blocks_ms"] = [{"family": f, "ffn": w, "heads": h, "ms": ms}
                          for (f, w, h), ms in sorted(self.blocks_ms.items())]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        d = dict(d)
        d["blocks_ms"] = {(b["family"], int(b["ffn"]), int(b["heads"])): float(b["ms"])
                          for b in d["blocks_ms"]}
        return cls(**d)


# ----------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------

def default_latency_dir() -> Path:
    """``<default cache dir>/latency`` (see ``elm_jax.data.corpus.default_cache_dir``)."""
    from elm_jax.data.corpus import default_cache_dir

    return Path(default_cache_dir()) / "latency"


def load_or_build(space: SearchSpace, latency_cfg: Any, seq_len: int,
                  cache_dir: str | os.PathLike | None = None) -> LatencyTable:
    """The table for ``space`` on this device, from ``<cache_dir>/latency-<key>.json`` if
    present, else measured (:meth:`LatencyTable.build`) and written atomically.

    ``latency_cfg`` is ``cfg.latency``: ``batch``, ``seq_len`` (0 -> the ``seq_len``
    argument, i.e. ``data.seq_len``), the timing policy (``TimingPolicy.from_config``:
    ``repeats``, ``warmup``, ``quantile``, ``min_time_s``) and ``cache_dir``. The cache
    directory is the ``cache_dir`` argument, else ``latency_cfg.cache_dir``, else
    :func:`default_latency_dir`. An unreadable or mismatched cache file (another space,
    shape or timing policy) is rebuilt."""
    batch, length = _shape(latency_cfg, seq_len)
    policy = TimingPolicy.from_config(latency_cfg)
    root = cache_dir or get_field(latency_cfg, "cache_dir", "", none_is_default=True) or default_latency_dir()
    key = LatencyTable.key(space, batch, length)
    path = Path(root) / f"latency-{key}.json"
    if path.is_file():
        try:
            with open(path) as f:
                table = LatencyTable.from_dict(json.load(f))
            if (table.version == TABLE_VERSION and table.space == space_fields(space)
                    and table.batch == batch and table.seq_len == length
                    and table.policy == policy):
                return table
        except (OSError, ValueError, KeyError, TypeError):
            pass  # corrupt or from an older format: measure again
    table = LatencyTable.build(space, batch, length, policy)
    atomic_write_json(path, table.to_dict())
    return table


def _shape(latency_cfg: Any, seq_len: int) -> tuple[int, int]:
    """``(batch, seq_len)`` of every latency of ``cfg.latency`` (``seq_len`` 0 -> the
    ``seq_len`` argument, i.e. ``data.seq_len``)."""
    batch = int(get_field(latency_cfg, "batch", 1, none_is_default=True))
    length = int(get_field(latency_cfg, "seq_len", 0, none_is_default=True)) or int(seq_len)
    return batch, length


# ----------------------------------------------------------------------------------
# Exported models: the prediction and the measurement that are compared
# ----------------------------------------------------------------------------------


def wanted(cfg: Any) -> bool:
    """Whether a run has a latency table: ``cfg.latency.predict`` or a budget of
    ``cfg.search.budgets`` with a latency bound (the search stage's rule)."""
    budgets = get_field(cfg, "search.budgets", (), none_is_default=True)
    return bool(get_field(cfg, "latency.predict", False, none_is_default=True)) or any(
        k.endswith("latency_ms") for b in budgets for k in b)


def table_for(cfg: Any, space: SearchSpace) -> LatencyTable | None:
    """The run's latency table (:func:`load_or_build` with ``cfg.latency``, the table the
    search used, from the cache) when :func:`wanted`, else None."""
    if not wanted(cfg):
        return None
    return load_or_build(space, cfg.latency, int(cfg.data.seq_len))


def predict_exported_ms(table: LatencyTable | None, space: SearchSpace,
                        model_cfg: DenseConfig) -> float | None:
    """Predicted latency (ms) of an exported model AS EXPORTED: its own config's blocks, i.e.
    the head counts after the CKA head module (``models.extract.with_heads``), not the
    architecture's pre-CKA heads. None without a table. ValueError for a table of another space."""
    if table is None:
        return None
    table.check_space(space)
    return table.predict_config_ms(model_cfg)


def measure_exported_ms(model: Any, latency_cfg: Any, seq_len: int, *, seed: int = 0) -> float:
    """End-to-end latency (ms) of an exported dense model, measured like the table's parts:
    the shape of ``cfg.latency`` and its timing policy (``TimingPolicy.from_config``),
    :func:`~elm_jax.timing.measure_model_ms`."""
    batch, length = _shape(latency_cfg, seq_len)
    return timing.measure_model_ms(model, batch, length, TimingPolicy.from_config(latency_cfg),
                                   seed=seed)


# ----------------------------------------------------------------------------------
# End-to-end check
# ----------------------------------------------------------------------------------


def check(table: LatencyTable, space: SearchSpace, widths: Any, archs: Sequence[Arch], *,
          policy: TimingPolicy | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Checks the table against end-to-end timing: for each arch, the dense model of
    ``dense_config(space, arch, widths)`` with random init (:func:`init_dense`) is timed
    end to end (batch and seq_len of the table; all models interleaved, see
    :func:`~elm_jax.timing.measure_many`, under the table's policy unless given) and compared with
    :meth:`LatencyTable.predict_ms`.

    Returns one row per arch: ``arch_id``, ``describe``, ``params``, ``predicted_ms``,
    ``measured_ms`` and ``rel_err = |predicted - measured| / measured``."""
    policy = table.policy if policy is None else policy
    ids, mask = model_inputs(space.vocab_size, table.batch, table.seq_len, seed)
    items, preds = {}, {}
    for i, a in enumerate(archs):
        preds[i] = table.predict_ms(space, a, widths)
        model = init_dense(dense_config(space, a, widths), seed)
        items[str(i)] = model_item(model, ids, mask)
    measured = timing.measure_many(items, policy, seed=seed)
    rows = []
    for i, a in enumerate(archs):
        meas = 1e3 * measured[str(i)]
        rows.append({"arch_id": a.arch_id, "describe": a.describe(),
                     "params": count_params(space, a, widths),
                     "predicted_ms": preds[i], "measured_ms": meas,
                     "rel_err": abs(preds[i] - meas) / meas})
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Summary of :func:`check` rows (or any rows with ``predicted_ms``, ``measured_ms`` and
    ``rel_err``): ``n``, ``median_rel_err``, ``mean_rel_err`` and ``max_rel_err`` (of the
    absolute relative errors) and ``mean_signed_rel_err`` (mean of (pred - meas) / meas,
    positive = the table over-predicts)."""
    if not rows:
        nan = float("nan")
        return {"n": 0, "median_rel_err": nan, "mean_rel_err": nan, "max_rel_err": nan,
                "mean_signed_rel_err": nan}
    errs = [float(r["rel_err"]) for r in rows]
    signed = [(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] for r in rows]
    return {"n": len(rows), "median_rel_err": float(np.median(errs)),
            "mean_rel_err": float(np.mean(errs)), "max_rel_err": float(np.max(errs)),
            "mean_signed_rel_err": float(np.mean(signed))}


__all__ = [
    "TABLE_VERSION", "LatencyTable", "TimingPolicy", "check", "default_latency_dir",
    "expected_block_keys", "load_or_build", "measure_exported_ms", "predict_exported_ms",
    "reachable_widths", "space_fields", "summarize", "table_for", "wanted"
]
