"""The elastic supernet: every architecture of a search space in one set of masked dense weights.

An architecture reaches compiled code only as :class:`elm_jax.arch.ArchArrays` (integer / bool
arrays whose shapes depend on the *space*), so one compiled forward serves every architecture:

- per layer and family, ``T`` candidates with independent weights stacked on a candidate axis,
  stored at the family's maximum FFN width: the candidate is a dynamic index;
- the FFN width is a prefix mask over the hidden units (``act(x W1 + b1) * [j < width]``);
- the family is a ``lax.switch`` branch (only the chosen one runs), a skipped layer is the
  identity branch;
- the head count ``h`` groups the ``n`` base heads into ``h`` contiguous groups of ``g = n / h``:
  a merged head's score is the sum of its base heads' ``q_b . k_b`` scaled by
  ``1 / sqrt(g d)``, so any divisor of ``n`` works with fixed shapes and equals the dense model
  whose head ``j`` uses columns ``[j g d, (j + 1) g d)``;
- layers are iterated with ``lax.scan`` over the layer-stacked weights, so compile time does not
  grow with depth.

The embedding and the LM head are the very modules of the dense model
(:class:`~elm_jax.models.layers.FactorizedEmbedding`, :class:`~elm_jax.models.dense.MLMHead` /
``CLMHead``), so extraction copies them unchanged. :func:`extract` turns the supernet weights and
an architecture into the :class:`~elm_jax.models.dense.DenseLM` of that architecture; the test
suite checks that both compute the same function.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from elm_jax.arch import FAMILY_INDEX, ArchArrays, family_branch
from elm_jax.models import layers
from elm_jax.models.dense import FAMILY_ACT, CLMHead, MLMHead, dense_config
from elm_jax.models.layers import MASK_VALUE, FactorizedEmbedding
from elm_jax.space import SearchSpace

# Per-family parameters of one candidate: dense path -> (shape symbols, init, FFN axis or None).
# Symbols: H hidden, I inner, F the family's maximum FFN width. The dense path names are those of
# elm_jax.models.dense.DenseLM.blocks[i], so extraction is a table lookup.
_LN = ("ones", "zeros")
FAMILY_PARAMS: dict[str, dict[str, tuple[tuple[str, ...], str, int | None]]] = {
    "bert": {
        "attn.query.kernel": (("H", "H"), "normal", None), "attn.query.bias": (("H",), "zeros", None),
        "attn.key.kernel": (("H", "H"), "normal", None), "attn.key.bias": (("H",), "zeros", None),
        "attn.value.kernel": (("H", "H"), "normal", None), "attn.value.bias": (("H",), "zeros", None),
        "attn.output.kernel": (("H", "H"), "normal", None), "attn.output.bias": (("H",), "zeros", None),
        "attn_norm.scale": (("H",), "ones", None), "attn_norm.bias": (("H",), "zeros", None),
        "ffn.wi.kernel": (("H", "F"), "normal", 1), "ffn.wi.bias": (("F",), "zeros", 0),
        "ffn.wo.kernel": (("F", "H"), "normal", 0), "ffn.wo.bias": (("H",), "zeros", None),
        "ffn_norm.scale": (("H",), "ones", None), "ffn_norm.bias": (("H",), "zeros", None),
    },
    "mobilebert": {
        "dense_in.kernel": (("H", "I"), "normal", None), "dense_in.bias": (("I",), "zeros", None),
        "in_norm.scale": (("I",), "ones", None), "in_norm.bias": (("I",), "zeros", None),
        "attn.query.kernel": (("H", "I"), "normal", None), "attn.query.bias": (("I",), "zeros", None),
        "attn.key.kernel": (("H", "I"), "normal", None), "attn.key.bias": (("I",), "zeros", None),
        "attn.value.kernel": (("H", "I"), "normal", None), "attn.value.bias": (("I",), "zeros", None),
        "attn.output.kernel": (("I", "I"), "normal", None), "attn.output.bias": (("I",), "zeros", None),
        "attn_norm.scale": (("I",), "ones", None), "attn_norm.bias": (("I",), "zeros", None),
        "ffn.wi.kernel": (("I", "F"), "normal", 1), "ffn.wi.bias": (("F",), "zeros", 0),
        "ffn.wo.kernel": (("F", "I"), "normal", 0), "ffn.wo.bias": (("I",), "zeros", None),
        "ffn_norm.scale": (("I",), "ones", None), "ffn_norm.bias": (("I",), "zeros", None),
        "dense_out.kernel": (("I", "H"), "normal", None), "dense_out.bias": (("H",), "zeros", None),
        "out_norm.scale": (("H",), "ones", None), "out_norm.bias": (("H",), "zeros", None),
    },
}


def _pkey(path: str) -> str:
    return path.replace(".", "__")


class Candidates(nnx.Module):
    """The ``[L, T, ...]`` stacked weights of one block family, at maximum FFN width."""

    def __init__(self, space: SearchSpace, family: str, *, rngs: nnx.Rngs):
        sizes = {"H": space.hidden, "I": space.inner, "F": space.max_ffn_of(family)}
        lead = (space.layers, space.candidates)
        params = {}
        for path, (shape, init, _) in FAMILY_PARAMS[family].items():
            full = lead + tuple(sizes[s] for s in shape)
            if init == "normal":
                value = layers.kernel_init(rngs.params(), full, jnp.float32)
            else:
                value = (jnp.ones if init == "ones" else jnp.zeros)(full, jnp.float32)
            params[_pkey(path)] = nnx.Param(value)
        self.p = nnx.Dict(params)


class LayerFeatures(NamedTuple):
    """Per-layer outputs stacked on a leading layer axis ``[L, B, S, ...]``.

    ``attn_bert`` / ``attn_mobilebert`` hold the attention-sublayer output of the layers of that
    family (zeros elsewhere: each family has its own distillation projection);
    ``ffn_pre_*`` the masked FFN pre-activation ``X W1 + b1`` (PCA); ``ctx_*`` the attention
    context before the output projection, ``[.., W]`` with merged head ``j`` in columns
    ``[j W/h, (j+1) W/h)`` (CKA).
    """

    block: jax.Array
    attn_bert: jax.Array | None
    attn_mobilebert: jax.Array | None
    ffn_pre_bert: jax.Array | None = None
    ffn_pre_mobilebert: jax.Array | None = None
    ctx_bert: jax.Array | None = None
    ctx_mobilebert: jax.Array | None = None


@struct.dataclass
class SupernetOutput:
    """Logits ``[B, S, V]``, embedding output ``[B, S, H]`` and stacked per-layer features."""

    logits: jax.Array
    embedding: jax.Array
    layers: LayerFeatures


def layer_norm_fn(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Two-pass LayerNorm in float32: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    return y.astype(x.dtype)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: jax.Array, base_heads: int,
                      mask: jax.Array | None) -> jax.Array:
    """Attention with ``heads`` (a traced divisor of ``base_heads``) merged heads; ``[B,S,W]``.

    ``scores_j = sum_{b in group j} q_b k_b^T / sqrt(g d)`` with ``g = base_heads / heads``,
    ``d = W / base_heads``; each base head uses its group's probabilities, so the context of
    merged head ``j`` is ``softmax(scores_j) V_j`` laid out in its contiguous columns.
    """
    b, s, w = q.shape
    d = w // base_heads
    qb, kb, vb = (t.reshape(b, s, base_heads, d) for t in (q, k, v))
    raw = jnp.einsum("bqhd,bkhd->bhqk", qb, kb).astype(jnp.float32)
    g = base_heads // heads
    gid = jnp.arange(base_heads) // g
    same = (gid[:, None] == gid[None, :]).astype(jnp.float32)
    scores = jnp.einsum("bhqk,hj->bjqk", raw, same) / jnp.sqrt((g * d).astype(jnp.float32))
    if mask is not None:
        scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vb).reshape(b, s, w)


def _linear(p: dict, name: str, x: jax.Array) -> jax.Array:
    return x @ p[_pkey(name + ".kernel")].astype(x.dtype) + p[_pkey(name + ".bias")].astype(x.dtype)


def _masked_ffn(p: dict, x: jax.Array, width: jax.Array, act: Callable) -> tuple[jax.Array, jax.Array]:
    pre = _linear(p, "ffn.wi", x)
    keep = (jnp.arange(pre.shape[-1]) < width).astype(pre.dtype)
    return _linear(p, "ffn.wo", act(pre) * keep), pre * keep


def _nonorm(p: dict, name: str, x: jax.Array) -> jax.Array:
    return x * p[_pkey(name + ".scale")].astype(x.dtype) + p[_pkey(name + ".bias")].astype(x.dtype)


def bert_block(p: dict, x, mask, width, heads, base_heads: int, eps: float):
    """Post-LN BERT block of one candidate; returns (y, attn_out, ffn_pre, ctx)."""
    ctx = grouped_attention(_linear(p, "attn.query", x), _linear(p, "attn.key", x),
                            _linear(p, "attn.value", x), heads, base_heads, mask)
    ln = lambda name, t: layer_norm_fn(t, p[_pkey(name + ".scale")], p[_pkey(name + ".bias")], eps)  # noqa: E731
    a = ln("attn_norm", _linear(p, "attn.output", ctx) + x)
    f, pre = _masked_ffn(p, a, width, layers.activation(FAMILY_ACT["bert"]))
    return ln("ffn_norm", f + a), a, pre, ctx


def mobilebert_block(p: dict, x, mask, width, heads, base_heads: int, eps: float):
    """MobileBERT bottleneck block of one candidate; returns (y, attn_out, ffn_pre, ctx)."""
    bott = _nonorm(p, "in_norm", _linear(p, "dense_in", x))
    ctx = grouped_attention(_linear(p, "attn.query", x), _linear(p, "attn.key", x),
                            _linear(p, "attn.value", x), heads, base_heads, mask)
    a = _nonorm(p, "attn_norm", _linear(p, "attn.output", ctx) + bott)
    f, pre = _masked_ffn(p, a, width, layers.activation(FAMILY_ACT["mobilebert"]))
    ff = _nonorm(p, "ffn_norm", f + a)
    y = _nonorm(p, "out_norm", _linear(p, "dense_out", ff) + x)
    return y, a, pre, ctx


BLOCK_FNS = {"bert": bert_block, "mobilebert": mobilebert_block}


class Supernet(nnx.Module):
    """The ELM supernet over ``space`` (see the module docstring).

    ``template`` is the DenseConfig whose embedding / head settings (ln_eps, dtype, heads'
    activation) the supernet shares with every extracted model; it defaults to
    ``dense_config(space, space.largest(), space.initial_widths())``.
    """

    def __init__(self, space: SearchSpace, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 ln_eps: float = 1e-12, remat: bool = False):
        self.space = space
        self.remat = remat  # recompute each layer in the backward pass (activation memory ~ 1 layer)
        self.template = dense_config(space, space.largest(), space.initial_widths(),
                                           dtype=dtype, ln_eps=ln_eps)
        t = self.template
        self.embed = FactorizedEmbedding(t.vocab_size, t.embed_size, t.hidden, t.max_len,
                                         t.type_vocab_size, t.embed_norm, t.ln_eps, t.causal,
                                         dtype=dtype, rngs=rngs)
        self.head = MLMHead(t, rngs=rngs) if t.head == "mlm" else CLMHead(t, rngs=rngs)
        self.families = tuple(f for f in FAMILY_INDEX if f in space.families)
        self.blocks = nnx.Dict({f: Candidates(space, f, rngs=rngs) for f in self.families})

    def __call__(self, inputs_BxS: jax.Array, arch: ArchArrays, mask_BxS: jax.Array | None = None,
                 segment_ids_BxS: jax.Array | None = None, *,
                 return_internals: bool = False,
                 head_positions_BxK: jax.Array | None = None) -> SupernetOutput:
        """Forward of the architecture ``arch`` (one architecture for the whole batch).

        ``head_positions_BxK``: apply the LM head only at these positions of each row (logits
        ``[B, K, V]``), e.g. the masked positions of an MLM batch when only the loss is needed;
        the head is position-wise, so these logits equal the full ones gathered there.
        """
        space, t = self.space, self.template
        b, s = inputs_BxS.shape
        x = self.embed(inputs_BxS, mask_BxS, segment_ids_BxS)
        emb = x
        amask = layers.attention_mask(mask_BxS, s, t.causal)
        dims = {"bert": space.hidden, "mobilebert": space.inner}
        fmax = {f: space.max_ffn_of(f) for f in self.families}
        stacked = {f: dict(self.blocks[f].p.items()) for f in self.families}
        stacked = jax.tree.map(lambda v: v[...], stacked)  # Param -> array
        dt = x.dtype

        def zeros_like_features(x):
            feats = {"block": x}
            for f in ("bert", "mobilebert"):
                on = f in self.families
                feats[f"attn_{f}"] = jnp.zeros((b, s, dims[f]), dt) if on else None
                if return_internals:
                    feats[f"ffn_pre_{f}"] = jnp.zeros((b, s, fmax[f]), dt) if on else None
                    feats[f"ctx_{f}"] = jnp.zeros((b, s, dims[f]), dt) if on else None
            return feats

        def make_branch(f):
            def run(x, p_all, cand, width, heads):
                p = jax.tree.map(lambda w: w[cand], p_all[f])
                y, a, pre, ctx = BLOCK_FNS[f](p, x, amask, width, heads, space.base_heads, t.ln_eps)
                feats = zeros_like_features(y)
                feats[f"attn_{f}"] = a
                if return_internals:
                    feats[f"ffn_pre_{f}"] = pre
                    feats[f"ctx_{f}"] = ctx
                return feats
            return run

        branches = [make_branch(f) for f in self.families]
        branches.append(lambda x, p_all, cand, width, heads: zeros_like_features(x))

        def layer(x, xs):
            p_all, fam, cand, width, heads, active = xs
            idx = family_branch(self.families, fam, active)  # last branch: skip (identity)
            feats = jax.lax.switch(idx, branches, x, p_all, cand, width, heads)
            return feats["block"], feats

        xs = (stacked, arch.family, arch.candidate, arch.width, arch.heads, arch.active)
        if self.remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        x, feats = jax.lax.scan(layer, x, xs)
        if head_positions_BxK is not None:
            x = jnp.take_along_axis(x, head_positions_BxK[..., None], axis=1)
        logits = self.head(x, self.embed.token_table())
        return SupernetOutput(logits=logits, embedding=emb, layers=LayerFeatures(**feats))


def init_supernet(space: SearchSpace, seed: int = 0, **kw) -> Supernet:
    return Supernet(space, rngs=nnx.Rngs(params=seed), **kw)
