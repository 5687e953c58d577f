"""Dense (fixed-architecture) language models: teachers and exported sub-networks.

A :class:`DenseConfig` describes a stack of heterogeneous blocks (:class:`BlockSpec`:
family, FFN width, head count per layer) over a residual width ``H``. The same class
holds a Hugging Face teacher (BERT, GPT-2; see :mod:`elm_jax.models.hf`) and the
standalone model extracted from the ELM supernet, so the supernet's masked forward can be
checked against it exactly.

Parameter tree of :class:`DenseLM` (``nnx.state(model, nnx.Param)``; kernels ``[in, out]``)::

  embed.word.embedding              [V, H]   (factorized: [V, E])
  embed.proj.kernel / .bias         [3E, H] / [H]         factorized only
  embed.position.embedding          [max_len, H]
  embed.segment.embedding           [type_vocab_size, H]  if type_vocab_size > 0
  embed.norm.scale / .bias          [H]                   if embed_norm (LayerNorm)
  blocks[i]  family 'bert' (post-LN):
    attn.{query,key,value}.kernel [H, H], .bias [H]; attn.output.kernel [H, H], .bias [H]
    attn_norm.scale / .bias [H]     (LayerNorm after attention residual)
    ffn.wi.kernel [H, F], .bias [F]; ffn.wo.kernel [F, H], .bias [H]
    ffn_norm.scale / .bias [H]      (LayerNorm after FFN residual)
  blocks[i]  family 'gpt2' (pre-LN):
    attn_norm.scale / .bias [H]     (ln_1, before attention)
    attn.{query,key,value,output}   as for bert
    ffn_norm.scale / .bias [H]      (ln_2, before the MLP)
    ffn.wi [H, F], ffn.wo [F, H]    as for bert
  blocks[i]  family 'mobilebert' (bottleneck I, NoNorm = x * scale + bias):
    dense_in.kernel [H, I], .bias [I];   in_norm.scale / .bias [I]
    attn.{query,key,value}.kernel [H, I], .bias [I]; attn.output.kernel [I, I], .bias [I]
    attn_norm.scale / .bias [I]
    ffn.wi.kernel [I, F], .bias [F]; ffn.wo.kernel [F, I], .bias [I]
    ffn_norm.scale / .bias [I]
    dense_out.kernel [I, H], .bias [H];  out_norm.scale / .bias [H]
  final_norm.scale / .bias [H]      if final_norm (GPT-2 ln_f)
  head  'mlm': head.transform.kernel [H, H], .bias [H]; head.norm.scale / .bias [H];
               head.proj.kernel [H, E] (factorized only, no bias); head.bias [V]
        'clm': head.proj.kernel [H, E] (factorized only); no other parameter
  The LM decoder is always tied to ``embed.word.embedding``.

The model also holds one ``nnx.Dropout`` (``dropout``, RNG state only, no parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from elm_jax.arch import FAMILY_INDEX, ArchError
from elm_jax.models.layers import (
    FFN,
    Attention,
    FactorizedEmbedding,
    NoNorm,
    StandardEmbedding,
    activation,
    attention_mask,
    dense,
    layer_norm,
)

FAMILIES = ("bert", "mobilebert", "gpt2")
# FFN activation of each family when DenseConfig.hidden_act is '' (the default).
FAMILY_ACT = {"bert": "gelu", "mobilebert": "relu", "gpt2": "gelu_tanh"}


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One layer: ``family`` ('bert' post-LN GELU, 'mobilebert' bottleneck NoNorm ReLU,
    'gpt2' pre-LN tanh-GELU), FFN hidden width ``ffn`` and attention ``heads`` (must
    divide the attention width: H for bert/gpt2, I for mobilebert)."""

    family: str
    ffn: int
    heads: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """Architecture of a :class:`DenseLM`. JSON round trip via ``to_dict``/``from_dict``.

    Fields beyond the shared contract (all defaulted):
      embed_norm: LayerNorm at the end of the embedding (False for GPT-2).
      hidden_act: '' = each family's own FFN activation (bert gelu, mobilebert relu,
        gpt2 gelu_tanh) and GELU in the MLM transform; otherwise this activation for
        every FFN and the MLM transform (e.g. a BERT checkpoint with hidden_act relu).
    ``dtype`` is normalised to a ``numpy.dtype`` (compute dtype; params stay float32).
    """

    vocab_size: int
    hidden: int
    inner: int
    blocks: tuple[BlockSpec, ...]
    max_len: int
    embedding: str = "standard"
    embed_size: int = 128
    type_vocab_size: int = 0
    causal: bool = False
    head: str = "mlm"
    final_norm: bool = False
    ln_eps: float = 1e-12
    dropout: float = 0.0
    dtype: Any = jnp.float32
    embed_norm: bool = True
    hidden_act: str = ""

    def __post_init__(self):
        blocks = tuple(
            b if isinstance(b, BlockSpec) else BlockSpec(**b) for b in self.blocks
        )
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.embedding not in ("standard", "factorized"):
            raise ValueError(f"embedding must be 'standard' or 'factorized', got {self.embedding!r}")
        if self.head not in ("mlm", "clm", "none"):
            raise ValueError(f"head must be 'mlm', 'clm' or 'none', got {self.head!r}")
        if self.embedding == "factorized" and self.embed_size <= 0:
            raise ValueError("factorized embedding needs embed_size > 0")
        if self.hidden_act:
            activation(self.hidden_act)  # raises on unknown names
        for i, b in enumerate(blocks):
            if b.family not in FAMILIES:
                raise ValueError(f"block {i}: unknown family {b.family!r}; expected one of {FAMILIES}")
            width = self.inner if b.family == "mobilebert" else self.hidden
            if b.heads <= 0 or width % b.heads:
                raise ValueError(
                    f"block {i} ({b.family}): heads={b.heads} must divide the attention width {width}"
                )
            if b.ffn <= 0:
                raise ValueError(f"block {i}: ffn width must be positive, got {b.ffn}")

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def act(self, family: str) -> str:
        """FFN activation name used by blocks of ``family``."""
        return self.hidden_act or FAMILY_ACT[family]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["blocks"] = [b.to_dict() for b in self.blocks]
        d["dtype"] = jnp.dtype(self.dtype).name
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DenseConfig":
        d = dict(d)
        d["blocks"] = tuple(BlockSpec(**b) for b in d["blocks"])
        if "dtype" in d:
            d["dtype"] = jnp.dtype(d["dtype"])
        return cls(**d)


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------

@struct.dataclass
class ModelOutput:
    """Everything a forward pass exposes (a pytree; None fields are absent).

    logits      [B,L,V] or None (head='none')
    embedding   [B,L,H] embedding output
    attn_outs   per layer: attention sub-layer output ([B,L,H] bert after residual+LN,
                gpt2 residual stream after the attention add; [B,L,I] mobilebert after
                its first residual + NoNorm)
    block_outs  per layer block output [B,L,H]
    attn_probs  per layer [B,heads,L,L] (return_attn) else None
    ffn_pre     per layer FFN pre-activation X W1 + b1 [B,L,F] (return_internals)
    head_ctx    per layer softmax(QK^T/sqrt(d)) V as [B,L,heads,d] (return_internals)
    last_hidden [B,L,H] the hidden state fed to the head (block_outs[-1] after final_norm)
    """

    logits: jax.Array | None
    embedding: jax.Array
    attn_outs: tuple[jax.Array, ...]
    block_outs: tuple[jax.Array, ...]
    attn_probs: tuple[jax.Array, ...] | None = None
    ffn_pre: tuple[jax.Array, ...] | None = None
    head_ctx: tuple[jax.Array, ...] | None = None
    last_hidden: jax.Array | None = None


class BlockOut(NamedTuple):
    """What one block returns (see :class:`ModelOutput` for meanings).

    Blocks are called as ``blk(x_BxLxH, mask, dropout, deterministic=..., rngs=...,
    return_attn=..., return_internals=...)`` with ``mask`` the boolean ``[B|1,1,L,L]``
    array from :func:`elm_jax.models.layers.attention_mask` (or None)."""

    out: jax.Array
    attn_out: jax.Array
    probs: jax.Array | None
    ffn_pre: jax.Array
    ctx: jax.Array | None


def _drop(dropout: nnx.Dropout | None, x: jax.Array, deterministic: bool,
          rngs: nnx.Rngs | None) -> jax.Array:
    return x if dropout is None else dropout(x, deterministic=deterministic, rngs=rngs)


# ----------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------

class BertBlock(nnx.Module):
    """Post-LN block: ``a = LN(attn(x) + x)``, ``y = LN(FFN(a) + a)``."""

    family = "bert"

    def __init__(self, cfg: DenseConfig, spec: BlockSpec, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden, cfg.dtype
        self.attn = Attention(h, h, spec.heads, h, dtype=dt, rngs=rngs)
        self.attn_norm = layer_norm(h, cfg.ln_eps, dt, rngs)
        self.ffn = FFN(h, spec.ffn, h, cfg.act("bert"), dtype=dt, rngs=rngs)
        self.ffn_norm = layer_norm(h, cfg.ln_eps, dt, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 dropout: nnx.Dropout | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, return_attn: bool = False,
                 return_internals: bool = False) -> BlockOut:
        at = self.attn(x, mask, dropout, deterministic=deterministic, rngs=rngs,
                       return_probs=return_attn, return_ctx=return_internals)
        a = self.attn_norm(_drop(dropout, at.out, deterministic, rngs) + x)
        f = self.ffn(a)
        y = self.ffn_norm(_drop(dropout, f.out, deterministic, rngs) + a)
        return BlockOut(y, a, at.probs, f.pre, at.ctx)


class GPT2Block(nnx.Module):
    """Pre-LN block: ``h = x + attn(LN1(x))``, ``y = h + FFN(LN2(h))``."""

    family = "gpt2"

    def __init__(self, cfg: DenseConfig, spec: BlockSpec, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden, cfg.dtype
        self.attn_norm = layer_norm(h, cfg.ln_eps, dt, rngs)
        self.attn = Attention(h, h, spec.heads, h, dtype=dt, rngs=rngs)
        self.ffn_norm = layer_norm(h, cfg.ln_eps, dt, rngs)
        self.ffn = FFN(h, spec.ffn, h, cfg.act("gpt2"), dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 dropout: nnx.Dropout | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, return_attn: bool = False,
                 return_internals: bool = False) -> BlockOut:
        at = self.attn(self.attn_norm(x), mask, dropout, deterministic=deterministic,
                       rngs=rngs, return_probs=return_attn, return_ctx=return_internals)
        hh = x + _drop(dropout, at.out, deterministic, rngs)
        f = self.ffn(self.ffn_norm(hh))
        y = hh + _drop(dropout, f.out, deterministic, rngs)
        return BlockOut(y, hh, at.probs, f.pre, at.ctx)


class MobileBertBlock(nnx.Module):
    """Bottleneck block (DESIGN §1.1)::

        b = in_norm(dense_in(x))                  H -> I
        a = attn_norm(attn(x) + b)                Q,K,V: H -> I, output I -> I
        f = ffn_norm(ffn(a) + a)                  I -> F -> I, ReLU
        y = out_norm(dense_out(f) + x)            I -> H
    """

    family = "mobilebert"

    def __init__(self, cfg: DenseConfig, spec: BlockSpec, *, rngs: nnx.Rngs):
        h, i, dt = cfg.hidden, cfg.inner, cfg.dtype
        self.dense_in = dense(h, i, dt, rngs)
        self.in_norm = NoNorm(i, dtype=dt)
        self.attn = Attention(h, i, spec.heads, i, dtype=dt, rngs=rngs)
        self.attn_norm = NoNorm(i, dtype=dt)
        self.ffn = FFN(i, spec.ffn, i, cfg.act("mobilebert"), dtype=dt, rngs=rngs)
        self.ffn_norm = NoNorm(i, dtype=dt)
        self.dense_out = dense(i, h, dt, rngs)
        self.out_norm = NoNorm(h, dtype=dt)

    def __call__(self, x: jax.Array, mask: jax.Array | None,
                 dropout: nnx.Dropout | None = None, *, deterministic: bool = True,
                 rngs: nnx.Rngs | None = None, return_attn: bool = False,
                 return_internals: bool = False) -> BlockOut:
        b = self.in_norm(self.dense_in(x))
        at = self.attn(x, mask, dropout, deterministic=deterministic, rngs=rngs,
                       return_probs=return_attn, return_ctx=return_internals)
        a = self.attn_norm(_drop(dropout, at.out, deterministic, rngs) + b)
        f = self.ffn(a)
        ff = self.ffn_norm(f.out + a)
        y = self.out_norm(_drop(dropout, self.dense_out(ff), deterministic, rngs) + x)
        return BlockOut(y, a, at.probs, f.pre, at.ctx)


BLOCK_CLASSES = {"bert": BertBlock, "mobilebert": MobileBertBlock, "gpt2": GPT2Block}


# ----------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------

class MLMHead(nnx.Module):
    """BERT MLM head: ``LN(act(transform(x)))`` [-> ``proj`` H->E if factorized], then
    the tied decoder ``@ table.T + bias``."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        h, dt = cfg.hidden, cfg.dtype
        self.act_name = cfg.hidden_act or "gelu"
        self.transform = dense(h, h, dt, rngs)
        self.norm = layer_norm(h, cfg.ln_eps, dt, rngs)
        self.proj = (
            dense(h, cfg.embed_size, dt, rngs, use_bias=False)
            if cfg.embedding == "factorized" else None
        )
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))

    def __call__(self, x: jax.Array, table_VxE: jax.Array) -> jax.Array:
        x = self.norm(activation(self.act_name)(self.transform(x)))
        if self.proj is not None:
            x = self.proj(x)
        return x @ table_VxE.astype(x.dtype).T + self.bias[...].astype(x.dtype)


class CLMHead(nnx.Module):
    """Tied causal LM head: ``x @ table.T`` (``proj`` H->E first if factorized)."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        self.proj = (
            dense(cfg.hidden, cfg.embed_size, cfg.dtype, rngs, use_bias=False)
            if cfg.embedding == "factorized" else None
        )

    def __call__(self, x: jax.Array, table_VxE: jax.Array) -> jax.Array:
        if self.proj is not None:
            x = self.proj(x)
        return x @ table_VxE.astype(x.dtype).T


# ----------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------

class DenseLM(nnx.Module):
    """A dense LM over ``cfg`` (see the module docstring for the parameter tree)."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.dtype
        if cfg.embedding == "factorized":
            self.embed = FactorizedEmbedding(
                cfg.vocab_size, cfg.embed_size, cfg.hidden, cfg.max_len,
                cfg.type_vocab_size, cfg.embed_norm, cfg.ln_eps, cfg.causal,
                dtype=dt, rngs=rngs)
        else:
            self.embed = StandardEmbedding(
                cfg.vocab_size, cfg.hidden, cfg.max_len, cfg.type_vocab_size,
                cfg.embed_norm, cfg.ln_eps, dtype=dt, rngs=rngs)
        self.blocks = nnx.List(
            [BLOCK_CLASSES[b.family](cfg, b, rngs=rngs) for b in cfg.blocks]
        )
        self.final_norm = layer_norm(cfg.hidden, cfg.ln_eps, dt, rngs) if cfg.final_norm else None
        if cfg.head == "mlm":
            self.head = MLMHead(cfg, rngs=rngs)
        elif cfg.head == "clm":
            self.head = CLMHead(cfg, rngs=rngs)
        else:
            self.head = None
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(
        self,
        inputs_BxL: jax.Array,
        mask_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
        *,
        deterministic: bool = True,
        return_attn: bool = False,
        return_internals: bool = False,
        rngs: nnx.Rngs | None = None,
        head_positions_BxK: jax.Array | None = None,
    ) -> ModelOutput:
        """Forward pass.

        Args:
          inputs_BxL: token ids.
          mask_BxL: 1 for real tokens, 0 for padding (padded keys are never attended
            to); None = no padding. Causal models add a causal mask.
          segment_ids_BxL: segment ids (models with ``type_vocab_size``; None = 0).
          deterministic: no dropout when True.
          return_attn: also return attention probabilities.
          return_internals: also return FFN pre-activations and per-head contexts
            (for the PCA width and CKA head modules).
          rngs: optional dropout RNG overriding the model's own stream.
          head_positions_BxK: apply the LM head only at these positions of each row (logits
            ``[B, K, V]``), e.g. the scored positions of an MLM batch (``batch['positions']``);
            the head is position-wise, so these logits equal the full ones gathered there.
        """
        cfg = self.cfg
        length = inputs_BxL.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {cfg.max_len}")
        x = self.embed(inputs_BxL, mask_BxL, segment_ids_BxL)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        emb = x
        mask = attention_mask(mask_BxL, length, cfg.causal)
        attn_outs, block_outs, probs, pres, ctxs = [], [], [], [], []
        for blk in self.blocks:
            o = blk(x, mask, self.dropout, deterministic=deterministic, rngs=rngs,
                    return_attn=return_attn, return_internals=return_internals)
            x = o.out
            attn_outs.append(o.attn_out)
            block_outs.append(o.out)
            probs.append(o.probs)
            pres.append(o.ffn_pre)
            ctxs.append(o.ctx)
        if self.final_norm is not None:
            x = self.final_norm(x)
        h = x if head_positions_BxK is None else jnp.take_along_axis(x, head_positions_BxK[..., None], axis=1)
        logits = self.head(h, self.embed.token_table()) if self.head is not None else None
        return ModelOutput(
            logits=logits,
            embedding=emb,
            attn_outs=tuple(attn_outs),
            block_outs=tuple(block_outs),
            attn_probs=tuple(probs) if return_attn else None,
            ffn_pre=tuple(pres) if return_internals else None,
            head_ctx=tuple(ctxs) if return_internals else None,
            last_hidden=x,
        )


def init_dense(cfg: DenseConfig, seed: int = 0) -> DenseLM:
    """A freshly initialised :class:`DenseLM` (params from ``seed``, dropout stream
    from ``seed + 1``)."""
    return DenseLM(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def empty_model(cfg: DenseConfig) -> DenseLM:
    """A :class:`DenseLM` whose parameters are abstract placeholders (no random init, which
    takes seconds for a real teacher); fill every one before use (loaders, extraction)."""
    model = nnx.eval_shape(lambda: init_dense(cfg, 0))
    model.dropout = nnx.Dropout(cfg.dropout, rngs=nnx.Rngs(dropout=1))
    return model


def count_params(model_or_state: Any) -> int:
    """Number of parameters (``nnx.Param`` entries only; RNG state is not counted).

    Accepts a :class:`DenseLM` / any ``nnx.Module``, an ``nnx.State`` (filtered to
    ``nnx.Param`` when it holds Variables), a plain pytree of arrays or
    ``jax.ShapeDtypeStruct`` s, or a :class:`DenseConfig` (counted on an abstract model,
    without allocating weights).
    """
    obj = model_or_state
    if isinstance(obj, DenseConfig):
        obj = nnx.eval_shape(lambda: DenseLM(model_or_state, rngs=nnx.Rngs(0)))
    if isinstance(obj, nnx.Module):
        obj = nnx.state(obj, nnx.Param)
    elif isinstance(obj, nnx.State):
        obj = nnx.filter_state(obj, nnx.Param) if _has_variables(obj) else obj
    leaves = jax.tree_util.tree_leaves(obj)
    return int(sum(int(np.prod(getattr(x, "shape", ()))) for x in leaves))


#: The parameters a model holds per vocabulary piece, position or segment: its lookup tables and
#: the MLM head's per-piece output bias (the tied decoder owns no table of its own).
EMBEDDING_PARAMS = ("embed.word.", "embed.position.", "embed.segment.", "head.bias")


def count_embedding_params(model: "DenseLM") -> int:
    """Parameters of ``model`` in :data:`EMBEDDING_PARAMS`. ``count_params(model) - this`` are
    its non-embedding parameters (the convention of Kaplan et al. 2020, which counts neither the
    vocabulary nor the position tables): what stays when the vocabulary changes, so budgets and
    models compare across tokenizers. Everything else, the factorised embedding's projection
    and the embedding and head norms included, is counted as non-embedding."""
    tables, bias = EMBEDDING_PARAMS[:3], EMBEDDING_PARAMS[3]
    return int(sum(int(np.prod(v.get_value().shape))
                   for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                   if (name := ".".join(map(str, k))).startswith(tables) or name == bias))


def _has_variables(state: nnx.State) -> bool:
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return any(isinstance(x, nnx.Variable) for x in leaves)


__all__ = [
    "BlockSpec", "DenseConfig", "DenseLM", "ModelOutput", "BlockOut", "BertBlock",
    "GPT2Block", "MobileBertBlock", "MLMHead", "CLMHead", "init_dense", "count_params",
    "count_embedding_params", "EMBEDDING_PARAMS",
    "FAMILIES", "FAMILY_ACT",
]


# DenseConfig fields that dense_config() lets callers override: none of them changes the
# parameter tree or the FLOPs, so the accounting stays exact.
_DENSE_OVERRIDES = ("dropout", "dtype", "ln_eps", "hidden_act")


def dense_config(space: Any, arch: Any, widths: Any, **overrides: Any) -> DenseConfig:
    """The :class:`DenseConfig` of ``arch``'s standalone model (what ``models.extract.extract``
    produces), for an :class:`~elm_jax.space.SearchSpace` ``space``:
    only the active layers, in order, each ``BlockSpec(family, widths[l, fam, cand],
    heads)``; factorised embedding of size E, no final norm, head = task, causal for
    'clm'. ``overrides`` may set ``dropout``, ``dtype``, ``ln_eps`` or ``hidden_act``
    (fields that change neither the parameter tree nor the FLOPs)."""
    space.validate(arch)
    w = space.validate_widths(widths)
    bad = sorted(set(overrides) - set(_DENSE_OVERRIDES))
    if bad:
        raise ArchError(f"dense_config cannot override {bad}; allowed: {_DENSE_OVERRIDES}")
    blocks = tuple(
        BlockSpec(lc.family, int(w[l, FAMILY_INDEX[lc.family], lc.candidate]), lc.heads)
        for l, lc in enumerate(arch.layers) if lc.active
    )
    return DenseConfig(
        vocab_size=space.vocab_size, hidden=space.hidden, inner=space.inner,
        blocks=blocks, max_len=space.max_len, embedding="factorized",
        embed_size=space.embed_size, type_vocab_size=space.type_vocab_size,
        causal=space.task == "clm", head=space.task, final_norm=False, **overrides,
    )
