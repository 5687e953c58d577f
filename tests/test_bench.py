"""The FLOP accounting of the MFU benchmark (bench/flop_count.py) against independent counts."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elm_jax.arch import Arch, LayerChoice
from elm_jax.models.dense import BlockSpec, DenseConfig, init_dense
from elm_jax.accounting import count_flops
from elm_jax.models.dense import dense_config
from elm_jax.space import SearchSpace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from flop_count import (
    dense_forward_flops,
    jaxpr_matmul_flops,
    kd_projection_flops,
)

MIXED = (BlockSpec("bert", 48, 4), BlockSpec("mobilebert", 24, 2), BlockSpec("gpt2", 40, 8))
CONFIGS = {
    "bert_standard_mlm": {"blocks": (BlockSpec("bert", 64, 4),) * 2, "type_vocab_size": 2},
    "gpt2_clm": {"blocks": (BlockSpec("gpt2", 64, 4),) * 2, "causal": True, "head": "clm",
                 "final_norm": True, "embed_norm": False},
    "mixed_factorized_mlm": {"blocks": MIXED, "embedding": "factorized"},
    "mixed_factorized_clm": {"blocks": MIXED, "embedding": "factorized", "causal": True, "head": "clm"},
}


def make_cfg(**kw) -> DenseConfig:
    base = {"vocab_size": 61, "hidden": 32, "inner": 8, "blocks": MIXED, "max_len": 24, "embed_size": 12}
    return DenseConfig(**(base | kw))


def forward_flops_traced(cfg: DenseConfig, batch: int, seq: int) -> int:
    """Traced on abstract parameters (no initialisation, nothing runs)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_dense(cfg, seed=0)))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return jaxpr_matmul_flops(lambda st, x: nnx.merge(graphdef, st)(x, jnp.ones_like(x)), state, ids)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_forward_flops_equal_the_traced_matmuls(name):
    cfg = make_cfg(**CONFIGS[name])
    batch, seq = 3, 20
    assert dense_forward_flops(cfg, seq) * batch == forward_flops_traced(cfg, batch, seq)
    # Without the head: the same model with head='none' traces exactly the rest.
    headless = dataclasses.replace(cfg, head="none")
    assert dense_forward_flops(cfg, seq, head=False) * batch == forward_flops_traced(headless, batch, seq)


def test_dense_counter_agrees_with_arch_count_flops_on_extracted_models():
    """Two closed forms written apart: the dense counter on ``dense_config(space, arch, widths)``
    equals :func:`elm_jax.arch.count_flops` of the architecture."""
    space = SearchSpace(layers=4, hidden=32, inner=8, embed_size=8, candidates=3, f0=8,
                        max_ffn={"bert": 64, "mobilebert": 20}, base_heads=4,
                        families=("bert", "mobilebert"), elastic_depth=True, min_layers=2,
                        vocab_size=50, max_len=16, task="mlm", type_vocab_size=2)
    rng = np.random.default_rng(0)
    for widths in (space.initial_widths(), space.max_widths()):
        for _ in range(20):
            a = space.sample(rng)
            assert (dense_forward_flops(dense_config(space, a, widths), 16)
                    == count_flops(space, a, widths, 16))


def test_jaxpr_counter_by_hand():
    m, k, n, steps = 5, 7, 3, 4
    x, w = jnp.ones((2, m, k)), jnp.ones((2, k, k))

    def f(x, w):  # batched matmul, a scan of matmuls, and a cond whose dearer branch counts
        y = jnp.einsum("bmk,bkj->bmj", x, w)                       # 2 * 2mk*k
        y, _ = jax.lax.scan(lambda c, _: (c @ w[0], None), y[0], None, length=steps)  # steps * 2mk*k
        z = jax.lax.cond(y.sum() > 0, lambda v: v @ jnp.ones((k, n)), lambda v: v[:, :n], y)
        return z

    assert jaxpr_matmul_flops(f, x, w) == 2 * 2 * m * k * k + steps * 2 * m * k * k + 2 * m * k * n


def test_xla_cost_analysis_is_close_to_the_closed_form():
    """XLA's own count of the compiled teacher forward (every op, not only matmuls) is at least
    the matmul count and only slightly above it for a model whose matmuls dominate."""
    cfg = make_cfg(hidden=128, inner=32, blocks=(BlockSpec("bert", 512, 4),) * 2, head="none",
                   max_len=64)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_dense(cfg, seed=0)))
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, jnp.ones_like(x)).block_outs)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    xla = float(fwd.lower(state, ids).compile().cost_analysis()["flops"])
    ours = 2 * dense_forward_flops(cfg, 64)
    assert ours <= xla <= 1.1 * ours


def test_kd_projection_flops_by_hand():
    space = SearchSpace(layers=3, hidden=32, inner=8, embed_size=8, candidates=2, f0=8,
                        max_ffn={"bert": 32, "mobilebert": 16}, base_heads=4,
                        families=("bert", "mobilebert"), elastic_depth=True, min_layers=1,
                        vocab_size=50, max_len=16, task="mlm")
    a = Arch((LayerChoice("bert", 0, 4, True), LayerChoice("mobilebert", 1, 2, True),
              LayerChoice("bert", 1, 4, False)))
    s, h, i, ht = 16, 32, 8, 48
    embedding = 2 * s * h * ht
    blocks = 2 * (2 * s * h * ht)                  # shared projection of the two active outputs
    attn = 2 * s * h * ht + 2 * s * i * ht         # bert H -> Ht, mobilebert I -> Ht
    assert kd_projection_flops(space, a, ht, s) == embedding + blocks + attn
