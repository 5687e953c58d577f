"""O(1)-scale random weights for the model tests (shared by test_dense and test_elastic).

At the default N(0, 0.02) initialisation attention is nearly uniform and every block is close to
its residual path, so head-grouping or masking bugs change outputs by less than any useful
tolerance; with these weights every parameter visibly matters.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomize(model: nnx.Module, seed: int = 0) -> None:
    """O(1)-scale random values for every parameter of a dense model or a supernet (norm scales
    near 1, non-zero biases, kernels with unit-variance outputs), in place.

    The parameter's role is the last part of its name: ``scale``, ``bias``, ``kernel``, or an
    embedding table otherwise (the supernet names its stacked ``[L, T, ...]`` candidate tensors
    ``attn__query__kernel`` etc.); a kernel's fan-in is its second-to-last axis."""
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        role = str(path[-1]).rsplit("__", 1)[-1]
        z = rng.standard_normal(shape)
        if role == "scale":
            v = 1 + 0.2 * z
        elif role == "bias":
            v = 0.1 * z
        elif role == "kernel":
            v = z / np.sqrt(shape[-2])
        else:  # embedding tables
            v = 0.5 * z
        var.set_value(jnp.asarray(v, jnp.float32))
    nnx.update(model, state)
