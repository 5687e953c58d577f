"""Population scoring: ONE compiled call scores a whole population of architectures (DESIGN §4).

Architectures enter as
  stacked :class:`~elm_jax.arch.ArchArrays` ``[C, L]`` (``C`` a fixed capacity, a multiple of the
  device count, padded with copies of the first architecture), split over every device of the
  mesh with ``jax.shard_map``; parameters and the fixed validation batches ``[K, B, S]`` are
  replicated. Each device runs ``jax.lax.map`` over its architectures and over the batches, so
  the supernet's ``lax.switch`` stays a real branch per architecture (a ``vmap`` would turn it
  into a select that runs every family). The fitness is the validation loss of the inherited
  weights, the token mean cross-entropy ``sum_k loss_sum_k / sum_k weight_sum_k`` over the
  fixed batches (CLM perplexity = ``exp(loss)``, the same ranking). :meth:`PopulationScorer.
  score_one` is the reference: the extracted dense model evaluated on the same batches.
"""


from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elm_jax.arch import Arch, ArchArrays, stack_arrays
from elm_jax.data.pipeline import scored_positions
from elm_jax.engine.losses import weighted_cross_entropy
from elm_jax.search.constraints import SearchError
from elm_jax.space import SearchSpace

BATCH_KEYS = ("inputs", "targets", "weights", "mask", "segment_ids")


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` with ``sharding`` built from a host array every process holds
    in full (works on one host and across hosts, unlike ``device_put`` of a local array)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _stack_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{key: [K, B, S]}`` from ``K`` batches of ``[B, S]`` arrays (``mask`` defaults to ones,
    ``segment_ids`` to zeros); every batch must have the same shape."""
    if not batches:
        raise SearchError("the population scorer needs at least one validation batch")
    shape = np.shape(batches[0]["inputs"])
    out: dict[str, list[np.ndarray]] = {k: [] for k in BATCH_KEYS}
    for i, b in enumerate(batches):
        for k in ("inputs", "targets", "weights"):
            if k not in b:
                raise SearchError(f"validation batch {i} lacks {k!r}; it has {sorted(b)}")
        if np.shape(b["inputs"]) != shape or len(shape) != 2:
            raise SearchError(f"validation batch {i} has inputs of shape {np.shape(b['inputs'])}; "
                              f"every batch must be [B, S] = {shape}")
        out["inputs"].append(np.asarray(b["inputs"], np.int32))
        out["targets"].append(np.asarray(b["targets"], np.int32))
        out["weights"].append(np.asarray(b["weights"], np.float32))
        out["mask"].append(np.asarray(b["mask"], np.int32) if b.get("mask") is not None
                           else np.ones(shape, np.int32))
        out["segment_ids"].append(np.asarray(b["segment_ids"], np.int32)
                                  if b.get("segment_ids") is not None else np.zeros(shape, np.int32))
    stacked = {k: np.stack(v) for k, v in out.items()}
    for k, v in stacked.items():
        if v.shape != stacked["inputs"].shape:
            raise SearchError(f"validation batches: {k!r} has shape {v.shape[1:]}, inputs {shape}")
    if stacked["weights"].sum() <= 0:
        raise SearchError("the validation batches carry no target tokens (all weights are 0)")
    return stacked


def _head_positions(stacked: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The scored positions of fixed batches, for evaluating the LM head only there.

    ``positions [NB, B, K]`` lists each row's positions of non-zero weight (padded with
    position 0 at weight 0), ``K`` the largest count of any row; ``targets_k`` / ``weights_k``
    are gathered likewise. The summed loss is unchanged (padded slots weigh 0), and an MLM
    batch (~15% of positions scored) then spends ~1/5 of the head's FLOPs. ``None`` when
    some row is scored at every position, where gathering would save nothing.
    """
    w = stacked["weights"]
    k = int((w > 0).sum(-1).max())
    if k >= w.shape[-1]:
        return None
    return scored_positions(stacked["targets"], w, max(k, 1))


def _metrics_from_sums(sums: np.ndarray, task: str) -> dict[str, np.ndarray]:
    """``loss = loss_sum / weight_sum``, ``accuracy = correct_sum / weight_sum`` (and
    ``perplexity = exp(loss)`` for CLM) from ``[P, 3]`` sums."""
    sums = np.asarray(sums, np.float64)
    w = np.maximum(sums[:, 1], 1e-12)
    out = {"loss": sums[:, 0] / w, "accuracy": sums[:, 2] / w}
    if task == "clm":
        out["perplexity"] = np.exp(out["loss"])
    return out


class PopulationScorer:
    """Scores populations of architectures of a supernet with ONE compiled function.

    Args:
      net: the trained :class:`~elm_jax.models.elastic.Supernet`.
      widths: its widths state ``int32 [L, 2, T]``.
      batches: the fixed validation batches (dicts of ``[B, S]`` numpy arrays ``inputs``,
        ``targets``, ``weights``, ``mask``, ``segment_ids``); every candidate sees the same ones.
      mesh: the device mesh (default: all devices on one axis). Architectures are split over
        ALL its axes; parameters and batches are replicated (compact LMs fit on one device).
      capacity: architectures per compiled call, rounded up to a multiple of the device count.
        ``None``: fixed by the first call. A larger population is scored in several calls of the
        same capacity, so the function compiles exactly once.

    The score of an architecture is its validation loss
    ``sum_k loss_sum_k / sum_k weight_sum_k`` (token-mean cross-entropy over all batches).
    """

    def __init__(self, net: Any, widths: Any, batches: Sequence[Mapping[str, Any]],
                 mesh: Mesh | None = None, *, capacity: int | None = None):
        self.net = net
        self.space: SearchSpace = net.space
        self.widths = self.space.validate_widths(widths)
        if mesh is None:
            mesh = jax.make_mesh((jax.device_count(),), ("data",),
                                 axis_types=(jax.sharding.AxisType.Auto,))
        self.mesh = mesh
        self.num_devices = int(mesh.devices.size)
        self._axes = tuple(mesh.axis_names)
        self._batches_np = _stack_batches(batches)
        self._capacity = None if capacity is None else self._round_up(int(capacity))
        self._graphdef, state = nnx.split(net)
        rep = NamedSharding(mesh, P())
        self._arch_sharding = NamedSharding(mesh, P(self._axes))
        self._state = jax.tree.map(lambda x: _global_array(np.asarray(x), rep), state)
        self._gathered = _head_positions(self._batches_np)
        device_batches = self._batches_np if self._gathered is None else {
            k: v for k, v in self._batches_np.items() if k not in ("targets", "weights")} | self._gathered
        self._batches = {k: _global_array(v, rep) for k, v in device_batches.items()}
        self._fn = jax.jit(self._build())
        self.calls = 0
        self._rows: dict[str, np.ndarray] = {}  # arch_id -> [R, 3] of every architecture scored
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ compiled function

    def _build(self) -> Callable:
        graphdef, axes = self._graphdef, self._axes

        def per_device(state: Any, arrays: ArchArrays, batches: dict) -> jax.Array:
            model = nnx.merge(graphdef, state)

            def per_row(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
                s = weighted_cross_entropy(logits[None], targets[None], weights[None])
                return jnp.stack([s["loss_sum"], s["weight_sum"], s["correct_sum"]])

            def one_arch(arch: ArchArrays) -> jax.Array:
                def one_batch(b: dict) -> jax.Array:
                    if "positions" in b:  # LM head only at the scored positions
                        out = model(b["inputs"], arch, b["mask"], b["segment_ids"],
                                    head_positions_BxK=b["positions"])
                        return jax.vmap(per_row)(out.logits, b["targets_k"], b["weights_k"])
                    out = model(b["inputs"], arch, b["mask"], b["segment_ids"])
                    return jax.vmap(per_row)(out.logits, b["targets"], b["weights"])  # [B, 3]

                rows = jax.lax.map(one_batch, batches)  # [K, B, 3]
                return rows.reshape(-1, 3)  # [K * B, 3]

            local = jax.lax.map(one_arch, arrays)  # [C / devices, R, 3], one switch path per arch
            return jax.lax.all_gather(local, axes, tiled=True)  # [C, R, 3] on every device

        return jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(axes), P()),
                             out_specs=P(), check_vma=False)

    def _round_up(self, n: int) -> int:
        n = max(int(n), 1)
        return -(-n // self.num_devices) * self.num_devices

    @property
    def capacity(self) -> int | None:
        """Architectures per compiled call (a multiple of the device count), once fixed."""
        return self._capacity

    def compilations(self) -> int:
        """How many times the scoring function has been compiled (expected: 1)."""
        return int(self._fn._cache_size())

    # ------------------------------------------------------------------ scoring

    def row_sums(self, archs: Sequence[Arch]) -> np.ndarray:
        """``float64 [P, R, 3]``: ``(loss_sum, weight_sum, correct_sum)`` of each architecture on
        each of the ``R`` rows of the fixed batches (batch-major), in the order given (padded
        slots dropped). Every result is also kept by ``arch_id`` (:meth:`rows_of`)."""
        archs = list(archs)
        rows = self._batches_np["inputs"].shape[0] * self._batches_np["inputs"].shape[1]
        if not archs:
            return np.zeros((0, rows, 3), np.float64)
        if self._capacity is None:
            self._capacity = self._round_up(len(archs))
        cap = self._capacity
        out = []
        for start in range(0, len(archs), cap):
            chunk = archs[start:start + cap]
            padded = chunk + [chunk[0]] * (cap - len(chunk))
            arrays = stack_arrays([self.space.to_arrays(a, self.widths) for a in padded])
            arrays = jax.tree.map(lambda x: _global_array(x, self._arch_sharding), arrays)
            res = np.asarray(self._fn(self._state, arrays, self._batches), np.float64)
            self.calls += 1
            out.append(res[:len(chunk)])
        res = np.concatenate(out)
        for a, r in zip(archs, res):
            self._rows[a.arch_id] = r
        return res

    def rows_of(self, archs: Sequence[Arch]) -> np.ndarray:
        """:meth:`row_sums` of ``archs``, scoring only those this scorer has not scored yet."""
        archs = list(archs)
        todo = list({a.arch_id: a for a in archs if a.arch_id not in self._rows}.values())
        if todo:
            self.row_sums(todo)
        if not archs:
            return self.row_sums([])
        return np.stack([self._rows[a.arch_id] for a in archs])

    def sums(self, archs: Sequence[Arch]) -> np.ndarray:
        """``float64 [P, 3]``: ``(loss_sum, weight_sum, correct_sum)`` of each architecture over
        all batches, in the order given (padded slots dropped)."""
        return self.row_sums(archs).sum(axis=1)

    def evaluate(self, archs: Sequence[Arch]) -> dict[str, np.ndarray]:
        """``{loss, accuracy[, perplexity]}`` arrays ``[P]`` for a population."""
        return _metrics_from_sums(self.sums(archs), self.space.task)

    def scores(self, archs: Sequence[Arch]) -> np.ndarray:
        """Validation loss ``[P]`` of each architecture (lower is better)."""
        return self.evaluate(archs)["loss"]

    def score_one(self, arch: Arch) -> float:
        """Reference score: the extracted dense model (:func:`~elm_jax.models.elastic.extract`)
        evaluated on the same batches; equals :meth:`scores` up to float tolerance."""
        from elm_jax.models.extract import extract

        dense = extract(self.net, self.widths, arch)
        b = self._batches_np
        tot = np.zeros(3, np.float64)
        for k in range(b["inputs"].shape[0]):
            out = dense(b["inputs"][k], b["mask"][k], b["segment_ids"][k])
            s = weighted_cross_entropy(out.logits, b["targets"][k], b["weights"][k])
            tot += [float(s["loss_sum"]), float(s["weight_sum"]), float(s["correct_sum"])]
        return float(_metrics_from_sums(tot[None], self.space.task)["loss"][0])

    def fingerprint(self) -> str:
        """sha256 (16 hex) of what determines every score: the space, the widths, the
        supernet parameters and the validation batches (computed once). A state file of
        another fingerprint belongs to a different search."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self.space), sort_keys=True, default=str).encode())
        h.update(self.widths.tobytes())
        for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(self.net)),
                                 key=lambda t: jax.tree_util.keystr(t[0])):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        for k in BATCH_KEYS:
            h.update(self._batches_np[k].tobytes())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
