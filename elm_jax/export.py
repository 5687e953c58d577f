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

from elm_jax.models.dense import DenseConfig, DenseLM, empty_model

CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"


def flat_params(model: DenseLM) -> dict[str, np.ndarray]:
    """``{dotted.path: array}`` of every parameter of ``model``."""
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
            for k, v in nnx.to_flat_state(state)}


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
    return model_from_flat(cfg, load_file(os.fspath(p / PARAMS_FILE)), where=str(p / PARAMS_FILE)), info.get("meta", {})


def model_from_flat(cfg: DenseConfig, tensors: dict[str, np.ndarray], where: str = "parameters") -> DenseLM:
    """A DenseLM of ``cfg`` holding ``tensors`` (``{dotted.path: array}``, every parameter, exact
    shapes); extra or missing names are errors."""
    model = empty_model(cfg)
    state = nnx.state(model, nnx.Param)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(tensors))
    extra = sorted(set(tensors) - set(flat))
    if missing or extra:
        raise ValueError(f"{where}: missing parameters {missing[:5]}, unexpected {extra[:5]}")
    for k, var in flat.items():
        want = tuple(var.get_value().shape)
        if tuple(tensors[k].shape) != want:
            raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {want}")
        var.set_value(jax.numpy.asarray(tensors[k], jax.numpy.float32))
    nnx.update(model, state)
    return model
