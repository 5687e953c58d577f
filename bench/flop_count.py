"""FLOP accounting for the MFU benchmark: dense-model (teacher) forward FLOPs in closed form, the
supernet step's distillation projections, and an independent counter over a function's jaxpr.

Convention (the one of :func:`elm_jax.accounting.count_flops`): 2 x the multiply-accumulates of every
matrix product, nothing else (no softmax, norms, activations, bias adds or embedding lookups).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core

from elm_jax.arch import Arch
from elm_jax.models.dense import DenseConfig
from elm_jax.space import SearchSpace


def dense_block_flops(cfg: DenseConfig, family: str, ffn: int, seq_len: int) -> int:
    """Forward FLOPs of one block of a :class:`DenseConfig` on one sequence of ``seq_len`` tokens.

    bert / gpt2: Q,K,V,O ``4 * 2SH^2``; scores and context ``2 * 2S^2H``; FFN ``2 * 2SHF``.
    mobilebert:  dense_in ``2SHI``; Q,K,V ``3 * 2SHI``; O ``2SI^2``; scores and context
                 ``2 * 2S^2I``; FFN ``2 * 2SIF``; dense_out ``2SIH``.
    """
    h, i, f, s = cfg.hidden, cfg.inner, int(ffn), int(seq_len)
    if family in ("bert", "gpt2"):
        return 8 * s * h * h + 4 * s * s * h + 4 * s * h * f
    if family == "mobilebert":
        return 8 * s * h * i + 2 * s * i * i + 4 * s * s * i + 4 * s * i * f + 2 * s * i * h
    raise ValueError(f"unknown block family {family!r}")


def dense_forward_flops(cfg: DenseConfig, seq_len: int, *, head: bool = True) -> int:
    """Forward FLOPs of a :class:`~elm_jax.models.dense.DenseLM` on ONE sequence.

    Embedding: the factorised projection ``3E -> H`` (``2S * 3E * H``; a standard embedding is a
    lookup, 0). Blocks: :func:`dense_block_flops`. Head (``head=True`` and ``cfg.head != 'none'``):
    MLM transform ``2SH^2``; the factorised ``H -> E`` projection ``2SHE``; the tied logits
    ``2S * D * V`` with ``D = E`` (factorised) or ``H``. ``head=False`` is the teacher of the
    supernet stage, whose logits the loss never reads (XLA removes them from the compiled step).
    """
    s = int(seq_len)
    if not 1 <= s <= cfg.max_len:
        raise ValueError(f"seq_len={seq_len} must be in [1, max_len={cfg.max_len}]")
    h, e, v = cfg.hidden, cfg.embed_size, cfg.vocab_size
    factorized = cfg.embedding == "factorized"
    total = 2 * s * 3 * e * h if factorized else 0
    total += sum(dense_block_flops(cfg, b.family, b.ffn, s) for b in cfg.blocks)
    if head and cfg.head != "none":
        if cfg.head == "mlm":
            total += 2 * s * h * h
        if factorized:
            total += 2 * s * h * e
        total += 2 * s * (e if factorized else h) * v
    return int(total)


def kd_projection_flops(space: SearchSpace, arch: Arch, teacher_hidden: int, seq_len: int) -> int:
    """Forward FLOPs of the supernet stage's distillation projections for ``arch`` on ONE sequence:
    the shared ``H -> H_t`` projection of the embedding and of every active block output, and the
    family projection of every active block's attention output (bert ``H -> H_t``, mobilebert
    ``I -> H_t``). These are model work (trained with the student); the step also computes them,
    masked, for skipped layers and for the other family, which is not counted."""
    s, ht = int(seq_len), int(teacher_hidden)
    width = {"bert": space.hidden, "mobilebert": space.inner}
    total = 2 * s * space.hidden * ht
    for lc in arch.layers:
        if lc.active:
            total += 2 * s * space.hidden * ht + 2 * s * width[lc.family] * ht
    return int(total)


def _sub_jaxprs(params: dict) -> list[Any]:
    out = []
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jex_core.ClosedJaxpr):
                out.append(x.jaxpr)
            elif isinstance(x, jex_core.Jaxpr):
                out.append(x)
    return out


def _jaxpr_dot_flops(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
            total += 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
        elif name == "scan":
            total += int(eqn.params["length"]) * _jaxpr_dot_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":  # one branch runs: the most expensive one bounds it
            total += max(_jaxpr_dot_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "while":
            raise ValueError("jaxpr_matmul_flops: a while loop has no static trip count")
        else:
            total += sum(_jaxpr_dot_flops(j) for j in _sub_jaxprs(eqn.params))
    return total


def jaxpr_matmul_flops(fn: Callable[..., Any], *args: Any) -> int:
    """``2 x`` the multiply-accumulates of every ``dot_general`` in ``jax.make_jaxpr(fn)(*args)``
    (nested calls included, scan bodies times their length, the largest branch of a cond): an
    independent count of the same convention, read from what JAX actually traces."""
    return _jaxpr_dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)

