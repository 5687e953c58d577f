"""Standalone dense model directories: save and load (teachers now; exported sub-networks later).

A model directory holds::

  config.json          {"dense_config": DenseConfig.to_dict(), "meta": {...}}
  model.safetensors    every nnx.Param of the DenseLM, keyed by its dotted path

It is written to a temporary sibling and renamed into place, so a directory that exists is
complete. ``load_model(path)`` needs no config file or code from the run that made it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from elm_jax.models.dense import DenseConfig, DenseLM

CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"


def _key(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def flat_params(model: DenseLM) -> dict[str, np.ndarray]:
    """``{dotted.path: array}`` of every parameter of ``model``."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {_key(p): np.asarray(jax.device_get(v)) for p, v in leaves}


def save_model(path: str | os.PathLike, model: DenseLM, meta: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` (config + parameters) atomically to the directory ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save_file(flat_params(model), os.fspath(tmp / PARAMS_FILE))
        cfg = {"dense_config": model.cfg.to_dict(), "meta": meta or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_FILE).is_file()


def load_model(path: str | os.PathLike) -> tuple[DenseLM, dict[str, Any]]:
    """The DenseLM saved in ``path`` and its metadata; clear errors for a bad directory."""
    p = Path(path)
    if not is_model_dir(p):
        raise FileNotFoundError(
            f"{p} is not an elm-jax model directory (it needs {CONFIG_FILE} and {PARAMS_FILE})")
    info = json.loads((p / CONFIG_FILE).read_text())
    cfg = DenseConfig.from_dict(info["dense_config"])
    model = DenseLM(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    tensors = load_file(os.fspath(p / PARAMS_FILE))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    missing = [_key(k) for k, _ in leaves if _key(k) not in tensors]
    if missing:
        raise ValueError(f"{p / PARAMS_FILE} lacks parameters {missing[:5]}")
    values = []
    for k, a in leaves:
        v = tensors[_key(k)]
        if tuple(v.shape) != tuple(a.shape):
            raise ValueError(f"{p / PARAMS_FILE}: {_key(k)} has shape {v.shape}, expected {a.shape}")
        values.append(jax.numpy.asarray(v, a.dtype))
    nnx.update(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), values))
    return model, info.get("meta", {})
