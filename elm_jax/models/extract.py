"""Extraction: the standalone dense model of one architecture of the supernet (DESIGN §1.7, §3).

:func:`extract_flat` copies the embedding and head and, for each active layer, its family's
chosen candidate with the FFN tensors sliced to the candidate's current width;
:func:`extract` builds the :class:`~elm_jax.models.dense.DenseLM` from them, and
:func:`with_heads` re-splits the same projections into fewer, wider heads (the CKA head
module's output; no tensor changes). The supernet's masked forward equals the extracted model's
forward (tested), and its parameter count equals :func:`elm_jax.accounting.count_params`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from elm_jax.arch import FAMILY_INDEX, Arch
from elm_jax.models.dense import DenseConfig, DenseLM, dense_config
from elm_jax.models.elastic import FAMILY_PARAMS, Supernet, _pkey
from elm_jax.models.io import flat_params, model_from_flat


def extract_flat(supernet: Supernet, widths: Any, arch: Arch) -> tuple[DenseConfig, dict[str, np.ndarray]]:
    """The dense config and ``{dotted.path: array}`` parameters of ``arch``'s standalone model.

    Embedding and head are copied; each active layer takes its family's chosen candidate,
    FFN tensors sliced to the candidate's current width; the head count only changes how the
    dense model splits the same Q/K/V columns (contiguous groups), so no tensor changes for it.
    """
    space = supernet.space
    space.validate(arch)
    widths = space.validate_widths(widths)
    cfg = dense_config(space, arch, widths, dtype=supernet.template.dtype, ln_eps=supernet.template.ln_eps)
    flat: dict[str, np.ndarray] = {}
    for mod in ("embed", "head"):
        for path, v in nnx.to_flat_state(nnx.state(getattr(supernet, mod), nnx.Param)):
            flat[".".join([mod, *map(str, path)])] = np.asarray(v[...])
    i = 0
    for l, choice in enumerate(arch.layers):
        if not choice.active:
            continue
        width = int(widths[l, FAMILY_INDEX[choice.family], choice.candidate])
        cand = supernet.blocks[choice.family].p
        for path, (_, _, ffn_axis) in FAMILY_PARAMS[choice.family].items():
            w = np.asarray(cand[_pkey(path)][...][l, choice.candidate])
            if ffn_axis is not None:
                w = np.take(w, np.arange(width), axis=ffn_axis)
            flat[f"blocks.{i}.{path}"] = w
        i += 1
    return cfg, flat


def extract(supernet: Supernet, widths: Any, arch: Arch) -> DenseLM:
    """The standalone :class:`DenseLM` of ``arch`` with the supernet's inherited weights."""
    from elm_jax.models.io import model_from_flat

    cfg, flat = extract_flat(supernet, widths, arch)
    return model_from_flat(cfg, flat)


def with_heads(model: DenseLM, heads: list[int]) -> DenseLM:
    """The same parameters re-split into ``heads[i]`` heads per layer (no tensor changes)."""
    import dataclasses

    blocks = tuple(dataclasses.replace(b, heads=h) for b, h in zip(model.cfg.blocks, heads))
    return model_from_flat(dataclasses.replace(model.cfg, blocks=blocks), flat_params(model))
