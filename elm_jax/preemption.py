"""SIGTERM as a preemption notice: remember it, let the running stage stop at a safe point.

Preemptible Cloud TPU VMs and batch schedulers send SIGTERM some seconds before they kill a
job. Inside :func:`watch` a SIGTERM only sets a process-wide flag; each stage polls it at
points where its progress is on disk (the training engine after every step, the search after
every generation, the export between models, ``main`` between stages), saves what it has and
raises :class:`Preempted`. ``main`` turns that into a message and exit code 75
(``EX_TEMPFAIL``: rerun the same command to resume).

Multi-process runs (``jax.distributed`` initialised) must stop at the same step on every
process, so there the SIGTERM belongs to JAX's preemption sync service (which the training
engine polls) and :func:`watch` installs no Python handler, which would replace the service's.
The stages without the engine (search, export) then finish their work and the next training
stage stops at the agreed step; their per-generation / per-model outputs make a hard kill cheap.
:func:`agreed` (an all-gather of the flags) keeps their polls collective.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

_FLAG = threading.Event()
_LOCK = threading.Lock()
_DEPTH = 0
_PREVIOUS: Any = None


class Preempted(RuntimeError):
    """SIGTERM (preemption) received: progress was saved; rerun the same command to resume."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def _handler(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    _FLAG.set()


def _multi_process() -> bool:
    import jax

    return bool(jax.distributed.is_initialized())


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Within this context SIGTERM sets the preemption flag instead of killing the process.

    Nests (only the outermost level installs and later restores the previous handler, and
    clears the flag when it exits, so a consumed notice does not leak into later work). Outside
    the main thread (where Python cannot install handlers) and in multi-process runs (JAX's
    preemption service owns SIGTERM there) it is a no-op.
    """
    global _DEPTH, _PREVIOUS
    if threading.current_thread() is not threading.main_thread() or _multi_process():
        yield
        return
    with _LOCK:
        if _DEPTH == 0:
            _PREVIOUS = signal.signal(signal.SIGTERM, _handler)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                signal.signal(signal.SIGTERM, _PREVIOUS)
                _PREVIOUS = None
                _FLAG.clear()


def requested() -> bool:
    """True once a SIGTERM arrived inside :func:`watch` (this process only)."""
    return _FLAG.is_set()


def request() -> None:
    """Sets the flag as a SIGTERM would (tests, or an embedding program's own notice)."""
    _FLAG.set()


def agreed() -> bool:
    """True when any process got the notice: a collective, so every process must call it at
    the same points; with one process it is :func:`requested`."""
    import jax

    if jax.process_count() == 1:
        return requested()
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(int(requested()), np.int32))
    return bool(np.any(flags))
