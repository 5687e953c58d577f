"""Compute precision and rematerialisation: same function, different cost.

* ``remat=True`` recomputes each supernet layer in the backward pass: loss and gradients equal
  the stored-activation forward/backward (same ops, same order) to float32 rounding.
* ``precision``: 'auto' is float32 on CPU; a model moved to bfloat16 compute keeps its float32
  parameters bit for bit and its logits agree with float32 to bf16 rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from elm_jax.models.dense import DenseConfig, DenseLM, BlockSpec
from elm_jax.models.elastic import init_supernet
from elm_jax.precision import compute_dtype, with_compute_dtype
from elm_jax.space import SearchSpace

VOCAB, SEQ = 61, 10


def _space():
    return SearchSpace.from_config(ConfigDict(dict(
        layers=3, hidden=16, inner=8, embed_size=8, candidates=2, f0=4, base_heads=2,
        families=("bert", "mobilebert"), elastic_depth=True, min_layers=1,
        max_ffn={"bert": 16, "mobilebert": 8})), vocab_size=VOCAB, max_len=SEQ, task="mlm")


def test_remat_matches_stored_activations():
    space = _space()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, VOCAB, (2, SEQ)), jnp.int32)
    mask = jnp.ones((2, SEQ), jnp.int32)

    def value_and_grad(remat):
        net = init_supernet(space, seed=3, remat=remat)
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)

        def loss(p, arrays):
            out = nnx.merge(graphdef, p, rest)(ids, arrays, mask)
            return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0])

        step = jax.jit(jax.value_and_grad(loss))
        return lambda arch: step(params, space.to_arrays(arch, space.initial_widths()))

    stored, remat = value_and_grad(False), value_and_grad(True)
    for a in [space.largest(), space.sample(rng), space.sample(rng)]:
        (l0, g0), (l1, g1) = stored(a), remat(a)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_compute_dtype_choice():
    assert compute_dtype(ConfigDict({"precision": "auto"}), backend="cpu") == jnp.float32
    assert compute_dtype(ConfigDict({"precision": "auto"}), backend="gpu") == jnp.bfloat16
    assert compute_dtype(ConfigDict({"precision": "auto"}), backend="tpu") == jnp.bfloat16
    assert compute_dtype(ConfigDict({"precision": "float32"}), backend="tpu") == jnp.float32
    with pytest.raises(ValueError, match="precision"):
        compute_dtype(ConfigDict({"precision": "fp8"}))


def test_bf16_dense_model_keeps_fp32_params_and_agrees():
    cfg = DenseConfig(vocab_size=VOCAB, hidden=32, inner=8, max_len=SEQ,
                      blocks=(BlockSpec("bert", 64, 4), BlockSpec("bert", 64, 4)), head="mlm")
    model = DenseLM(cfg, rngs=nnx.Rngs(0))
    low = with_compute_dtype(model, jnp.bfloat16)
    assert low.cfg.dtype == jnp.bfloat16 and model.cfg.dtype == jnp.float32
    for (k, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                              nnx.to_flat_state(nnx.state(low, nnx.Param))):
        assert b[...].dtype == jnp.float32, k
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    ids = jnp.asarray(np.random.default_rng(1).integers(5, VOCAB, (2, SEQ)), jnp.int32)
    hi_logits = np.asarray(model(ids).logits, np.float32)
    lo_logits = np.asarray(low(ids).logits.astype(jnp.float32))
    assert np.abs(lo_logits - hi_logits).max() < 0.1 * np.abs(hi_logits).max()
    assert np.corrcoef(lo_logits.ravel(), hi_logits.ravel())[0, 1] > 0.99
    with pytest.raises(TypeError):
        with_compute_dtype(init_supernet(_space()), jnp.bfloat16)
