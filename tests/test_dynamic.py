"""Dynamic modules: PCA width statistic + width growth, CKA head analysis."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict
from flax import nnx

from elm_jax import dynamic
from elm_jax.arch import ArchArrays
from elm_jax.models.elastic import init_supernet
from elm_jax.space import SearchSpace


# ------------------------------------------------------------------ PCA

def np_pca_k(x, width, eta, mask=None):
    """Independent reference: np.linalg.eigh of the covariance of the real block."""
    x = np.asarray(x, np.float64)[:, :width]
    if mask is not None:
        x = x[np.asarray(mask) != 0]
    if width == 0 or len(x) == 0:
        return 0
    xc = x - x.mean(0)
    cov = xc.T @ xc / max(len(x) - 1, 1)
    ev = np.sort(np.clip(np.linalg.eigh(cov)[0], 0, None))[::-1]
    if ev.sum() <= 0:
        return 0
    share = np.cumsum(ev) / ev.sum()
    return int(np.argmax(share > eta) + 1)


def low_rank(rng, n, f, rank, noise=0.0):
    x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, f)) * rng.uniform(0.5, 2, size=(f,))
    x = x + 5.0 + noise * rng.normal(size=(n, f))  # non-zero column means: centring matters
    return x.astype(np.float32)


def test_pca_components_known_rank_and_numpy():
    rng = np.random.default_rng(0)
    for rank in (1, 3, 7):
        x = low_rank(rng, 200, 16, rank)
        assert int(dynamic.pca_components(x, 16, 0.999)) == rank
    # full-rank data with decaying spectrum: compare with numpy for several eta / widths
    x = (rng.normal(size=(300, 20)) * np.linspace(3, 0.1, 20)).astype(np.float32)
    for eta in (0.5, 0.9, 0.99):
        for width in (20, 13, 4):
            assert int(dynamic.pca_components(x, width, eta)) == np_pca_k(x, width, eta), (eta, width)
    # fewer tokens than columns (Gram path)
    xs = low_rank(rng, 10, 24, 4, noise=0.3)
    for eta in (0.5, 0.9):
        assert int(dynamic.pca_components(xs, 24, eta)) == np_pca_k(xs, 24, eta)
    # zero variance -> 0; zero width -> 0
    assert int(dynamic.pca_components(np.ones((50, 8), np.float32), 8, 0.9)) == 0
    assert int(dynamic.pca_components(x, 0, 0.9)) == 0


def test_pca_masked_columns_tokens_and_traced_width():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(120, 24)) * np.linspace(2, 0.2, 24)).astype(np.float32)
    width = 10
    ref = np_pca_k(x, width, 0.9)
    junk = x.copy()
    junk[:, width:] = 1e3 * rng.normal(size=(120, 24 - width))  # columns beyond width are masked
    assert int(dynamic.pca_components(junk, width, 0.9)) == ref
    jitted = jax.jit(dynamic.pca_components, static_argnums=2)
    for w in (3, 10, 24):
        assert int(jitted(junk, jnp.int32(w), 0.9)) == np_pca_k(junk, w, 0.9)
    assert jitted._cache_size() == 1
    # token mask: padded rows never count
    mask = (rng.uniform(size=120) > 0.3).astype(np.int32)
    pad = junk.copy()
    pad[mask == 0] = 1e4
    assert int(dynamic.pca_components(pad, width, 0.9, mask)) == np_pca_k(x, width, 0.9, mask)


def make_arrays(family, candidate, width, heads, active):
    return ArchArrays(family=np.array(family, np.int32), candidate=np.array(candidate, np.int32),
                      width=np.array(width, np.int32), heads=np.array(heads, np.int32),
                      active=np.array(active, bool))


def test_layer_pca_stats_per_family_eta():
    rng = np.random.default_rng(2)
    L, B, S, FB, FM = 4, 3, 40, 16, 12
    spec = np.linspace(3, 0.05, max(FB, FM))
    pre_b = (rng.normal(size=(L, B, S, FB)) * spec[:FB]).astype(np.float32)
    pre_m = (rng.normal(size=(L, B, S, FM)) * spec[:FM]).astype(np.float32)
    mask = np.ones((B, S), np.int32)
    mask[1, 30:] = 0
    arch = make_arrays([0, 1, 0, 1], [0, 1, 2, 0], [16, 12, 8, 6], [1] * 4, [1, 1, 1, 0])
    k = jax.jit(dynamic.layer_pca_stats)(pre_b, pre_m, arch, mask)
    flat_mask = mask.reshape(-1)
    expect = []
    for l in range(L):
        if not arch.active[l]:
            expect.append(0)
            continue
        fam = "bert" if arch.family[l] == 0 else "mobilebert"
        pre = (pre_b if fam == "bert" else pre_m)[l].reshape(B * S, -1)
        expect.append(np_pca_k(pre, int(arch.width[l]), dynamic.ETA[fam], flat_mask))
    assert list(np.asarray(k)) == expect
    assert np.asarray(k).dtype == np.int32
    # the family's eta matters: same data, bert's 0.99 needs more components than mobilebert's 0.9
    same = make_arrays([0, 1, 0, 1], [0] * 4, [12] * 4, [1] * 4, [1] * 4)
    k2 = np.asarray(dynamic.layer_pca_stats(pre_m, pre_m, same, mask))
    assert k2[0] > k2[1] and k2[2] > k2[3]
    # one family off the menu
    only_b = make_arrays([0, 0, 0, 0], [0] * 4, [16] * 4, [1] * 4, [1, 0, 1, 1])
    k3 = np.asarray(dynamic.layer_pca_stats(pre_b, None, only_b, mask))
    assert k3[1] == 0 and all(k3[[0, 2, 3]] > 0)


# ------------------------------------------------------------------ accumulator + growth

def test_accumulator_mean_state_and_reset():
    acc = dynamic.PCAAccumulator(num_layers=3, num_candidates=2)
    a1 = make_arrays([0, 1, 0], [1, 0, 0], [4] * 3, [1] * 3, [1, 1, 0])
    acc.add([5, 7, 99], a1)
    acc.add(np.array([3, 1, 99]), a1)
    mean = acc.mean()
    assert mean.shape == (3, 2, 2)
    assert mean[0, 0, 1] == 4.0 and mean[1, 1, 0] == 4.0
    assert acc.counts[2].sum() == 0 and np.isnan(mean[2]).all()  # inactive layer not recorded
    # batched rows ([P, L])
    rows = make_arrays([[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [1, 1, 1]], [[4] * 3] * 2, [[1] * 3] * 2,
                       [[1, 1, 1], [1, 1, 1]])
    acc.add([[2, 2, 2], [6, 6, 6]], rows)
    assert acc.counts[2, 0, 0] == 1 and acc.counts[2, 1, 1] == 1
    restored = dynamic.PCAAccumulator.from_state_dict(acc.state_dict())
    np.testing.assert_array_equal(restored.sums, acc.sums)
    np.testing.assert_array_equal(restored.counts, acc.counts)
    assert restored.sums.dtype == np.float64 and restored.counts.dtype == np.int64
    acc.reset()
    assert acc.counts.sum() == 0 and acc.sums.sum() == 0
    assert restored.counts.sum() > 0  # state_dict copies
    with pytest.raises(ValueError):
        acc.add([1, 2], a1)


def test_grow_widths_top_k_caps_ties_budget():
    L, T = 3, 2
    acc = dynamic.PCAAccumulator(L, T)
    # mean k per entry (count 1 each where set)
    for (l, f, c), k in {(0, 0, 0): 10, (0, 0, 1): 30, (1, 1, 0): 30, (2, 0, 1): 20,
                         (2, 1, 1): 50, (1, 0, 0): 5}.items():
        acc.sums[l, f, c], acc.counts[l, f, c] = k, 1
    widths = np.full((L, 2, T), 8, np.int32)
    max_w = np.full((L, 2, T), 16, np.int32)
    max_w[2, 1, 1] = 8  # the top entry is already at its cap -> not eligible
    max_w[0, 0, 1] = 10  # capped growth
    new, grown = dynamic.grow_widths(widths, acc, num_add=3, f0=4, max_widths=max_w,
                                     families_on_menu=("bert", "mobilebert"))
    # 50 is capped; then the 30-tie broken by (l, fam, cand): (0,0,1) before (1,1,0); then 20
    assert grown == [(0, 0, 1, 8, 10), (1, 1, 0, 8, 12), (2, 0, 1, 8, 12)]
    assert new[0, 0, 1] == 10 and new[1, 1, 0] == 12 and new[2, 0, 1] == 12
    assert np.all(new >= widths) and np.all(new <= np.maximum(max_w, widths))
    assert widths[0, 0, 1] == 8  # input untouched
    assert new.dtype == np.int32
    # family off the menu is never grown
    new_b, grown_b = dynamic.grow_widths(widths, acc, 2, 4, max_w, ("bert",))
    assert [g[:3] for g in grown_b] == [(0, 0, 1), (2, 0, 1)]
    # budget: skip entirely when the mean parameter count exceeds upper_params
    calls = []
    skipped, none = dynamic.grow_widths(widths, acc, 3, 4, max_w, ("bert", "mobilebert"),
                                        mean_params_fn=lambda: calls.append(1) or 2e6,
                                        upper_params=1e6)
    assert none == [] and np.array_equal(skipped, widths) and calls == [1]
    _, some = dynamic.grow_widths(widths, acc, 3, 4, max_w, ("bert", "mobilebert"),
                                  mean_params_fn=lambda: 5e5, upper_params=1e6)
    assert len(some) == 3
    # never shrinks, even with a cap below the current width; no counts -> nothing grows
    over = np.full((L, 2, T), 20, np.int32)
    same, g2 = dynamic.grow_widths(over, acc, 3, 4, max_w, ("bert", "mobilebert"))
    assert g2 == [] and np.array_equal(same, over)
    fresh, g3 = dynamic.grow_widths(widths, dynamic.PCAAccumulator(L, T), 3, 4, max_w, ("bert",))
    assert g3 == [] and np.array_equal(fresh, widths)


# ------------------------------------------------------------------ CKA

def np_cka(x, y):
    """Independent reference: HSIC with the explicit centring matrix H."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_properties():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 9)) + 0.5 * rng.normal(size=(20, 9))).astype(np.float32)
    np.testing.assert_allclose(float(dynamic.linear_cka(x, x)), 1.0, atol=1e-5)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(float(dynamic.linear_cka(x, (x @ q * 3.7).astype(np.float32))), 1.0,
                               atol=1e-5)
    np.testing.assert_allclose(float(dynamic.linear_cka(x, y)), np_cka(x, y), rtol=1e-5)
    np.testing.assert_allclose(float(dynamic.linear_cka(x, y)), float(dynamic.linear_cka(y, x)),
                               rtol=1e-6)
    z = rng.normal(size=(20, 4)).astype(np.float32)
    np.testing.assert_allclose(float(jax.jit(dynamic.linear_cka)(x, z)), np_cka(x, z), rtol=1e-5)
    assert float(dynamic.linear_cka(x, np.ones((20, 3), np.float32))) == 0.0


def head_context(rng, b=6, s=5, heads=4, d=3, copies=((2, 0), (3, 0))):
    ctx = rng.normal(size=(b, s, heads, d))
    for dst, src in copies:
        ctx[:, :, dst] = ctx[:, :, src] * 2.0 + 0.0  # a scaled copy: CKA 1
    return ctx.reshape(b, s, heads * d).astype(np.float32)


def test_head_cka_matrix_redundant_heads_and_reduced_count():
    rng = np.random.default_rng(4)
    b, s, heads, d = 6, 5, 4, 3
    ctx = head_context(rng, b, s, heads, d)
    mask = np.ones((b, s), np.int32)
    mask[2, 3:] = 0
    cka = np.asarray(jax.jit(dynamic.head_cka_matrix, static_argnums=1)(ctx, heads, mask))
    assert cka.shape == (heads, heads)
    np.testing.assert_allclose(cka, cka.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-5)
    # against the numpy reference on the masked, per-example flattened heads
    xm = ctx * mask[..., None]
    flat = [xm[:, :, h * d:(h + 1) * d].reshape(b, -1) for h in range(heads)]
    ref = np.array([[np_cka(flat[i], flat[j]) for j in range(heads)] for i in range(heads)])
    np.testing.assert_allclose(cka, ref, atol=1e-5)
    # padding values do not matter
    junk = ctx.copy()
    junk[mask == 0] = 50.0
    np.testing.assert_allclose(np.asarray(dynamic.head_cka_matrix(junk, heads, mask)), cka, atol=1e-6)
    assert dynamic.redundant_heads(cka) == [False, False, True, True]
    # 2 non-redundant heads; width 12 -> divisor 2
    assert dynamic.reduced_head_count(cka, width=12) == 2
    # width 9: divisors 1, 3, 9 -> largest <= 2 is 1
    assert dynamic.reduced_head_count(cka, width=9) == 1
    off = dynamic.mean_offdiag_cka(cka)
    assert 0 < off < 1
    np.testing.assert_allclose(off, (cka.sum() - np.trace(cka)) / 12)
    assert np.isnan(dynamic.mean_offdiag_cka(np.ones((1, 1))))


def test_reduced_head_count_picks_divisor():
    eye = np.eye(6)  # no redundancy: 6 non-redundant heads
    assert dynamic.reduced_head_count(eye, width=12) == 6
    assert dynamic.reduced_head_count(eye, width=8) == 4  # divisors of 8 <= 6
    assert dynamic.reduced_head_count(eye, width=12, allowed=(1, 2, 4, 12)) == 4
    assert dynamic.reduced_head_count(eye, width=12, allowed=(12,)) == 12  # nothing <= 6 allowed
    full = np.ones((4, 4))  # all copies of head 0
    assert dynamic.redundant_heads(full) == [False, True, True, True]
    assert dynamic.reduced_head_count(full, width=16) == 1
    thr = np.eye(3)
    thr[0, 2] = thr[2, 0] = 0.95
    assert dynamic.redundant_heads(thr, threshold=0.9) == [False, False, True]
    assert dynamic.redundant_heads(thr, threshold=0.96) == [False, False, False]


def test_grouped_head_cka_traced_heads():
    rng = np.random.default_rng(5)
    base, d = 4, 3
    ctx = head_context(rng, heads=base, d=d, copies=())
    fn = jax.jit(dynamic.grouped_head_cka, static_argnums=2)
    for h in (1, 2, 4):
        cka, valid = fn(ctx, jnp.int32(h), base)
        cka, valid = np.asarray(cka), np.asarray(valid)
        assert list(valid) == [i < h for i in range(base)]
        np.testing.assert_allclose(cka[:h, :h], np.asarray(dynamic.head_cka_matrix(ctx, h)), atol=1e-5)
        assert np.all(cka[h:] == 0) and np.all(cka[:, h:] == 0)
    assert fn._cache_size() == 1


def test_layer_stats_on_real_supernet():
    """layer_pca_stats / layer_head_cka on real supernet internals, traced architecture, one
    compile, equal to the per-layer host computations."""
    space = SearchSpace.from_config(
        ConfigDict(dict(layers=3, hidden=16, inner=8, embed_size=8, candidates=2, f0=4, base_heads=4,
                        families=("bert", "mobilebert"), elastic_depth=True, min_layers=1,
                        max_ffn={"bert": 16, "mobilebert": 12})),
        vocab_size=41, max_len=10, task="mlm")
    graphdef, state = nnx.split(init_supernet(space, seed=0))
    rng = np.random.default_rng(6)
    ids = rng.integers(5, 41, (5, 10)).astype(np.int32)
    mask = np.ones((5, 10), np.int32)
    mask[3, 6:] = 0

    @jax.jit
    def stats(state, arrays):
        out = nnx.merge(graphdef, state)(ids, arrays, mask, return_internals=True)
        f = out.layers
        k = dynamic.layer_pca_stats(f.ffn_pre_bert, f.ffn_pre_mobilebert, arrays, mask)
        c = dynamic.layer_head_cka(f.ctx_bert, f.ctx_mobilebert, arrays, space.base_heads, mask)
        return k, c, f

    acc = dynamic.PCAAccumulator(space.layers, space.candidates)
    n_active = 0
    for _ in range(4):
        arch = space.sample(rng)
        arrays = space.to_arrays(arch, space.initial_widths())
        k, c, f = stats(state, arrays)
        k, c = np.asarray(k), np.asarray(c)
        for l, lc in enumerate(arch.layers):
            if not lc.active:
                assert k[l] == 0 and np.isnan(c[l])
                continue
            pre = np.asarray(getattr(f, f"ffn_pre_{lc.family}")[l]).reshape(50, -1)
            w = int(arrays.width[l])
            ref = np_pca_k(pre, w, dynamic.ETA[lc.family], mask.reshape(-1))
            assert abs(int(k[l]) - ref) <= 1 and 0 < k[l] <= w, (l, lc, k[l], ref)  # float32 vs 64
            ctx = np.asarray(getattr(f, f"ctx_{lc.family}")[l])
            if lc.heads > 1:
                host = dynamic.mean_offdiag_cka(dynamic.head_cka_matrix(ctx, lc.heads, mask))
                np.testing.assert_allclose(c[l], host, atol=1e-5)
            else:
                assert np.isnan(c[l])
        acc.add(k, arrays)
        n_active += arch.num_active
    assert stats._cache_size() == 1
    assert acc.counts.sum() == n_active
    assert np.nanmax(acc.mean()) > 0
