"""Every model and supernet save / load: standalone dense model directories and supernet directories.

A model directory holds::

  config.json          {"dense_config": DenseConfig.to_dict(), "meta": {...}}
  model.safetensors    every nnx.Param of the DenseLM, keyed by its dotted path
  orbax/               the same parameters as an orbax checkpoint (exported models)
  arch.json            architecture, widths, heads after CKA, params, FLOPs, latency (exported)
  <tokenizer file>     the tokenizer the model was trained with (exported)

A supernet directory holds ``supernet.safetensors`` and ``widths.json`` (the search space,
the FFN widths and the growth history). Both are written to a temporary sibling and renamed
into place, so a directory that exists is complete; ``load_model(path)`` needs no config file
or code from the run that made it. :func:`flat_params` / :func:`fill_params` are the one
dump / load of an NNX module's parameters as ``{dotted.path: array}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from elm_jax.fileio import atomic_directory, atomic_write_json
from elm_jax.models.dense import DenseConfig, DenseLM, empty_model
from elm_jax.models.elastic import Supernet
from elm_jax.space import SearchSpace

CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"
SUPERNET_PARAMS_FILE = "supernet.safetensors"
WIDTHS_FILE = "widths.json"


def flat_params(module: nnx.Module) -> dict[str, np.ndarray]:
    """``{dotted.path: array}`` of every parameter of ``module`` (a DenseLM, the supernet, a
    classifier): the one dump used by every save."""
    state = nnx.state(module, nnx.Param)
    return {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
            for k, v in nnx.to_flat_state(state)}


def fill_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], where: str = "parameters", *,
                skip_prefix: str | None = None, dtype: Any = None) -> nnx.Module:
    """Sets every parameter of ``module`` (except those under ``skip_prefix``) from ``tensors``
    (``{dotted.path: array}``, exact shapes; cast to ``dtype`` when given) and returns it; missing
    or unexpected names and wrong shapes are errors naming ``where``: the one load used by every
    reader."""
    state = nnx.state(module, nnx.Param)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    if skip_prefix is not None:
        flat = {k: v for k, v in flat.items() if not k.startswith(skip_prefix)}
        tensors = {k: v for k, v in tensors.items() if not k.startswith(skip_prefix)}
    missing = sorted(set(flat) - set(tensors))
    extra = sorted(set(tensors) - set(flat))
    if missing or extra:
        raise ValueError(f"{where}: missing parameters {missing[:5]}, unexpected {extra[:5]}")
    for k, var in flat.items():
        want = tuple(var.get_value().shape)
        if tuple(tensors[k].shape) != want:
            raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {want}")
        var.set_value(jnp.asarray(tensors[k], dtype))
    nnx.update(module, state)
    return module


def write_model_files(directory: str | os.PathLike, model: DenseLM,
                      meta: dict[str, Any] | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` of ``model`` into ``directory``."""
    d = Path(directory)
    save_file(flat_params(model), os.fspath(d / PARAMS_FILE))
    cfg = {"dense_config": model.cfg.to_dict(), "meta": meta or {}}
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_model(path: str | os.PathLike, model: DenseLM, meta: dict[str, Any] | None = None,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Writes ``model`` (config + parameters) atomically to the directory ``path``.

    ``extra(tmp_dir)`` may add more files (arch.json, orbax params, the tokenizer) before the
    directory is renamed into place, so a model directory that exists is always complete.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model_files(tmp, model, meta)
        if extra is not None:
            extra(tmp)
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


def model_from_flat(cfg: DenseConfig, tensors: Mapping[str, np.ndarray], where: str = "parameters") -> DenseLM:
    """A DenseLM of ``cfg`` holding ``tensors`` (``{dotted.path: array}``, every parameter, exact
    shapes, stored as float32); extra or missing names are errors."""
    return fill_params(empty_model(cfg), tensors, where, dtype=jnp.float32)


def save_orbax_params(path: str | os.PathLike, model: DenseLM) -> None:
    """The parameters as an orbax checkpoint (``path``), next to the safetensors copy."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), flat_params(model))


def save_supernet(path: str | os.PathLike, net: Supernet, widths: np.ndarray, history: list) -> None:
    """``path/supernet.safetensors`` and ``path/widths.json`` (space, widths, growth history),
    written atomically (:func:`elm_jax.fileio.atomic_directory`)."""
    with atomic_directory(path) as tmp:
        save_file(flat_params(net), os.fspath(tmp / SUPERNET_PARAMS_FILE))
        atomic_write_json(tmp / WIDTHS_FILE, {"space": net.space.to_dict(),
                                              "widths": np.asarray(widths).tolist(), "history": history})


def load_supernet(path: str | os.PathLike) -> tuple[Supernet, np.ndarray, dict]:
    """The trained supernet, its widths and the widths.json record of a supernet directory."""
    p = Path(path)
    info = json.loads((p / WIDTHS_FILE).read_text())
    space = SearchSpace.from_dict(info["space"])
    net = nnx.eval_shape(lambda: Supernet(space, rngs=nnx.Rngs(0)))
    fill_params(net, load_file(os.fspath(p / SUPERNET_PARAMS_FILE)), str(p / SUPERNET_PARAMS_FILE))
    return net, space.validate_widths(np.asarray(info["widths"], np.int32)), info


def final_models(workdir: str | os.PathLike) -> dict[str, Path]:
    """Budget -> model directory: the retrained models, else the exported ones."""
    for stage in ("retrain", "export"):
        p = Path(workdir) / stage / "result.json"
        if p.is_file():
            return {k: Path(v["path"]) for k, v in json.loads(p.read_text()).items()}
    raise FileNotFoundError(f"no exported models in {workdir}: run the export stage first")
