"""The teacher cache: a teacher trained here is trained once per corpus, tokenizer, config and code.

Training the demo teacher is most of what ``make run`` costs (minutes on a laptop), and it is the
same teacher in every work directory made with the same inputs. So the teacher stage stores the
teacher it trained under ``<data cache dir>/teachers/<key>/`` (its model directory, its
``result.json``, its training log and ``key.json``, the parts of the key), and a later work directory with the same key copies it instead of training,
saying so in one line. ``--config.teacher.cache=False`` trains anyway (and stores nothing).

The key is ``sha256`` over the canonical JSON of four parts (:func:`key_parts`):

- ``corpus``: the digest of every document of every split, name and text (``data.documents_key``
  of the data stage's statistics), so an edited file or another held-out split is another key;
- ``tokenizer``: its kind, vocabulary size, special ids and the sha256 of its model file;
- ``config``: every config field the teacher's result depends on, i.e. the work-directory
  fingerprint fields of the data and teacher stages (``task``, ``seed``, ``data.*``,
  ``teacher.*``, ``precision``; not intervals or cache directories, see :mod:`elm_jax.workdir`);
- ``code``: :func:`code_version`, the sha256 of the package sources that define a trained teacher
  (the dense model, the training engine, the LM loss, the batch pipeline, this stage), so any
  change to them, even a comment, trains anew rather than reusing a teacher it may not reproduce.

The device count (``mesh.*``) is not part of the key: the same recipe on another mesh is the same
teacher up to float summation order. Entries are written atomically (a complete directory or
none) under a per-key lock, so two runs that train the same teacher at once never corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elm_jax.fileio import atomic_directory, atomic_write_bytes
from elm_jax.models.io import is_model_dir
from elm_jax.workdir import fields_under

# The config fields a trained teacher depends on (the data and teacher stages' fingerprints).
KEY_FIELDS: tuple[str, ...] = ("task", "seed", "data", "teacher", "precision")

# The sources that define a trained teacher, relative to the package directory.
CODE_FILES: tuple[str, ...] = (
    "arch.py", "precision.py", "fields.py", "lm.py", "stages/teacher.py", "teacher_cache.py",
    "data/pipeline.py", "models/dense.py", "models/layers.py", "models/io.py",
    "engine/checkpoint.py", "engine/loop.py", "engine/losses.py", "engine/metrics.py",
    "engine/optim.py", "engine/sharding.py", "engine/trainer.py",
)

SUMMARY_FILE = "result.json"
KEY_FILE = "key.json"
MODEL_DIR = "model"
LOG_FILES = ("metrics.jsonl",)  # the training curve (the report plots it)


def code_version(root: str | os.PathLike | None = None) -> str:
    """sha256 (first 16 hex digits) over the names and bytes of :data:`CODE_FILES` under
    ``root`` (default: this package's directory)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for rel in CODE_FILES:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def tokenizer_digest(tok: Any) -> dict[str, Any]:
    """What fixes the token ids: kind, vocabulary size, special ids and the model file's sha256."""
    desc = dict(tok.describe())
    path = desc.pop("path", None)
    if path and Path(path).is_file():
        desc["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    desc["special"] = [int(i) for i in tok.special.all()]
    return desc


def key_parts(cfg: Any, data: Any) -> dict[str, Any]:
    """The four parts of the key (module docstring) for ``cfg`` and its data bundle."""
    return {"corpus": data.stats["documents_key"], "tokenizer": tokenizer_digest(data.tokenizer),
            "config": fields_under(cfg, KEY_FIELDS), "code": code_version()}


def key_of(parts: dict[str, Any]) -> str:
    """``sha256(canonical JSON of parts)``, first 20 hex digits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def entry_dir(cache_root: str | os.PathLike, key: str) -> Path:
    return Path(cache_root) / "teachers" / key


def lookup(cache_root: str | os.PathLike, key: str) -> Path | None:
    """The complete cache entry of ``key``, or None."""
    d = entry_dir(cache_root, key)
    if is_model_dir(d / MODEL_DIR) and (d / SUMMARY_FILE).is_file() and (d / KEY_FILE).is_file():
        return d
    return None


@contextlib.contextmanager
def _key_lock(cache_root: str | os.PathLike, key: str) -> Iterator[None]:
    path = entry_dir(cache_root, key).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run storing the same key finishes first
        yield
    finally:
        os.close(fd)


def store(cache_root: str | os.PathLike, key: str, parts: dict[str, Any], stage_dir: str | os.PathLike,
          summary: dict[str, Any]) -> Path:
    """Copies a trained teacher (``stage_dir/model``, its training log :data:`LOG_FILES` and its
    summary) into the cache under ``key``; an entry that is already complete is kept as it is.
    Returns the entry directory."""
    stage_dir = Path(stage_dir)
    with _key_lock(cache_root, key):
        found = lookup(cache_root, key)
        if found is not None:
            return found
        d = entry_dir(cache_root, key)
        with atomic_directory(d) as tmp:
            shutil.copytree(stage_dir / MODEL_DIR, tmp / MODEL_DIR)
            for name in LOG_FILES:
                if (stage_dir / name).is_file():
                    shutil.copy(stage_dir / name, tmp / name)
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
            (tmp / KEY_FILE).write_text(json.dumps({"key": key, **parts}, indent=2, sort_keys=True) + "\n")
        return d


def restore(entry: str | os.PathLike, stage_dir: str | os.PathLike) -> dict[str, Any]:
    """Copies the cached model into ``stage_dir/model`` (atomically) and its training log beside
    it (so the report still plots the teacher's curve); returns the cached summary."""
    entry, stage_dir = Path(entry), Path(stage_dir)
    with atomic_directory(stage_dir / MODEL_DIR) as tmp:
        shutil.copytree(entry / MODEL_DIR, tmp, dirs_exist_ok=True)
    for name in LOG_FILES:
        if (entry / name).is_file():
            atomic_write_bytes(stage_dir / name, (entry / name).read_bytes())
    return json.loads((entry / SUMMARY_FILE).read_text())
