"""Device mesh and shardings for data parallelism plus optional FSDP.

One code path for one CPU, 8 fake CPU devices in tests, a GPU host or a TPU pod
slice: the mesh always has the axes ``('data', 'fsdp')``; the batch is split over
both axes (every device sees a distinct slice of the batch), and with ``fsdp > 1``
the larger parameters (and the optimizer moments that mirror them) are split over
``'fsdp'`` so their memory is divided; ``jax.jit`` inserts the all-gathers and
reduce-scatters. State shardings are derived from an *abstract* state
(``jax.eval_shape``), so nothing has to be materialised to plan the layout.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from elm_jax.fields import get as get_field

MESH_AXES: tuple[str, str] = ("data", "fsdp")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``('data', 'fsdp')`` mesh over all (global) devices.

    Args:
      mesh_cfg: object with ``data`` (int, ``-1`` = all devices not used by the other
        axes) and ``fsdp`` (int, default 1). ``None`` means data=-1, fsdp=1.
      devices: devices to use (default ``jax.devices()``, i.e. all processes'
        devices). Tests pass a subset, e.g. one device.

    Raises:
      ValueError: naming the field (``mesh.data`` / ``mesh.fsdp``) when the axis sizes
        are invalid or their product differs from the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data = int(get_field(mesh_cfg, "data", -1))
    fsdp = int(get_field(mesh_cfg, "fsdp", 1))
    if fsdp < 1:
        raise ValueError(f"mesh.fsdp must be >= 1, got {fsdp}")
    if data == -1:
        if n % fsdp:
            raise ValueError(
                f"mesh.fsdp={fsdp} does not divide the device count {n}, so mesh.data=-1 "
                "cannot take the remaining devices"
            )
        data = n // fsdp
    elif data < 1:
        raise ValueError(f"mesh.data must be >= 1 or -1 (all remaining devices), got {data}")
    if data * fsdp != n:
        raise ValueError(
            f"mesh.data * mesh.fsdp = {data} * {fsdp} = {data * fsdp} does not match the "
            f"device count {n}; set mesh.data=-1 to use all remaining devices"
        )
    # Auto axis types: shardings are given explicitly to jax.jit (the lm1b_nnx style),
    # not carried in the types of traced values.
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over all mesh axes; other dims whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated on every device of the mesh."""
    return NamedSharding(mesh, P())


def _leaf_spec(shape: tuple[int, ...], fsdp: int, min_ndim: int) -> P:
    """The FSDP partition spec of one array: largest dim divisible by ``fsdp``."""
    if fsdp <= 1 or len(shape) < min_ndim:
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp == 0 and d >= fsdp and (best is None or d > shape[best]):
            best = i
    if best is None:
        return P()
    spec: list[Any] = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, *, min_ndim: int = 2) -> Any:
    """Shardings for every leaf of an abstract (``jax.eval_shape``) state.

    With ``fsdp == 1`` everything is replicated (pure data parallelism). Otherwise
    each array with ``ndim >= min_ndim`` is split over ``'fsdp'`` along its largest
    dimension divisible by the fsdp size, and replicated when none is. Vectors
    (biases, norm scales, the step counter, PRNG key data) stay replicated: they are
    small and sharding them only adds collectives. Optimizer moments have the same
    shapes as their parameters, so the rule gives them the same sharding ("optimizer
    state follows params") without needing to know the optimizer's tree.

    Returns a pytree of ``NamedSharding`` with the structure of ``abstract_state``.
    """
    fsdp = int(mesh.shape["fsdp"])

    def one(leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        return NamedSharding(mesh, _leaf_spec(shape, fsdp, min_ndim))

    return jax.tree.map(one, abstract_state)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global ``jax.Array`` batches from each process's local shard.

    Every process passes only the rows it loaded (its ``1/process_count`` slice of the
    global batch, in process order); ``jax.make_array_from_process_local_data`` infers
    the global shape and places the rows on the process's devices. On one process this
    is simply a sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    n_batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * jax.process_count()
        if global_rows % n_batch_shards:
            raise ValueError(
                f"batch '{k}': global batch size {global_rows} is not divisible by the "
                f"{n_batch_shards} batch shards of the mesh {dict(mesh.shape)}"
            )
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def sharded_sums(mesh: Mesh, sums_fn: Callable[..., dict], groups: int = 1,
                 prepare: Callable[..., dict] | None = None) -> Callable:
    """``(model, batch, *frozen) -> sums``: ``sums_fn`` per device under ``shard_map``, summed
    over devices. ``frozen`` pytrees (a teacher's weights) are passed whole to every device.

    ``groups > 1``: each device's rows are ``groups`` equal contiguous blocks (each with its own
    architecture, :mod:`elm_jax.data.arch_batches`), and ``sums_fn`` runs once per block, the
    sums added: ``sum_d sum_g sums_fn(rows of block g on device d)``. On one device with ``G``
    groups this is the same sum as on ``G`` devices with one each.

    ``prepare``: ``(batch, *frozen) -> batch``, run once on each device's rows before they are
    split into blocks; every leaf it adds must have the rows on its first axis (it is sliced
    with them). For work that is the same whatever the blocks' architectures, such as the frozen
    teacher's features: one forward over all the rows instead of ``groups`` small ones."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")

    def run(model: nnx.Module, batch: dict, *frozen: Any) -> dict:
        graphdef, state = nnx.split(model)

        def per_device(state, batch, *frozen):
            m = nnx.merge(graphdef, state)
            if prepare is not None:
                batch = prepare(batch, *frozen)
            rows = next(iter(batch.values())).shape[0]
            if rows % groups:
                raise ValueError(f"{rows} rows per device cannot be split into {groups} equal groups")
            per = rows // groups
            sums = None
            for g in range(groups):
                part = sums_fn(m, jax.tree.map(lambda x: x[g * per:(g + 1) * per], batch), *frozen)
                sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
            return jax.tree.map(lambda v: jax.lax.psum(v, axes), sums)

        specs = (P(), P(axes)) + (P(),) * len(frozen)
        return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(),
                             check_vma=False)(state, batch, *frozen)

    return run
