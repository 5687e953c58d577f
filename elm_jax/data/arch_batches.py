"""Batch sources that carry the sampled architecture, so one compiled step serves them all.

The architecture travels inside the batch as per-example rows ``arch_<field>`` of shape
``[B, L]`` (fields of :class:`~elm_jax.arch.ArchArrays`). A supernet step runs under
``jax.shard_map`` over the batch axes of the mesh (:func:`elm_jax.engine.sharding.sharded_sums`),
and every device reads the architecture of its first local example (:func:`local_arch`), so

- ``mode='step'``: every row holds the same architecture (one per step);
- ``mode='device'``: the rows of device ``d`` hold architecture ``d`` (one per data-parallel
  device, each device running its own ``lax.switch`` path, as a pmapped step would); with
  ``paths_per_device=G`` they hold ``G`` architectures on ``G`` equal blocks, which the step
  runs one after the other (``sharded_sums(..., groups=G)``), so the sandwich rule's several
  paths fit on one device.

:class:`ArchBatches` samples the architectures on the host as a pure function of
``(seed, step)``; :class:`FixedArchBatches` attaches one fixed architecture (evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from elm_jax.arch import Arch, ArchArrays
from elm_jax.space import SearchSpace

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ArchArrays))


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


class ArchBatches:
    """Wraps a batch source: adds the sampled architecture rows to every training batch.

    Architectures of step ``s`` are drawn from ``np.random.default_rng([seed, 0xA5C7, s])``:
    a resumed run samples the same ones. ``widths`` is the current widths state ``[L, 2, T]``;
    it grows during supernet training, and whoever grows it assigns the new array to the
    ``widths`` attribute (:class:`elm_jax.stages.supernet.SupernetHooks` does, for the sources it
    is given).
    """

    def __init__(self, source: Any, space: SearchSpace, widths: np.ndarray, *,
                 mode: str, num_devices: int, seed: int, sandwich: bool = False,
                 paths_per_device: int = 1):
        if mode not in ("step", "device"):
            raise ValueError(f"supernet.sample_per must be 'step' or 'device', got {mode!r}")
        paths_per_device = int(paths_per_device)
        if paths_per_device < 1 or (paths_per_device > 1 and mode != "device"):
            raise ValueError("supernet.paths_per_device must be >= 1, and 1 unless sample_per='device'; got "
                             f"{paths_per_device} with {mode!r}")
        if sandwich and (mode != "device" or num_devices * paths_per_device < 3):
            raise ValueError("the sandwich rule needs supernet.sample_per='device' and at least 3 "
                             "paths per step (data-parallel devices x supernet.paths_per_device: largest, "
                             f"smallest, random); got {mode!r} with {num_devices} x {paths_per_device}")
        self.source, self.space, self.widths = source, space, space.validate_widths(widths)
        self.mode, self.num_devices, self.seed, self.sandwich = mode, num_devices, seed, sandwich
        self.paths_per_device = paths_per_device

    def archs(self, step: int) -> list[Arch]:
        """The architectures of step ``step``: one, or ``paths_per_device`` per device, in device
        order (sandwich: the largest and the smallest under the current widths first, random
        ones after)."""
        rng = np.random.default_rng([self.seed, 0xA5C7, step])
        n = self.num_devices * self.paths_per_device if self.mode == "device" else 1
        if not self.sandwich:
            return [self.space.sample(rng) for _ in range(n)]
        w = self.widths
        return [self.space.largest(w), self.space.smallest(w)] + [self.space.sample(rng) for _ in range(n - 2)]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        local = self.source.batch(step, process_index, process_count)
        rows = len(local["inputs"])
        archs = self.archs(step)
        if len(archs) > 1:  # this process's devices hold a contiguous block of architectures
            per_proc = len(archs) // process_count
            archs = archs[process_index * per_proc:(process_index + 1) * per_proc]
        w = self.widths
        return local | arch_rows([self.space.to_arrays(a, w) for a in archs], rows)


class FixedArchBatches:
    """Evaluation batches of one fixed architecture under the widths state ``widths`` (an
    attribute: assign a new array when the widths grow, as for :class:`ArchBatches`)."""

    def __init__(self, source: Any, space: SearchSpace, arch: Arch, widths: np.ndarray):
        self.source, self.space, self.arch = source, space, arch
        self.widths = space.validate_widths(widths)

    def batches(self, process_index: int = 0, process_count: int = 1):
        arrays = self.space.to_arrays(self.arch, self.widths)
        for b in self.source.batches(process_index, process_count):
            yield b | arch_rows([arrays], len(b["inputs"]))
