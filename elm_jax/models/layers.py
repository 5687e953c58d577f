"""Building blocks of the dense models (Flax NNX).

Everything here is a plain, fixed-shape layer; the elastic supernet reuses the pure
functions (``attention_mask``, ``split_heads``, ``activation``, ``neighbour_concat``) so
that its masked forward and the extracted dense model compute exactly the same thing.

Conventions
- Kernels are stored ``[in, out]`` (``y = x @ kernel + bias``), parameters are float32,
  computation runs in the module's ``dtype``; softmax and normalisation statistics are
  computed in float32.
- Attention head ``h`` uses columns ``[h*d:(h+1)*d]`` of Q, K and V (``d = width /
  heads``). The supernet merges "base heads" into wider heads by grouping contiguous
  column blocks, so this split must not change.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

# BERT-style initialisation: N(0, 0.02) for kernels and embeddings, zero biases.
INIT_STD = 0.02
kernel_init = nnx.initializers.normal(INIT_STD)
embed_init = nnx.initializers.normal(INIT_STD)

# Large negative score for masked keys. Finite so that a row with every key masked
# (a padded query of a causal model) gives a uniform softmax instead of NaN.
MASK_VALUE = -1e30


# ----------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------

def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called ``name``.

    Names: ``gelu`` (exact erf GELU, HF ``gelu``), ``gelu_tanh`` (tanh approximation,
    HF ``gelu_new`` / ``gelu_pytorch_tanh``), ``relu``.
    """
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}; expected gelu, gelu_tanh or relu")


def attention_mask(
    mask_BxL: jax.Array | None, length: int, causal: bool
) -> jax.Array | None:
    """Boolean attention mask ``[B or 1, 1, L, L]`` (True = query may attend to key).

    Padded keys (``mask_BxL == 0``) are never attended to; a causal model additionally
    masks keys after the query. Returns None when nothing is masked.
    """
    m = None
    if mask_BxL is not None:
        m = (mask_BxL != 0)[:, None, None, :]
    if causal:
        c = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        m = c if m is None else jnp.logical_and(m, c)
    return m


def split_heads(x_BxLxW: jax.Array, heads: int) -> jax.Array:
    """``[B, L, W] -> [B, L, heads, W // heads]``; head h = columns [h*d:(h+1)*d]."""
    b, l, w = x_BxLxW.shape
    return x_BxLxW.reshape(b, l, heads, w // heads)


def neighbour_concat(tok_BxLxE: jax.Array, causal: bool) -> jax.Array:
    """MobileBERT-style neighbour concatenation of token embeddings, ``[B, L, 3E]``.

    Encoder: ``[x_{t+1}; x_t; x_{t-1}]``; causal: ``[x_t; x_{t-1}; x_{t-2}]`` (no future
    token). Out-of-range neighbours are zero vectors.
    """
    zero = jnp.zeros_like(tok_BxLxE[:, :1])

    def shift_right(x, n):  # x_{t-n}
        return jnp.concatenate([jnp.repeat(zero, n, axis=1), x[:, :-n]], axis=1)

    if causal:
        parts = [tok_BxLxE, shift_right(tok_BxLxE, 1), shift_right(tok_BxLxE, 2)]
    else:
        nxt = jnp.concatenate([tok_BxLxE[:, 1:], zero], axis=1)  # x_{t+1}
        parts = [nxt, tok_BxLxE, shift_right(tok_BxLxE, 1)]
    return jnp.concatenate(parts, axis=-1)


def layer_norm(features: int, eps: float, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with exact (two-pass) variance, as PyTorch computes it."""
    return nnx.LayerNorm(
        features, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs
    )


def dense(
    n_in: int, n_out: int, dtype: Any, rngs: nnx.Rngs, use_bias: bool = True
) -> nnx.Linear:
    """``nnx.Linear`` with BERT init, float32 params and compute ``dtype``."""
    return nnx.Linear(
        n_in, n_out, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, rngs=rngs
    )


# ----------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------

class NoNorm(nnx.Module):
    """MobileBERT's NoNorm: elementwise ``x * scale + bias`` (no statistics)."""

    def __init__(self, features: int, *, dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class AttentionOut(NamedTuple):
    """Result of :class:`Attention`: output, optional probs ``[B,N,L,L]`` and context
    ``[B,L,N,d]`` (``softmax(QK^T/sqrt(d)) V`` per head, before the output projection)."""

    out: jax.Array
    probs: jax.Array | None
    ctx: jax.Array | None


class Attention(nnx.Module):
    """Multi-head self-attention: Q, K, V ``in_features -> width``, output
    ``width -> out_features``; ``heads`` heads of size ``width // heads``.

    Parameters: ``query``, ``key``, ``value``, ``output`` (``nnx.Linear`` each).
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        heads: int,
        out_features: int,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % heads:
            raise ValueError(f"heads={heads} must divide attention width {width}")
        self.heads = heads
        self.dtype = dtype
        self.query = dense(in_features, width, dtype, rngs)
        self.key = dense(in_features, width, dtype, rngs)
        self.value = dense(in_features, width, dtype, rngs)
        self.output = dense(width, out_features, dtype, rngs)

    def __call__(
        self,
        x_BxLxD: jax.Array,
        mask_Bx1xLxL: jax.Array | None,
        dropout: nnx.Dropout | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        return_probs: bool = False,
        return_ctx: bool = False,
    ) -> AttentionOut:
        q = split_heads(self.query(x_BxLxD), self.heads)
        k = split_heads(self.key(x_BxLxD), self.heads)
        v = split_heads(self.value(x_BxLxD), self.heads)
        d = q.shape[-1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
        if mask_Bx1xLxL is not None:
            scores = jnp.where(mask_Bx1xLxL, scores, MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)
        p = probs.astype(self.dtype)
        if dropout is not None:
            p = dropout(p, deterministic=deterministic, rngs=rngs)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", p, v)
        b, l, h, dd = ctx.shape
        out = self.output(ctx.reshape(b, l, h * dd))
        return AttentionOut(
            out, probs if return_probs else None, ctx if return_ctx else None
        )


class FFNOut(NamedTuple):
    """Result of :class:`FFN`: output and pre-activation ``X W1 + b1``."""

    out: jax.Array
    pre: jax.Array


class FFN(nnx.Module):
    """Position-wise FFN ``in -> hidden -> out``. Parameters: ``wi``, ``wo``."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        act: str,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.act_name = act
        self.wi = dense(in_features, hidden, dtype, rngs)
        self.wo = dense(hidden, out_features, dtype, rngs)

    def __call__(self, x: jax.Array) -> FFNOut:
        pre = self.wi(x)
        return FFNOut(self.wo(activation(self.act_name)(pre)), pre)


def _init_tail(emb: nnx.Module, hidden: int, max_len: int, type_vocab_size: int, use_norm: bool,
               ln_eps: float, dtype: Any, rngs: nnx.Rngs) -> None:
    """The parameters of the shared tail of both embeddings, created in this order (the order
    the random initialisation draws them): ``position``, ``segment`` (if ``type_vocab_size``),
    ``norm`` (if ``use_norm``)."""
    emb.position = nnx.Embed(max_len, hidden, dtype=dtype, embedding_init=embed_init, rngs=rngs)
    emb.segment = (nnx.Embed(type_vocab_size, hidden, dtype=dtype, embedding_init=embed_init, rngs=rngs)
                   if type_vocab_size else None)
    emb.norm = layer_norm(hidden, ln_eps, dtype, rngs) if use_norm else None


def _position_segment_norm(emb: nnx.Module, x: jax.Array, ids_BxL: jax.Array,
                           segment_ids_BxL: jax.Array | None) -> jax.Array:
    """The shared tail of both embeddings: ``x + position (+ segment)``, then the LayerNorm
    (missing segment ids mean segment 0, as Hugging Face does)."""
    x = x + emb.position(jnp.arange(ids_BxL.shape[1]))[None]
    if emb.segment is not None:
        seg = jnp.zeros_like(ids_BxL) if segment_ids_BxL is None else segment_ids_BxL
        x = x + emb.segment(seg)
    return emb.norm(x) if emb.norm is not None else x


class StandardEmbedding(nnx.Module):
    """BERT/GPT-2 embedding: token + position (+ segment), optional LayerNorm.

    Parameters: ``word.embedding [V,H]``, ``position.embedding [max_len,H]``,
    ``segment.embedding [T,H]`` (if ``type_vocab_size``), ``norm`` (if ``use_norm``).
    Missing segment ids with a segment table use segment 0 (as Hugging Face does).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        max_len: int,
        type_vocab_size: int,
        use_norm: bool,
        ln_eps: float,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.word = nnx.Embed(vocab_size, hidden, dtype=dtype, embedding_init=embed_init, rngs=rngs)
        _init_tail(self, hidden, max_len, type_vocab_size, use_norm, ln_eps, dtype, rngs)

    def token_table(self) -> jax.Array:
        """The ``[V, H]`` token table the tied LM head multiplies with."""
        return self.word.embedding[...]

    def __call__(
        self,
        ids_BxL: jax.Array,
        mask_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
    ) -> jax.Array:
        del mask_BxL  # only positions' own vectors depend on their ids here
        return _position_segment_norm(self, self.word(ids_BxL), ids_BxL, segment_ids_BxL)


class FactorizedEmbedding(nnx.Module):
    """MobileBERT-style factorised embedding.

    ``tok = word(ids)`` (size E; zeroed at padded positions so padding never leaks into
    a real token through the neighbour concat), ``proj(neighbour_concat(tok))`` (3E->H),
    + position (+ segment), LayerNorm.

    Parameters: ``word.embedding [V,E]``, ``proj.kernel [3E,H]``, ``proj.bias [H]``,
    ``position.embedding [max_len,H]``, ``segment.embedding [T,H]`` (if any), ``norm``
    (if ``use_norm``).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_size: int,
        hidden: int,
        max_len: int,
        type_vocab_size: int,
        use_norm: bool,
        ln_eps: float,
        causal: bool,
        *,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.causal = causal
        self.word = nnx.Embed(vocab_size, embed_size, dtype=dtype, embedding_init=embed_init, rngs=rngs)
        self.proj = dense(3 * embed_size, hidden, dtype, rngs)
        _init_tail(self, hidden, max_len, type_vocab_size, use_norm, ln_eps, dtype, rngs)

    def token_table(self) -> jax.Array:
        """The ``[V, E]`` token table the tied LM head multiplies with."""
        return self.word.embedding[...]

    def __call__(
        self,
        ids_BxL: jax.Array,
        mask_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
    ) -> jax.Array:
        tok = self.word(ids_BxL)
        if mask_BxL is not None:
            tok = tok * (mask_BxL != 0)[..., None].astype(tok.dtype)
        return _position_segment_norm(self, self.proj(neighbour_concat(tok, self.causal)), ids_BxL,
                                      segment_ids_BxL)
