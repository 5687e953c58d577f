"""Work-directory safety: one run at a time, and no silent mixing of configs.

**Lock.** ``WORKDIR/.lock`` is held with ``fcntl.flock`` for the whole run and records the pid,
host and start time of its holder. A second run on the same directory refuses at once, naming
the holder. The kernel releases a ``flock`` when its process dies (SIGKILL, OOM, power-off of
the VM), so a dead run never blocks the next one; there is nothing to clean up by hand. On NFS
``flock`` is emulated with ``fcntl`` byte-range locks (Linux >= 2.6.12), which also die with
their process. Multi-host runs: only process 0 takes the lock (the other processes take part
in the same run).

**Config fingerprints.** ``WORKDIR/fingerprints.json`` records, per stage, the config fields
that stage's results depend on (``config_fields`` of :data:`elm_jax.pipeline.STAGES`, which
the caller passes in as ``specs``; a stage also depends on everything upstream). Before a stage runs, a changed field of it or of an upstream stage whose outputs
exist is refused with a message naming the fields and stages; ``--allow_config_change`` instead
deletes the invalidated stages' outputs (and everything downstream) so they are redone.

Fields that do not change results never trigger it: logging/evaluation/checkpoint intervals,
``keep_checkpoints``, ``nan_policy`` (switching to ``skip`` after a NaN stop is the intended
recovery), ``supernet.remat`` (the same math with less memory), ``mesh.*`` and
``distributed.*`` (how devices are used), cache directories, ``teacher.cache``,
``compile_cache_dir``, and the
latency measurement's ``repeats`` / ``warmup`` (timing noise only).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from elm_jax.fileio import atomic_write_json

LOCK_FILE = ".lock"
FINGERPRINT_FILE = "fingerprints.json"

# Fields under those prefixes that do not change results ('*' = any one component).
IGNORED_FIELDS: tuple[str, ...] = (
    "data.cache_dir",
    "*.train.log_every", "*.train.eval_every", "*.train.checkpoint_every",
    "*.train.keep_checkpoints", "*.train.nan_policy",
    "finetune.teacher_train.log_every", "finetune.teacher_train.eval_every",
    "finetune.teacher_train.checkpoint_every", "finetune.teacher_train.keep_checkpoints",
    "finetune.teacher_train.nan_policy",
    "supernet.remat",
    "teacher.cache",
    "finetune.tfds_data_dir",
)


class WorkdirError(ValueError):
    """The work directory cannot be used as asked (busy, or made with another config)."""


# ---------------------------------------------------------------------------------------------
# Lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"
            f" ({info.get('command', '')})").replace(" ()", "")


@contextlib.contextmanager
def locked(workdir: str | os.PathLike, command: str = "") -> Iterator[Path]:
    """Holds the exclusive lock of ``workdir`` (created if missing) for the block.

    Raises:
      WorkdirError: another live process holds it; the message names that process.
    """
    wd = Path(workdir)
    try:
        wd.mkdir(parents=True, exist_ok=True)
        path = wd / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"--workdir={wd}: cannot create the work directory or its lock file "
                           f"({e.strerror}); choose a writable directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirError(
                f"--workdir={wd} is in use by another run ({_holder(path)}); wait for it to finish, "
                f"stop it, or choose another --workdir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------------------------------------
# Config fingerprints


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted.field: JSON value}`` over nested mappings (lists/tuples are leaf values)."""
    if hasattr(node, "to_dict"):
        node = node.to_dict()
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k in sorted(node):
            out.update(_flatten(node[k], f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(node, default=str))}


def _ignored(field: str) -> bool:
    parts = field.split(".")
    for pat in IGNORED_FIELDS:
        p = pat.split(".")
        if len(p) == len(parts) and all(a in ("*", b) for a, b in zip(p, parts)):
            return True
    return False


def stage_fields(cfg: Any, stage: Any) -> dict[str, Any]:
    """The values of the config fields ``stage``'s own results depend on (``stage`` a
    :class:`elm_jax.pipeline.Stage`)."""
    prefixes = stage.config_fields
    if stage.name == "teacher" and not str(_flatten(cfg).get("teacher.source", "train")).startswith("train"):
        prefixes = ("teacher.source", "precision")  # a pretrained teacher: its model/train unused
    reranks = stage.name == "search" and int(_flatten(cfg).get("search.rerank_top", 0) or 0) > 0
    if reranks:
        prefixes = (*prefixes, "retrain", "precision")  # re-ranking trains with the retraining recipe
    out = fields_under(cfg, prefixes)
    if out.get("supernet.paths_per_device") == 1:
        # one path per device is what every run did before the field existed: a work directory
        # made then stays valid
        out.pop("supernet.paths_per_device")
    if stage.name == "search" and not reranks:
        # the tie rule of a re-ranking that does not run changes nothing (and a work directory
        # made before the field existed stays valid)
        out.pop("search.rerank_tie_level", None)
    return out


def fields_under(cfg: Any, prefixes: Sequence[str]) -> dict[str, Any]:
    """``{dotted.field: value}`` of the config fields at or under ``prefixes`` that change
    results (not :data:`IGNORED_FIELDS`)."""
    return {k: v for k, v in _flatten(cfg).items()
            if any(k == p or k.startswith(p + ".") for p in prefixes) and not _ignored(k)}


def _has_output(workdir: Path, stage: str) -> bool:
    d = workdir / stage
    if stage == "data":  # always recomputed from the (cached) corpus
        return False
    return d.is_dir() and any(d.iterdir())


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k, "<unset>") != new.get(k, "<unset>"):
            out.append(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}")
    return out


def load_fingerprints(workdir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The recorded fields per stage (empty for a new directory)."""
    path = Path(workdir) / FINGERPRINT_FILE
    try:
        return dict(json.loads(path.read_text()).get("stages", {}))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}); delete it to re-record the config "
                           f"(earlier stages are then trusted as they are)") from None


def check_config(cfg: Any, workdir: str | os.PathLike, stages: Sequence[str], specs: Sequence[Any], *,
                 allow_change: bool = False, write: bool = True) -> list[str]:
    """Compares ``cfg`` with the fields recorded for ``stages`` and their upstream stages.

    A changed field matters when the stage it belongs to, or a downstream one, has outputs.
    Without ``allow_change`` that raises :class:`WorkdirError` naming the fields, the stages
    and the ways out; with it, the outputs of the first invalidated stage and of every stage
    after it are deleted. Then (with ``write``, on process 0) the current fields of the checked
    stages are recorded. ``specs`` is the stage registry (:data:`elm_jax.pipeline.STAGES`).
    Returns the names of the deleted stage directories.
    """
    wd = Path(workdir)
    by_name = {s.name: s for s in specs}
    fingerprinted = tuple(s.name for s in specs if s.config_fields is not None)  # fingerprinted, in order
    requested = [s for s in stages if s in fingerprinted]
    if not requested:
        return []
    last = max(fingerprinted.index(s) for s in requested)
    checked = fingerprinted[: last + 1]
    recorded = load_fingerprints(wd)
    first_bad, changes = None, []
    for i, stage in enumerate(checked):
        old = recorded.get(stage)
        if old is None:
            continue
        diff = _diff(old.get("fields", {}), stage_fields(cfg, by_name[stage]))
        if diff and any(_has_output(wd, s) for s in fingerprinted[i:]):
            first_bad, changes = stage, diff
            break
    removed: list[str] = []
    if first_bad is not None:
        affected = [s for s in fingerprinted[fingerprinted.index(first_bad):] if _has_output(wd, s)]
        shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
        if not allow_change:
            raise WorkdirError(
                f"--workdir={wd} was made with a different config: {shown} (fields of the "
                f"{first_bad!r} stage); the existing outputs of {', '.join(affected)} would no longer "
                f"match. Use a new --workdir, or rerun with --allow_config_change to delete and redo "
                f"them.")
        if write:
            later = [s.name for s in specs][[s.name for s in specs].index(first_bad):]
            for s in later:
                if (wd / s).exists():
                    shutil.rmtree(wd / s)
                    removed.append(s)
            for s in fingerprinted[fingerprinted.index(first_bad):]:
                recorded.pop(s, None)
    if write:
        for stage in checked:
            if stage in requested or stage not in recorded:
                recorded[stage] = {"fields": stage_fields(cfg, by_name[stage])}
        atomic_write_json(wd / FINGERPRINT_FILE, {"version": 1, "stages": recorded})
    return removed


# ---------------------------------------------------------------------------------------------
# Inputs of a run


def check_inputs(workdir: str | os.PathLike, stages: Sequence[str], specs: Sequence[Any]) -> None:
    """Raises :class:`WorkdirError` when a requested stage needs the output of a stage that is
    neither complete in ``workdir`` nor requested before it (e.g. ``--stages=search`` on a
    directory without a trained supernet), before anything is computed. ``specs`` is the stage
    registry (:data:`elm_jax.pipeline.STAGES`: each stage's ``needs`` and ``complete``)."""
    wd = Path(workdir)
    by_name = {s.name: s for s in specs}
    order = [s.name for s in specs]
    for stage in stages:
        for options in by_name[stage].needs:
            earlier = [s for s in stages if order.index(s) < order.index(stage)]
            if not any(s in earlier or by_name[s].complete(workdir) for s in options):
                what = " or ".join(options)
                raise WorkdirError(
                    f"--stages={','.join(stages)}: the {stage} stage needs the output of the {what} "
                    f"stage, which {wd} does not have; add {options[0]} to --stages (or use "
                    f"--stages=all)")
