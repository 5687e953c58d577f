"""Distillation losses: each against an independent numpy implementation, masking, invariances,
the student -> teacher layer map and the supernet objective."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from elm_jax import distill
from elm_jax.arch import FAMILY_INDEX, ArchArrays
from elm_jax.models.elastic import LayerFeatures, SupernetOutput, init_supernet
from elm_jax.space import SearchSpace

B, S = 3, 7


def make_mask(b=B, s=S):
    m = np.ones((b, s), np.int32)
    m[1, 5:] = 0
    m[2, 3:] = 0
    return m


def perturb_padding(x, mask, rng, scale=100.0):
    """x with random (large) values written at the padded positions."""
    x = np.array(x, copy=True)
    pad = mask == 0
    x[pad] = scale * rng.normal(size=x[pad].shape)
    return x


# ------------------------------------------------------------------ numpy references

def np_mse(s, t, m):
    num, cnt = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if m[b, i]:
                num += np.sum((s[b, i].astype(np.float64) - t[b, i]) ** 2)
                cnt += s.shape[2]
    return num / cnt


def np_pearson(s, t, m, eps=1e-6):
    def z(x):
        out = np.zeros_like(x, dtype=np.float64)
        for b in range(x.shape[0]):
            real = x[b][m[b] != 0].astype(np.float64)
            if len(real) == 0:
                continue
            mu, var = real.mean(0), real.var(0)
            out[b][m[b] != 0] = (real - mu) / np.sqrt(var + eps)
        return out
    return np_mse(z(s), z(t), m)


def np_softmax(z, axis=-1):
    z = z - z.max(axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis, keepdims=True)


def np_corr(a, b, w, eps=1e-8):
    w = w / w.sum()
    ac, bc = a - np.sum(w * a), b - np.sum(w * b)
    return np.sum(w * ac * bc) / (np.sqrt(np.sum(w * ac ** 2)) * np.sqrt(np.sum(w * bc ** 2)) + eps)


def np_dist(zs, zt, tau, w):
    zs, zt, w = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]), w.reshape(-1)
    keep = w > 0
    zs, zt, w = zs[keep].astype(np.float64), zt[keep].astype(np.float64), w[keep].astype(np.float64)
    ps, pt = np_softmax(zs / tau), np_softmax(zt / tau)
    c = ps.shape[1]
    rows = [np_corr(ps[i], pt[i], np.ones(c)) for i in range(len(ps))]
    inter = 1 - np.sum(w * np.array(rows)) / w.sum()
    cols = [np_corr(ps[:, j], pt[:, j], w) for j in range(c)]
    intra = 1 - np.mean(cols)
    return (inter + intra) * tau ** 2


def np_minilm(sq, tq, m, r, causal=False):
    total = 0.0
    for xs, xt in zip(sq, tq):
        kl_sum, cnt = 0.0, 0
        for b in range(xs.shape[0]):
            real = np.nonzero(m[b])[0]
            for h in range(r):
                def rel(x):
                    d = x.shape[-1] // r
                    xh = x[b][real][:, h * d:(h + 1) * d].astype(np.float64)
                    sc = xh @ xh.T / np.sqrt(d)
                    if causal:  # real tokens are a prefix here, so the causal mask is tril
                        sc = np.where(np.tril(np.ones_like(sc)) > 0, sc, -np.inf)
                    return np_softmax(sc)
                ps, pt = rel(xs), rel(xt)
                ok = pt > 0
                kl_sum += np.sum(pt[ok] * (np.log(pt[ok]) - np.log(ps[ok])))
                cnt += len(real)
        total += kl_sum / cnt
    return total / 3


# ------------------------------------------------------------------ feature losses

@pytest.mark.parametrize("kind", ["mse", "pearson"])
def test_feature_losses_match_numpy_and_ignore_padding(kind):
    rng = np.random.default_rng(0)
    m = make_mask()
    s = rng.normal(size=(B, S, 5)).astype(np.float32)
    t = (2.0 * rng.normal(size=(B, S, 5)) + 1.0).astype(np.float32)
    ref = np_mse(s, t, m) if kind == "mse" else np_pearson(s, t, m)
    got = distill.feature_loss(kind, s, t, m)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    fn = distill.mse_feature_loss if kind == "mse" else distill.pearson_feature_loss
    np.testing.assert_allclose(float(fn(s, t, m)), ref, rtol=1e-5)
    s2, t2 = perturb_padding(s, m, rng), perturb_padding(t, m, rng)
    np.testing.assert_allclose(float(jax.jit(fn)(s2, t2, m)), float(got), rtol=1e-6)
    with pytest.raises(ValueError):
        distill.feature_loss("l1", s, t, m)


def test_pearson_invariant_to_per_channel_affine_student():
    rng = np.random.default_rng(1)
    m = make_mask()
    s = rng.normal(size=(B, S, 6)).astype(np.float32)
    t = rng.normal(size=(B, S, 6)).astype(np.float32)
    a = rng.uniform(0.5, 3.0, size=(6,)).astype(np.float32)
    b = rng.normal(size=(6,)).astype(np.float32)
    base = float(distill.pearson_feature_loss(s, t, m))
    assert base > 0.1
    np.testing.assert_allclose(float(distill.pearson_feature_loss(a * s + b, t, m)), base, rtol=1e-4)
    # zero when the student is a per-channel affine map of the teacher
    assert float(distill.pearson_feature_loss(a * t + b, t, m)) < 1e-5
    # ... whereas MSE is not invariant
    assert float(distill.mse_feature_loss(a * t + b, t, m)) > 0.1


# ------------------------------------------------------------------ logit losses

def test_dist_matches_numpy_zero_for_identical_and_ignores_padding():
    rng = np.random.default_rng(2)
    m = make_mask()
    zs = rng.normal(size=(B, S, 9)).astype(np.float32)
    zt = 2 * rng.normal(size=(B, S, 9)).astype(np.float32)
    for tau in (1.0, 2.0):
        got = float(distill.dist_logit_loss(zs, zt, tau, m))
        np.testing.assert_allclose(got, np_dist(zs, zt, tau, m), rtol=1e-4)
        assert abs(float(distill.dist_logit_loss(zt, zt, tau, m))) < 1e-5
        got2 = float(jax.jit(distill.dist_logit_loss)(perturb_padding(zs, m, rng), zt, tau, m))
        np.testing.assert_allclose(got2, got, rtol=1e-6)
    # 2-D input without weights; scale flag
    z2s, z2t = zs[0], zt[0]
    np.testing.assert_allclose(float(distill.dist_logit_loss(z2s, z2t)),
                               np_dist(z2s, z2t, 1.0, np.ones(S)), rtol=1e-4)
    with_scale = float(distill.dist_logit_loss(z2s, z2t, 2.0))
    without = float(distill.dist_logit_loss(z2s, z2t, 2.0, scale_tau2=False))
    np.testing.assert_allclose(with_scale, 4 * without, rtol=1e-6)


def test_soft_cross_entropy_minimum_at_teacher():
    rng = np.random.default_rng(3)
    m = make_mask()
    zt = rng.normal(size=(B, S, 6)).astype(np.float32)
    zs = rng.normal(size=(B, S, 6)).astype(np.float32)
    for tau in (1.0, 3.0):
        pt = np_softmax(zt.astype(np.float64) / tau)
        ce = -np.sum(pt * np.log(np_softmax(zs.astype(np.float64) / tau)), -1)
        ref = tau ** 2 * np.sum(ce * m) / m.sum()
        np.testing.assert_allclose(float(distill.soft_cross_entropy(zs, zt, tau, m)), ref, rtol=1e-5)
        entropy = -np.sum(pt * np.log(pt), -1)
        at_t = float(distill.soft_cross_entropy(zt, zt, tau, m))
        np.testing.assert_allclose(at_t, tau ** 2 * np.sum(entropy * m) / m.sum(), rtol=1e-5)
        g = jax.grad(distill.soft_cross_entropy)(jnp.asarray(zt), zt, tau, m)
        assert np.abs(np.asarray(g)).max() < 1e-6
        assert float(distill.soft_cross_entropy(zs, zt, tau, m)) > at_t
        np.testing.assert_allclose(
            float(distill.soft_cross_entropy(perturb_padding(zs, m, rng), zt, tau, m)), ref, rtol=1e-5)


def test_attention_relation_loss():
    rng = np.random.default_rng(4)
    m = make_mask()
    sq = tuple(rng.normal(size=(B, S, 8)).astype(np.float32) for _ in range(3))
    tq = tuple(rng.normal(size=(B, S, 12)).astype(np.float32) for _ in range(3))  # wider teacher
    got = float(distill.attention_relation_loss(sq, tq, m, relation_heads=2))
    np.testing.assert_allclose(got, np_minilm(sq, tq, m, 2), rtol=1e-4)
    assert abs(float(distill.attention_relation_loss(tq, tq, m, 4))) < 1e-6
    np.testing.assert_allclose(float(distill.attention_relation_loss(sq, tq, m, 2, causal=True)),
                               np_minilm(sq, tq, m, 2, causal=True), rtol=1e-4)
    sq2 = tuple(perturb_padding(x, m, rng) for x in sq)
    fn = jax.jit(distill.attention_relation_loss, static_argnums=(3,))
    np.testing.assert_allclose(float(fn(sq2, tq, m, 2)), got, rtol=1e-5)
    # gradients finite despite the masked keys
    g = jax.grad(lambda q: distill.attention_relation_loss((q,) + sq[1:], tq, m, 2))(jnp.asarray(sq[0]))
    assert np.all(np.isfinite(np.asarray(g)))


# ------------------------------------------------------------------ layer map

def test_teacher_layer_map():
    fn = jax.jit(distill.teacher_layer_map, static_argnums=1)
    for active in ([1, 0, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1], [0] * 6 + [1] * 6, [1] * 6 + [0] * 6):
        act = np.array(active, bool)
        idx, valid = fn(jnp.asarray(act), 12)
        np.testing.assert_array_equal(np.asarray(valid), act)
        assert list(np.asarray(idx)[act]) == [1, 3, 5, 7, 9, 11]
        assert np.all((np.asarray(idx) >= 0) & (np.asarray(idx) < 12))
    idx, valid = fn(jnp.array([1, 1, 0, 1, 1, 0], bool), 6)  # L_t=6, L_s=4 -> k=1
    assert list(np.asarray(idx)[np.asarray(valid)]) == [0, 1, 2, 3]
    idx, valid = fn(jnp.ones(12, bool), 12)
    assert list(np.asarray(idx)) == list(range(12))


# ------------------------------------------------------------------ supernet objective

H, I, HT, L, LT = 8, 4, 10, 4, 8


def fake_student(rng, arch):
    """Random SupernetOutput features; a family's attention features are zero on the other
    family's layers and on skipped layers (as the supernet produces them)."""
    fam, act = np.asarray(arch.family), np.asarray(arch.active)
    attn_b = rng.normal(size=(L, B, S, H)).astype(np.float32)
    attn_m = rng.normal(size=(L, B, S, I)).astype(np.float32)
    attn_b[~(act & (fam == 0))] = 0
    attn_m[~(act & (fam == 1))] = 0
    feats = LayerFeatures(block=rng.normal(size=(L, B, S, H)).astype(np.float32),
                          attn_bert=attn_b, attn_mobilebert=attn_m)
    return SupernetOutput(logits=None, embedding=rng.normal(size=(B, S, H)).astype(np.float32),
                          layers=feats)


def make_arch(family, active):
    family, active = np.array(family, np.int32), np.array(active, bool)
    n = len(family)
    return ArchArrays(family=family, candidate=np.zeros(n, np.int32), width=np.full(n, 4, np.int32),
                      heads=np.ones(n, np.int32), active=active)


def np_supernet_loss(out, te, ta, tb, arch, m, proj, kind):
    ref_d = np_pearson if kind == "pearson" else np_mse
    p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in proj.items()}
    lin = lambda x, q: x.astype(np.float64) @ q["kernel"] + q["bias"]  # noqa: E731
    emb = ref_d(lin(out.embedding, p["shared"]), te, m)
    active = [l for l in range(L) if arch.active[l]]
    k = LT // len(active)
    attn = block = 0.0
    for rank, l in enumerate(active):
        tl = (rank + 1) * k - 1
        fam = "bert" if arch.family[l] == 0 else "mobilebert"
        a_s = getattr(out.layers, f"attn_{fam}")[l]
        attn += ref_d(lin(a_s, p[f"attn_{fam}"]), ta[tl], m)
        block += ref_d(lin(out.layers.block[l], p["shared"]), tb[tl], m)
    return emb + attn + block, {"embedding": emb, "attn": attn, "block": block}


def student_args(out, arch):
    """The student arguments of ``supernet_distill_loss`` from a supernet output and its arch."""
    attn = {f: getattr(out.layers, f"attn_{f}") for f in FAMILY_INDEX}
    return out.embedding, out.layers.block, attn, arch.family, arch.active


@pytest.mark.parametrize("kind", ["pearson", "mse"])
def test_supernet_distill_loss_equals_python_loop(kind):
    rng = np.random.default_rng(5)
    m = make_mask()
    proj = distill.init_projections(jax.random.key(0), H, I, HT, ("bert", "mobilebert"))
    assert proj["shared"]["kernel"].shape == (H, HT) and proj["attn_mobilebert"]["kernel"].shape == (I, HT)
    assert float(jnp.abs(proj["shared"]["bias"]).max()) == 0.0
    te = rng.normal(size=(B, S, HT)).astype(np.float32)
    ta = rng.normal(size=(LT, B, S, HT)).astype(np.float32)
    tb = rng.normal(size=(LT, B, S, HT)).astype(np.float32)
    fn = jax.jit(distill.supernet_distill_loss, static_argnames=("kind",))
    for family, active in (([0, 1, 1, 0], [1, 1, 0, 1]), ([1, 1, 0, 0], [1, 1, 1, 1]),
                           ([0, 0, 1, 0], [0, 1, 0, 0])):
        arch = make_arch(family, active)
        out = fake_student(rng, arch)
        loss, parts = fn(*student_args(out, arch), te, ta, tb, m, proj, kind=kind)
        ref, ref_parts = np_supernet_loss(out, te, ta, tb, arch, m, proj, kind)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-4)
        for name in ("embedding", "attn", "block"):
            np.testing.assert_allclose(float(parts[name]), ref_parts[name], rtol=1e-4, atol=1e-6)
        # teacher given as tuples of per-layer arrays (dense ModelOutput form) gives the same
        loss_t, _ = distill.supernet_distill_loss(*student_args(out, arch), te, tuple(ta), tuple(tb), m, proj,
                                                  kind)
        np.testing.assert_allclose(float(loss_t), float(loss), rtol=1e-6)


def test_absent_family_projection_gets_zero_gradient():
    rng = np.random.default_rng(6)
    m = make_mask()
    proj = distill.init_projections(jax.random.key(1), H, I, HT, ("bert", "mobilebert"))
    te = rng.normal(size=(B, S, HT)).astype(np.float32)
    ta = rng.normal(size=(LT, B, S, HT)).astype(np.float32)
    tb = rng.normal(size=(LT, B, S, HT)).astype(np.float32)
    # mobilebert only on a skipped layer: no active mobilebert layer
    arch = make_arch([0, 1, 0, 0], [1, 0, 1, 1])
    out = fake_student(rng, arch)
    out = out.replace(layers=out.layers._replace(
        attn_mobilebert=rng.normal(size=(L, B, S, I)).astype(np.float32)))  # even non-zero features
    grads = jax.grad(lambda p: distill.supernet_distill_loss(*student_args(out, arch), te, ta, tb, m, p)[0])(proj)
    for leaf in jax.tree.leaves(grads["attn_mobilebert"]):
        assert float(jnp.abs(leaf).max()) == 0.0
    assert float(jnp.abs(grads["attn_bert"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["shared"]["kernel"]).max()) > 0
    # a menu without mobilebert: no projection, features None
    proj_b = distill.init_projections(jax.random.key(1), H, I, HT, ("bert",))
    assert "attn_mobilebert" not in proj_b
    out_b = out.replace(layers=out.layers._replace(attn_mobilebert=None))
    arch_b = make_arch([0, 0, 0, 0], [1, 0, 1, 1])
    loss, _ = jax.jit(distill.supernet_distill_loss)(*student_args(out_b, arch_b), te, ta, tb, m, proj_b)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError):
        distill.init_projections(jax.random.key(0), H, I, HT, ("gpt",))


def test_supernet_distill_loss_on_real_supernet_traced_arch():
    """End to end on a real supernet: one jitted loss+grad for several sampled architectures."""
    space = SearchSpace.from_config(
        ConfigDict(dict(layers=3, hidden=H, inner=I, embed_size=8, candidates=2, f0=4, base_heads=2,
                        families=("bert", "mobilebert"), elastic_depth=True, min_layers=1,
                        max_ffn={"bert": 12, "mobilebert": 8})),
        vocab_size=31, max_len=S, task="mlm")
    from flax import nnx
    graphdef, state = nnx.split(init_supernet(space, seed=0))
    rng = np.random.default_rng(7)
    ids = rng.integers(5, 31, (B, S)).astype(np.int32)
    m = make_mask()
    proj = distill.init_projections(jax.random.key(2), H, I, HT, space.families)
    te = rng.normal(size=(B, S, HT)).astype(np.float32)
    ta = rng.normal(size=(6, B, S, HT)).astype(np.float32)
    tb = rng.normal(size=(6, B, S, HT)).astype(np.float32)

    @jax.jit
    def step(state, proj, arrays):
        def f(state, proj):
            out = nnx.merge(graphdef, state)(ids, arrays, m)
            return distill.supernet_distill_loss(*student_args(out, arrays), te, ta, tb, m, proj)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(state, proj)

    for _ in range(3):
        arch = space.sample(rng)
        arrays = space.to_arrays(arch, space.initial_widths())
        loss, (gs, gp) = step(state, proj, arrays)
        assert np.isfinite(float(loss))
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((gs, gp)))
        for fam, idx in FAMILY_INDEX.items():
            used = any(lc.active and lc.family == fam for lc in arch.layers)
            gmax = float(jnp.abs(gp[f"attn_{fam}"]["kernel"]).max())
            assert (gmax > 0) == used, (fam, gmax, arch)
    assert step._cache_size() == 1


def test_kd_projections_module_holds_init_projections():
    """One module for both students: the values of ``init_projections`` with the same key, as
    parameters ``<name>.<kernel|bias>`` (``proj.<name>.<k>`` in a student's checkpoint)."""
    from flax import nnx

    want = distill.init_projections(jax.random.key(4), H, I, HT, ("bert", "mobilebert"))
    mod = distill.KDProjections(jax.random.key(4), H, I, HT, ("bert", "mobilebert"))
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(mod, nnx.Param))}
    assert set(flat) == {f"{n}.{k}" for n in want for k in ("kernel", "bias")}
    got = mod.arrays()
    assert list(got) == list(want)
    for n in want:
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(got[n][k]), np.asarray(want[n][k]))
            np.testing.assert_array_equal(np.asarray(flat[f"{n}.{k}"][...]), np.asarray(want[n][k]))
    only_bert = distill.KDProjections(jax.random.key(4), H, I, HT, ("bert",))
    assert list(only_bert.arrays()) == ["shared", "attn_bert"]
