"""Supernet train / eval steps whose architecture is an *argument*: one compilation for all.

The architecture travels inside the batch as per-example rows ``arch_<field>`` of shape
``[B, L]`` (fields of :class:`~elm_jax.arch.ArchArrays`). The step runs the supernet under
``jax.shard_map`` over the batch axes of the mesh: every device reads the architecture of its
first local example, so

- ``mode='step'``: every row holds the same architecture (one per step);
- ``mode='device'``: the rows of device ``d`` hold architecture ``d`` (one per data-parallel
  device, each device running its own ``lax.switch`` path, as a pmapped step would).

Gradients of the replicated parameters are summed over devices by ``shard_map``'s transpose;
the loss is the global token mean ``sum(loss) / sum(weights)``. The batch rows are built on the
host by :class:`ArchBatches` as a pure function of ``(seed, step)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from elm_jax.arch import Arch, ArchArrays, SearchSpace
from elm_jax.losses import weighted_cross_entropy
from elm_jax.models.elastic import Supernet

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ArchArrays))
BATCH_AXES = ("data", "fsdp")


def arch_rows(arrays: list[ArchArrays], rows: int) -> dict[str, np.ndarray]:
    """``{arch_<field>: [rows, L]}``: architecture ``k`` on the ``k``-th equal block of rows."""
    if rows % len(arrays):
        raise ValueError(f"{rows} rows cannot be split evenly over {len(arrays)} architectures")
    per = rows // len(arrays)
    return {f"arch_{f}": np.repeat(np.stack([np.asarray(getattr(a, f)) for a in arrays]), per, axis=0)
            for f in ARCH_FIELDS}


def local_arch(batch: dict) -> ArchArrays:
    """The architecture of this device's rows (its first row)."""
    return ArchArrays(**{f: batch[f"arch_{f}"][0] for f in ARCH_FIELDS})


def _lm_sums(model: Supernet, batch: dict) -> dict:
    out = model(batch["inputs"], local_arch(batch), batch["mask"], batch["segment_ids"])
    return weighted_cross_entropy(out.logits, batch["targets"], batch["weights"])


def sharded_sums(mesh: Mesh, sums_fn: Callable[..., dict]) -> Callable:
    """``(model, batch, *frozen) -> sums``: ``sums_fn`` per device under ``shard_map``, summed
    over devices. ``frozen`` pytrees (a teacher's weights) are passed whole to every device."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)

    def run(model: nnx.Module, batch: dict, *frozen: Any) -> dict:
        graphdef, state = nnx.split(model)

        def per_device(state, batch, *frozen):
            sums = sums_fn(nnx.merge(graphdef, state), batch, *frozen)
            return jax.tree.map(lambda v: jax.lax.psum(v, axes), sums)

        specs = (P(), P(axes)) + (P(),) * len(frozen)
        return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(),
                             check_vma=False)(state, batch, *frozen)

    return run


def supernet_lm_fns(mesh: Mesh) -> tuple[Callable, Callable]:
    """The engine's ``loss_fn`` and ``eval_fn`` for ground-truth LM training of the supernet
    (mean token cross-entropy of each row's architecture). Distillation builds on the same
    :func:`sharded_sums`."""
    sums = sharded_sums(mesh, _lm_sums)

    def loss_fn(model, batch, rng):
        del rng  # the supernet has no dropout
        s = sums(model, batch)
        return s["loss_sum"] / jnp.maximum(s["weight_sum"], 1.0), s

    return loss_fn, sums


class ArchBatches:
    """Wraps a batch source: adds the sampled architecture rows to every training batch.

    Architectures of step ``s`` are drawn from ``np.random.default_rng([seed, 0xA5C7, s])``:
    a resumed run samples the same ones. ``widths`` is a callable returning the current widths
    state (it grows during supernet training).
    """

    def __init__(self, source: Any, space: SearchSpace, widths: Callable[[], np.ndarray], *,
                 mode: str, num_devices: int, seed: int, sandwich: bool = False):
        if mode not in ("step", "device"):
            raise ValueError(f"supernet.sample_per must be 'step' or 'device', got {mode!r}")
        if sandwich and (mode != "device" or num_devices < 3):
            raise ValueError("the sandwich rule needs supernet.sample_per='device' and at least 3 "
                             f"data-parallel devices (largest, smallest, random); got {mode!r} "
                             f"with {num_devices}")
        self.source, self.space, self.widths = source, space, widths
        self.mode, self.num_devices, self.seed, self.sandwich = mode, num_devices, seed, sandwich

    def archs(self, step: int) -> list[Arch]:
        """The architectures of step ``step``: one, or one per device (sandwich: the largest
        and the smallest under the current widths on the first two devices, random ones on
        the rest)."""
        rng = np.random.default_rng([self.seed, 0xA5C7, step])
        n = self.num_devices if self.mode == "device" else 1
        if not self.sandwich:
            return [self.space.sample(rng) for _ in range(n)]
        w = self.widths()
        return [self.space.largest(w), self.space.smallest(w)] + [self.space.sample(rng) for _ in range(n - 2)]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        local = self.source.batch(step, process_index, process_count)
        rows = len(local["inputs"])
        archs = self.archs(step)
        if len(archs) > 1:  # this process's devices hold a contiguous block of architectures
            per_proc = len(archs) // process_count
            archs = archs[process_index * per_proc:(process_index + 1) * per_proc]
        w = self.widths()
        return local | arch_rows([self.space.to_arrays(a, w) for a in archs], rows)


class FixedArchBatches:
    """Evaluation batches of one fixed architecture; ``widths`` is an array or a callable
    returning the current widths state (read at each evaluation)."""

    def __init__(self, source: Any, space: SearchSpace, arch: Arch, widths: Any):
        self.source, self.space, self.arch, self.widths = source, space, arch, widths

    def batches(self, process_index: int = 0, process_count: int = 1):
        w = self.widths() if callable(self.widths) else self.widths
        arrays = self.space.to_arrays(self.arch, w)
        for b in self.source.batches(process_index, process_count):
            yield b | arch_rows([arrays], len(b["inputs"]))
