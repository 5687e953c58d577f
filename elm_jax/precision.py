"""Compute precision of a run: bf16 compute with fp32 master weights on accelerators, fp32 on CPU.

``config.precision``: ``'auto'`` (bfloat16 on GPU/TPU, float32 on CPU, where bf16 matmuls are
emulated and slower), ``'float32'`` or ``'bfloat16'``. Parameters and optimiser moments always
stay float32; modules cast their weights to the compute dtype at use, and softmax, normalisation
statistics and losses run in float32 (``models/layers.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PRECISIONS = ("auto", "float32", "bfloat16")


def compute_dtype(cfg: Any, backend: str | None = None) -> np.dtype:
    """The compute dtype for ``cfg.precision`` on ``backend`` (default: JAX's default backend)."""
    p = str(cfg.get("precision", "auto")) if hasattr(cfg, "get") else "auto"
    if p not in PRECISIONS:
        raise ValueError(f"config.precision must be one of {PRECISIONS}, got {p!r}")
    if p == "auto":
        p = "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
    return jnp.dtype(p)


def with_compute_dtype(model: nnx.Module, dtype: Any) -> nnx.Module:
    """The same dense model (same parameter values) computing in ``dtype``.

    ``DenseLM`` keeps its dtype in its config (a static part of the graph), so the model is
    rebuilt with the new config and the parameter state copied in.
    """
    from elm_jax.models.dense import DenseLM

    if not isinstance(model, DenseLM):
        raise TypeError(f"with_compute_dtype expects a DenseLM, got {type(model).__name__}")
    new = nnx.eval_shape(lambda: DenseLM(dataclasses.replace(model.cfg, dtype=jnp.dtype(dtype)),
                                         rngs=nnx.Rngs(0)))
    nnx.update(new, nnx.state(model))
    return new
