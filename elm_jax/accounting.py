"""Exact, analytic accounting of an architecture (DESIGN §2): parameters and FLOPs of the
extracted model, without building it, and the reachable range of each over a search space.

:func:`count_params` equals ``elm_jax.models.dense.count_params`` of the model that
``elm_jax.models.extract.extract`` produces (the size of its parameter tree), and
:func:`count_flops` counts the matmul FLOPs of that model's forward pass. Both are additive
over active blocks, so their extremes over a space are exact (:func:`reachable_ranges`).
Functions take the :class:`~elm_jax.space.SearchSpace` as an argument (this module imports
only the value types of :mod:`elm_jax.arch`).
"""

from __future__ import annotations

from typing import Any, Callable


from elm_jax.arch import FAMILY_INDEX, SEARCH_FAMILIES, Arch, ArchError, _as_int

# The type of the ``space`` arguments: an :class:`elm_jax.space.SearchSpace`, not imported
# because the space's extremes are computed with this module's costs.
Space = Any


def block_params(space: Space, family: str, ffn: int) -> int:
    """Parameters of one block of ``family`` with FFN width ``ffn`` (closed form of the
    parameter tree in :mod:`elm_jax.models.dense`; every norm has scale + bias).

    bert:        Q,K,V,O 4(H^2 + H); 2 LayerNorms 4H; FFN 2HF + F + H
                 = 4H^2 + 9H + (2H + 1) F
    mobilebert:  dense_in HI + I; in_norm 2I; Q,K,V 3(HI + I); O I^2 + I; attn_norm 2I;
                 FFN 2IF + F + I; ffn_norm 2I; dense_out IH + H; out_norm 2H
                 = 5HI + I^2 + 12I + 3H + (2I + 1) F
    """
    h, i, f = space.hidden, space.inner, int(ffn)
    if family == "bert":
        return 4 * h * h + 9 * h + (2 * h + 1) * f
    if family == "mobilebert":
        return 5 * h * i + i * i + 12 * i + 3 * h + (2 * i + 1) * f
    raise ArchError(f"unknown family {family!r}; choose from {SEARCH_FAMILIES}")


def embedding_params(space: Space) -> int:
    """Factorised embedding: word ``V*E``, proj ``3E*H + H``, position ``max_len*H``,
    segment ``type_vocab_size*H``, LayerNorm ``2H``."""
    h = space.hidden
    return (space.vocab_size * space.embed_size + 3 * space.embed_size * h + h
            + space.max_len * h + space.type_vocab_size * h + 2 * h)


def head_params(space: Space) -> int:
    """LM head (decoder tied to the word embedding). MLM: transform ``H^2 + H``,
    LayerNorm ``2H``, proj ``H*E`` (no bias), vocabulary bias ``V``. CLM: proj ``H*E``."""
    h, e = space.hidden, space.embed_size
    if space.task == "mlm":
        return h * h + h + 2 * h + h * e + space.vocab_size
    return h * e


def count_params(space: Space, arch: Arch, widths: Any) -> int:
    """Exact parameter count of the extracted model ``dense_config(space, arch, widths)``
    (skipped layers contribute nothing), computed in closed form: equal to
    ``elm_jax.models.dense.count_params`` of that config without building a model."""
    space.validate(arch)
    w = space.validate_widths(widths)
    blocks = sum(
        block_params(space, lc.family, int(w[l, FAMILY_INDEX[lc.family], lc.candidate]))
        for l, lc in enumerate(arch.layers) if lc.active
    )
    return int(embedding_params(space) + blocks + head_params(space))


def block_flops(space: Space, family: str, ffn: int, seq_len: int) -> int:
    """Forward matmul FLOPs of one block on one sequence of ``S = seq_len`` tokens (see
    :func:`count_flops` for the convention).

    bert:        Q,K,V,O 4 * 2SH^2; scores QK^T 2S^2H; context PV 2S^2H; FFN 2 * 2SHF
    mobilebert:  dense_in 2SHI; Q,K,V 3 * 2SHI; O 2SI^2; scores 2S^2I; context 2S^2I;
                 FFN 2 * 2SIF; dense_out 2SIH
    The head count does not matter: ``heads`` heads of size ``width/heads`` cost
    ``S^2 * width`` multiply-accumulates for the scores and for the context together.
    """
    h, i, f, s = space.hidden, space.inner, int(ffn), int(seq_len)
    if family == "bert":
        return 8 * s * h * h + 4 * s * s * h + 4 * s * h * f
    if family == "mobilebert":
        return (2 * s * h * i + 6 * s * h * i + 2 * s * i * i + 4 * s * s * i
                + 4 * s * i * f + 2 * s * i * h)
    raise ArchError(f"unknown family {family!r}; choose from {SEARCH_FAMILIES}")


def count_flops(space: Space, arch: Arch, widths: Any, seq_len: int) -> int:
    """Forward FLOPs of the extracted model on ONE sequence of ``seq_len`` tokens.

    Convention: 2 x the multiply-accumulates of every matrix product the model computes,
    and nothing else. Counted: the embedding projection ``3E -> H`` (2 * S * 3E * H); per
    active block the terms of :func:`block_flops` (attention scores and context over the
    full ``S x S`` matrix, also for causal models, where the mask is applied rather than
    the work skipped); the head: MLM transform ``H -> H`` (2SH^2), projection ``H -> E``
    (2SHE) and vocabulary logits against the tied ``[V, E]`` table (2SEV); CLM projection
    ``H -> E`` and logits (2SHE + 2SEV). Not counted: bias adds, activations, softmax,
    scaling, masking, norms, residual adds, dropout and the embedding lookups.
    """
    space.validate(arch)
    w = space.validate_widths(widths)
    s = _as_int("seq_len", seq_len)
    if not 1 <= s <= space.max_len:
        raise ArchError(f"seq_len={s} must be in [1, max_len={space.max_len}]")
    h, e, v = space.hidden, space.embed_size, space.vocab_size
    total = 2 * s * 3 * e * h
    for l, lc in enumerate(arch.layers):
        if lc.active:
            ffn = int(w[l, FAMILY_INDEX[lc.family], lc.candidate])
            total += block_flops(space, lc.family, ffn, s)
    if space.task == "mlm":
        total += 2 * s * h * h
    total += 2 * s * h * e + 2 * s * e * v
    return int(total)


def reachable_ranges(space: Space, widths: Any, seq_len: int,
                     latency_fn: Callable[[Arch], float] | None = None) -> dict[str, tuple[float, float]]:
    """``{params: (lo, hi), flops: (lo, hi)}``: the exact extremes over the whole space (both
    are additive over active blocks), plus ``latency_ms`` evaluated at the FLOPs extremes (an
    estimate: the latency table is not assumed additive) when ``latency_fn`` is given."""
    w = space.validate_widths(widths)
    out: dict[str, tuple[float, float]] = {
        "params": (count_params(space, space.smallest(w), w),
                   count_params(space, space.largest(w), w))}
    fl = lambda f, ffn: block_flops(space, f, ffn, seq_len)
    lo_a, hi_a = space.extreme(w, fl, largest=False), space.extreme(w, fl, largest=True)
    out["flops"] = (count_flops(space, lo_a, w, seq_len),
                    count_flops(space, hi_a, w, seq_len))
    if latency_fn is not None:
        a, b = float(latency_fn(lo_a)), float(latency_fn(hi_a))
        out["latency_ms"] = (min(a, b), max(a, b))
    return out
