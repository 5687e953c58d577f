"""Multi-process (multi-host) start-up.

``maybe_initialize`` must run before anything touches a JAX backend (before
``jax.devices()``, before any array is created). After it, ``jax.devices()`` lists
the devices of *all* processes, each process feeds its own data shard, only process
0 writes logs and reports, and orbax writes checkpoints collectively.

Values come from the config when set, else from the environment:
``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``; anything still unset is left to JAX's own cluster auto-detection
(SLURM, Open MPI, Kubernetes, Cloud TPU, ...).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from elm_jax.fields import get as get_field

log = logging.getLogger(__name__)

_INITIALIZED = False


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def maybe_initialize(dist_cfg: Any = None) -> bool:
    """Calls ``jax.distributed.initialize`` when ``dist_cfg.enabled``; idempotent.

    Config fields read (all optional except ``enabled``): ``coordinator_address``,
    ``num_processes``, ``process_id``, ``local_device_ids``, ``initialization_timeout``
    (seconds) and ``cpu_collectives`` (default ``'gloo'``: the cross-process collective
    implementation for CPU devices; without it CPU computations cannot span processes).

    Returns:
      True when the distributed runtime is (now) initialised by this module.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return True
    if not bool(get_field(dist_cfg, "enabled", False)):
        return False
    coordinator = get_field(dist_cfg, "coordinator_address", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = get_field(dist_cfg, "num_processes", None)
    if num_processes is None or int(num_processes) < 1:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    process_id = get_field(dist_cfg, "process_id", None)
    if process_id is None or int(process_id) < 0:
        process_id = _env_int("JAX_PROCESS_ID")
    local_device_ids = get_field(dist_cfg, "local_device_ids", None)
    timeout = int(get_field(dist_cfg, "initialization_timeout", 300) or 300)
    # Only affects CPU devices; harmless on GPU/TPU. Must be set before the CPU client
    # is created (i.e. before initialize()).
    cpu_coll = get_field(dist_cfg, "cpu_collectives", "gloo") or "gloo"
    jax.config.update("jax_cpu_collectives_implementation", cpu_coll)
    log.info(
        "jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)",
        coordinator,
        num_processes,
        process_id,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator or None,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id),
        local_device_ids=local_device_ids or None,
        initialization_timeout=timeout,
    )
    _INITIALIZED = True
    return True


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, summaries and reports."""
    return jax.process_index() == 0


def agreed(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a broadcast when there are several), so a choice
    that only process 0 can make (e.g. from files on its disk) is followed by all."""
    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(int(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag), np.int32))))


def sync(name: str) -> None:
    """Waits until every process reaches this point (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
