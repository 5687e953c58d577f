"""Properties of the dense model (elm_jax.models.dense) and the token loss."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from random_weights import randomize

from elm_jax.engine.losses import weighted_cross_entropy
from elm_jax.models.dense import (BlockSpec, DenseConfig, DenseLM, count_embedding_params, count_params,
                                  init_dense)
from elm_jax.models.layers import neighbour_concat

# Every family, with different FFN widths and head counts per layer (3 layers keep the
# compile time of each test small).
MIXED = (
    BlockSpec("bert", 48, 4),
    BlockSpec("mobilebert", 24, 2),
    BlockSpec("gpt2", 40, 8),
)
MIXED5 = MIXED + (BlockSpec("mobilebert", 16, 4), BlockSpec("bert", 32, 2))


def make_cfg(**kw) -> DenseConfig:
    base = dict(vocab_size=61, hidden=32, inner=8, blocks=MIXED, max_len=24,
                embedding="standard", embed_size=12, type_vocab_size=2)
    base.update(kw)
    return DenseConfig(**base)


def params_of(model: nnx.Module) -> dict:
    """Nested dict of numpy parameter arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@functools.partial(jax.jit, static_argnames=("graphdef", "kw"))
def _run(graphdef, state, args, kw):
    return nnx.merge(graphdef, state)(*args, **dict(kw))


def forward(model: DenseLM, *args, **kw):
    """Jitted forward (cached per model structure; exercises the compiled path)."""
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, args, tuple(sorted(kw.items())))


def rand_ids(shape, vocab, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


# ----------------------------------------------------------------------------------

def test_config_json_round_trip_and_validation():
    cfg = make_cfg(embedding="factorized", causal=True, head="clm", dtype=jnp.bfloat16)
    back = DenseConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert back.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="divide"):
        make_cfg(blocks=(BlockSpec("mobilebert", 8, 3),))
    with pytest.raises(ValueError, match="family"):
        make_cfg(blocks=(BlockSpec("lstm", 8, 2),))
    with pytest.raises(ValueError, match="head"):
        make_cfg(head="cls")


def expected_param_count(cfg: DenseConfig) -> int:
    """Parameter count written out by hand from the architecture."""
    H, I, V, E = cfg.hidden, cfg.inner, cfg.vocab_size, cfg.embed_size
    lin = lambda i, o, b=True: i * o + (o if b else 0)
    n = cfg.max_len * H + cfg.type_vocab_size * H + (2 * H if cfg.embed_norm else 0)
    n += V * E + lin(3 * E, H) if cfg.embedding == "factorized" else V * H
    for b in cfg.blocks:
        if b.family == "mobilebert":
            n += lin(H, I) + 2 * I + 3 * lin(H, I) + lin(I, I) + 2 * I
            n += lin(I, b.ffn) + lin(b.ffn, I) + 2 * I + lin(I, H) + 2 * H
        else:
            n += 4 * lin(H, H) + 2 * H + lin(H, b.ffn) + lin(b.ffn, H) + 2 * H
    n += 2 * H if cfg.final_norm else 0
    if cfg.head == "mlm":
        n += lin(H, H) + 2 * H + V + (H * E if cfg.embedding == "factorized" else 0)
    elif cfg.head == "clm" and cfg.embedding == "factorized":
        n += H * E
    return n


@pytest.mark.parametrize("embedding", ["standard", "factorized"])
@pytest.mark.parametrize("head", ["mlm", "clm", "none"])
def test_param_count_matches_hand_count(embedding, head):
    cfg = make_cfg(blocks=MIXED5, embedding=embedding, head=head, final_norm=head == "clm",
                   causal=head == "clm", embed_norm=head != "none")
    assert count_params(cfg) == expected_param_count(cfg)


@pytest.mark.parametrize("embedding", ["standard", "factorized"])
@pytest.mark.parametrize("head", ["mlm", "clm", "none"])
def test_embedding_params_are_the_tables_and_the_piece_bias(embedding, head):
    """The embedding count is the word table (V*E factorised, V*H standard), the position and
    segment tables and the MLM head's bias V, written out by hand; the rest does not change with
    the vocabulary."""
    kw = dict(blocks=MIXED5, embedding=embedding, head=head, final_norm=head == "clm",
              causal=head == "clm")
    cfg = make_cfg(**kw)
    H, V, E = cfg.hidden, cfg.vocab_size, cfg.embed_size
    want = V * (E if embedding == "factorized" else H) + cfg.max_len * H + cfg.type_vocab_size * H
    want += V if head == "mlm" else 0
    model = DenseLM(cfg, rngs=nnx.Rngs(0))
    assert count_embedding_params(model) == want
    bigger = DenseLM(make_cfg(vocab_size=30522, **kw), rngs=nnx.Rngs(0))
    assert (count_params(bigger) - count_embedding_params(bigger)
            == count_params(model) - count_embedding_params(model))


@pytest.mark.parametrize("embedding,head", [("standard", "mlm"), ("factorized", "clm")])
def test_heterogeneous_stack_runs(embedding, head):
    cfg = make_cfg(embedding=embedding, head=head, final_norm=head == "clm",
                   causal=head == "clm", blocks=MIXED5)
    model = init_dense(cfg, 0)
    assert count_params(model) == expected_param_count(cfg)
    assert count_params(nnx.state(model)) == count_params(model)  # RNG state not counted
    ids = rand_ids((2, 10), cfg.vocab_size, 1)
    out = forward(model, ids, jnp.ones_like(ids), return_attn=True, return_internals=True)
    B, L, H = 2, 10, cfg.hidden
    assert out.logits.shape == (B, L, cfg.vocab_size)
    assert np.isfinite(np.asarray(out.logits)).all()
    for spec, a, y, p, f, c in zip(cfg.blocks, out.attn_outs, out.block_outs,
                                   out.attn_probs, out.ffn_pre, out.head_ctx):
        width = cfg.inner if spec.family == "mobilebert" else H
        assert a.shape == (B, L, width) and y.shape == (B, L, H)
        assert p.shape == (B, spec.heads, L, L) and f.shape == (B, L, spec.ffn)
        assert c.shape == (B, L, spec.heads, width // spec.heads)
        assert np.isfinite(np.asarray(y)).all()
    # Without the flags the optional outputs are absent.
    plain = jax.eval_shape(lambda: model(ids))
    assert plain.attn_probs is None and plain.ffn_pre is None and plain.head_ctx is None


@pytest.mark.parametrize("embedding", ["standard", "factorized"])
def test_causal_no_future_leak(embedding):
    cfg = make_cfg(embedding=embedding, causal=True, head="clm", final_norm=True,
                   type_vocab_size=0)
    model = init_dense(cfg, 3)
    randomize(model)
    ids = rand_ids((2, 12), cfg.vocab_size, 4)
    base = np.asarray(forward(model, ids).logits)
    for t in (0, 5, 10):
        changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % cfg.vocab_size)
        out = np.asarray(forward(model, changed).logits)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
    # ... and the past does matter (the test above is not vacuous).
    changed = ids.at[:, 3].set((ids[:, 3] + 7) % cfg.vocab_size)
    out = np.asarray(forward(model, changed).logits)
    assert np.abs(out[:, 3:] - base[:, 3:]).max() > 1e-3


@pytest.mark.parametrize("embedding", ["standard", "factorized"])
def test_padding_does_not_change_real_tokens(embedding):
    cfg = make_cfg(embedding=embedding, head="mlm")
    model = init_dense(cfg, 5)
    randomize(model, 1)
    ids = rand_ids((3, 11), cfg.vocab_size, 6)
    mask = np.ones((3, 11), np.int32)
    mask[0, 7:] = 0
    mask[2, 3:] = 0
    mask = jnp.asarray(mask)
    seg = jnp.zeros_like(ids).at[1, 5:].set(1)
    base = forward(model, ids, mask, seg)
    other = jnp.where(mask == 0, (ids * 13 + 5) % cfg.vocab_size, ids)
    out = forward(model, other, mask, seg)
    real = np.asarray(mask).astype(bool)
    for a, b in zip([base.logits, base.embedding, *base.block_outs, *base.attn_outs],
                    [out.logits, out.embedding, *out.block_outs, *out.attn_outs]):
        np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5, rtol=0)
    # Changing the mask itself (un-padding) does change real tokens.
    out2 = forward(model, other, jnp.ones_like(mask), seg)
    assert np.abs(np.asarray(out2.logits)[0, :7] - np.asarray(base.logits)[0, :7]).max() > 1e-3


def test_attention_probs_respect_masks():
    cfg = make_cfg(causal=True, head="clm")
    model = init_dense(cfg, 0)
    ids = rand_ids((2, 9), cfg.vocab_size, 0)
    mask = jnp.asarray(np.array([[1] * 9, [1] * 6 + [0] * 3]))
    out = forward(model, ids, mask, return_attn=True)
    upper = np.triu(np.ones((9, 9), bool), 1)
    for p in out.attn_probs:
        p = np.asarray(p)
        np.testing.assert_allclose(p[1, :, :6].sum(-1), 1.0, atol=1e-5)
        assert np.all(p[:, :, upper] == 0)
        assert np.all(p[1, :, :6, 6:] == 0)


# ---------------------------------------------------------------- numpy references

def np_ln(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_attention(x_in, p, heads, mask_BxL=None, causal=False):
    """Returns (context [B,L,heads,d], output after the output projection)."""
    q = x_in @ p["query"]["kernel"] + p["query"]["bias"]
    k = x_in @ p["key"]["kernel"] + p["key"]["bias"]
    v = x_in @ p["value"]["kernel"] + p["value"]["bias"]
    B, L, W = q.shape
    d = W // heads
    ctx = np.zeros((B, L, heads, d))
    allowed = np.ones((B, L, L), bool)
    if mask_BxL is not None:
        allowed &= mask_BxL[:, None, :].astype(bool)
    if causal:
        allowed &= np.tril(np.ones((L, L), bool))[None]
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)  # head h = contiguous columns
        s = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(d)
        s = np.where(allowed, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        ctx[:, :, h] = s @ v[..., cols]
    out = ctx.reshape(B, L, W) @ p["output"]["kernel"] + p["output"]["bias"]
    return ctx, out


def test_mobilebert_block_matches_numpy():
    cfg = make_cfg(blocks=(BlockSpec("mobilebert", 20, 2),), hidden=16, inner=8)
    model = init_dense(cfg, 7)
    randomize(model, 2)
    P = params_of(model)["blocks"][0]
    x = np.random.default_rng(0).standard_normal((2, 6, 16)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    blk = model.blocks[0]
    from elm_jax.models.layers import attention_mask
    got = jax.jit(lambda x, m: blk(x, attention_mask(m, 6, False), return_internals=True))(
        jnp.asarray(x), jnp.asarray(mask))

    nonorm = lambda z, p: z * p["scale"] + p["bias"]
    b = nonorm(x @ P["dense_in"]["kernel"] + P["dense_in"]["bias"], P["in_norm"])
    _, att = np_attention(x, P["attn"], 2, mask)
    a = nonorm(att + b, P["attn_norm"])
    pre = a @ P["ffn"]["wi"]["kernel"] + P["ffn"]["wi"]["bias"]
    f = np.maximum(pre, 0) @ P["ffn"]["wo"]["kernel"] + P["ffn"]["wo"]["bias"]
    f = nonorm(f + a, P["ffn_norm"])
    y = nonorm(f @ P["dense_out"]["kernel"] + P["dense_out"]["bias"] + x, P["out_norm"])

    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got.attn_out)[real], a[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.ffn_pre)[real], pre[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.out)[real], y[real], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_factorized_embedding_matches_numpy(causal):
    cfg = make_cfg(embedding="factorized", causal=causal, embed_size=6, hidden=16,
                   inner=4, blocks=(BlockSpec("bert", 8, 2),), ln_eps=1e-6)
    model = init_dense(cfg, 9)
    randomize(model, 3)
    P = params_of(model)["embed"]
    ids = np.asarray(rand_ids((2, 7), cfg.vocab_size, 11))
    mask = np.array([[1] * 7, [1] * 5 + [0] * 2])
    seg = np.zeros_like(ids)
    seg[0, 4:] = 1
    got = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg)).embedding)

    tok = P["word"]["embedding"][ids] * mask[..., None]
    B, L, E = tok.shape
    at = lambda t: tok[:, t] if 0 <= t < L else np.zeros((B, E))
    offsets = (0, -1, -2) if causal else (1, 0, -1)
    cat = np.stack([np.concatenate([at(t + o) for o in offsets], -1) for t in range(L)], 1)
    want = cat @ P["proj"]["kernel"] + P["proj"]["bias"]
    want = want + P["position"]["embedding"][:L][None] + P["segment"]["embedding"][seg]
    want = np_ln(want, P["norm"]["scale"], P["norm"]["bias"], 1e-6)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The helper alone, unmasked.
    tok2 = np.random.default_rng(1).standard_normal((1, 4, 3)).astype(np.float32)
    cat2 = np.asarray(neighbour_concat(jnp.asarray(tok2), causal))
    for t in range(4):
        for j, o in enumerate(offsets):
            ref = tok2[0, t + o] if 0 <= t + o < 4 else np.zeros(3)
            np.testing.assert_array_equal(cat2[0, t, 3 * j:3 * j + 3], ref)


def test_head_ctx_reassembles_attention():
    cfg = make_cfg(causal=False, head="none")
    model = init_dense(cfg, 12)
    randomize(model, 4)
    P = params_of(model)
    ids = rand_ids((2, 8), cfg.vocab_size, 13)
    mask = jnp.asarray(np.array([[1] * 8, [1] * 5 + [0] * 3]))
    out = forward(model, ids, mask, return_internals=True)
    real = np.asarray(mask).astype(bool)
    eps = cfg.ln_eps
    x = np.asarray(out.embedding)
    for l, spec in enumerate(cfg.blocks):
        p = P["blocks"][l]
        ctx = np.asarray(out.head_ctx[l])
        B, L, N, d = ctx.shape
        att = ctx.reshape(B, L, N * d) @ p["attn"]["output"]["kernel"] + p["attn"]["output"]["bias"]
        if spec.family == "bert":
            a = np_ln(att + x, p["attn_norm"]["scale"], p["attn_norm"]["bias"], eps)
            attn_in = x
        elif spec.family == "gpt2":
            a = x + att
            attn_in = np_ln(x, p["attn_norm"]["scale"], p["attn_norm"]["bias"], eps)
        else:
            b = x @ p["dense_in"]["kernel"] + p["dense_in"]["bias"]
            b = b * p["in_norm"]["scale"] + p["in_norm"]["bias"]
            a = (att + b) * p["attn_norm"]["scale"] + p["attn_norm"]["bias"]
            attn_in = x
        np.testing.assert_allclose(a[real], np.asarray(out.attn_outs[l])[real], atol=1e-4)
        # Per-head context from first principles (head h = columns [h*d:(h+1)*d]).
        ref_ctx, _ = np_attention(attn_in, p["attn"], spec.heads, np.asarray(mask))
        np.testing.assert_allclose(ctx[real], ref_ctx[real], atol=1e-4)
        # FFN pre-activation is X W1 + b1 of the FFN input.
        a_np = np.asarray(out.attn_outs[l])
        ffn_in = np_ln(a_np, p["ffn_norm"]["scale"], p["ffn_norm"]["bias"], eps) \
            if spec.family == "gpt2" else a_np
        pre = ffn_in @ p["ffn"]["wi"]["kernel"] + p["ffn"]["wi"]["bias"]
        np.testing.assert_allclose(pre[real], np.asarray(out.ffn_pre[l])[real], atol=1e-4)
        x = np.asarray(out.block_outs[l])


def test_dropout_and_dtype():
    cfg = make_cfg(dropout=0.2, head="clm", causal=True, blocks=(BlockSpec("bert", 48, 4),))
    model = init_dense(cfg, 0)
    ids = rand_ids((2, 8), cfg.vocab_size, 0)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=2)
    def run(state, key, deterministic):
        return nnx.merge(graphdef, state)(
            ids, deterministic=deterministic, rngs=nnx.Rngs(dropout=key)).logits

    k1, k2 = jax.random.key(1), jax.random.key(2)
    det1, det2 = run(state, k1, True), run(state, k2, True)
    np.testing.assert_array_equal(np.asarray(det1), np.asarray(det2))
    r1, r2 = np.asarray(run(state, k1, False)), np.asarray(run(state, k2, False))
    assert np.abs(r1 - r2).max() > 1e-4
    np.testing.assert_array_equal(r1, np.asarray(run(state, k1, False)))
    # bfloat16 compute keeps float32 params and stays close to float32 compute.
    bf = DenseLM(dataclasses.replace(cfg, dtype=jnp.bfloat16), rngs=nnx.Rngs(params=0, dropout=1))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf, nnx.Param)))
    out_bf = forward(bf, ids)
    assert out_bf.block_outs[0].dtype == jnp.bfloat16
    lb, lf = np.asarray(out_bf.logits, np.float32), np.asarray(det1)
    assert np.abs(lb - lf).max() < 0.05 * np.abs(lf).max() + 1e-2


# ---------------------------------------------------------------- loss

def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    targets[0, :2] = logits[0, :2].argmax(-1)  # some correct predictions
    weights = rng.uniform(0, 2, size=(3, 5)).astype(np.float32)
    weights[1] = 0.0
    got = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))

    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(got["loss_sum"]), (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(got["weight_sum"]), weights.sum(), rtol=1e-6)
    correct = (logits.argmax(-1) == targets) * weights
    np.testing.assert_allclose(float(got["correct_sum"]), correct.sum(), rtol=1e-6)
    assert correct.sum() > 0
    # Low-precision logits are upcast: result is float32 and close to the f32 result.
    got_bf = weighted_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                                    jnp.asarray(weights) > 0)
    assert got_bf["loss_sum"].dtype == jnp.float32
    np.testing.assert_allclose(float(got_bf["weight_sum"]), (weights > 0).sum())
