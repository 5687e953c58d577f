"""Elastic supernet: masked forward == extracted dense model, zero gradients off-path, one compile."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from random_weights import randomize

from elm_jax import engine as train_lib
from elm_jax.accounting import count_params as arch_count_params
from elm_jax.arch import FAMILY_INDEX, Arch, LayerChoice
from elm_jax.data.arch_batches import ArchBatches, FixedArchBatches, arch_rows
from elm_jax.engine import sharding
from elm_jax.lm import supernet_lm_fns
from elm_jax.models.dense import count_params
from elm_jax.dynamic import block_cka, block_cka_matrix
from elm_jax.models.elastic import FAMILY_PARAMS, _pkey, init_supernet
from elm_jax.models.extract import extract
from elm_jax.models.layers import attention_mask
from elm_jax.space import SearchSpace

VOCAB, SEQ = 97, 12


def make_space(task, **kw):
    base = dict(layers=3, hidden=24, inner=12, embed_size=8, candidates=3, f0=4, base_heads=4,
                families=("bert", "mobilebert"), elastic_depth=True, min_layers=1,
                max_ffn={"bert": 20, "mobilebert": 16})
    base.update(kw)
    return SearchSpace.from_config(ConfigDict(base), vocab_size=VOCAB, max_len=SEQ, task=task)


def grown_widths(space, rng):
    """Random widths as PCA growth would leave them: initial + k * f0, capped."""
    w = space.initial_widths() + space.f0 * rng.integers(0, 4, space.initial_widths().shape)
    return np.minimum(w, space.max_widths()).astype(np.int32)


def batch(rng, causal):
    ids = rng.integers(7, VOCAB, (3, SEQ)).astype(np.int32)
    mask = np.ones((3, SEQ), np.int32)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module", params=["mlm", "clm"])
def setup(request):
    space = make_space(request.param)
    sn = init_supernet(space, seed=1)
    randomize(sn, 1)  # O(1) weights: attention far from uniform, so head-grouping bugs show
    graphdef, state = nnx.split(sn)

    @jax.jit
    def fwd(state, arrays, ids, mask):
        return nnx.merge(graphdef, state)(ids, arrays, mask, return_internals=True)

    return space, sn, state, fwd


def close(a, b, what, rtol=1e-5):
    """Max error at most ``rtol`` times the reference's largest magnitude."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err, scale = np.abs(a - b).max(), np.abs(b).max()
    assert err <= rtol * scale, f"{what}: max error {err} at scale {scale}"


def test_supernet_equals_extracted_dense_model(setup):
    space, sn, state, fwd = setup
    rng = np.random.default_rng(0)
    ids, mask = batch(rng, space.task == "clm")
    real = mask.astype(bool)
    seen_heads, seen_fams, seen_skip = set(), set(), False
    for k in range(22):
        arch = space.sample(rng)
        widths = grown_widths(space, rng)
        out = fwd(state, space.to_arrays(arch, widths), ids, mask)
        dense = extract(sn, widths, arch)
        ref = dense(ids, mask, return_internals=True)
        close(out.logits[real], ref.logits[real], f"logits {arch.describe()}")
        if k == 0:  # not vacuous: another head count of one layer changes the logits clearly
            l = next(l for l, lc in enumerate(arch.layers) if lc.active)
            h = next(h for h in space.head_choices if h != arch.layers[l].heads)
            other = Arch(tuple(dataclasses.replace(lc, heads=h) if i == l else lc
                               for i, lc in enumerate(arch.layers)))
            moved = fwd(state, space.to_arrays(other, widths), ids, mask).logits
            assert np.abs(np.asarray(moved - out.logits)[real]).max() > 1e-2 * np.abs(ref.logits[real]).max()
        close(out.embedding[real], ref.embedding[real], "embedding")
        i = 0
        for l, lc in enumerate(arch.layers):
            seen_skip |= not lc.active
            if not lc.active:
                continue
            seen_heads.add(lc.heads)
            seen_fams.add(lc.family)
            f = lc.family
            width = int(widths[l, FAMILY_INDEX[f], lc.candidate])
            feats = out.layers
            close(feats.block[l][real], ref.block_outs[i][real], f"block {l}")
            close(getattr(feats, f"attn_{f}")[l][real], ref.attn_outs[i][real], f"attn {l}")
            pre = getattr(feats, f"ffn_pre_{f}")[l]
            close(pre[..., :width][real], ref.ffn_pre[i][real], f"ffn_pre {l}")
            assert not np.asarray(pre[..., width:]).any()  # masked units stay exactly zero
            ctx = ref.head_ctx[i]
            close(getattr(feats, f"ctx_{f}")[l][real], ctx.reshape(*ctx.shape[:2], -1)[real], f"ctx {l}")
            i += 1
        assert i == len(dense.cfg.blocks)
        assert arch_count_params(space, arch, widths) == count_params(dense)
    assert seen_heads == set(space.head_choices) and seen_fams == {"bert", "mobilebert"} and seen_skip
    assert fwd._cache_size() == 1  # every architecture and width state: one compilation


def test_causal_supernet_never_sees_the_future():
    space = make_space("clm")
    sn = init_supernet(space, seed=2)
    rng = np.random.default_rng(3)
    arch = space.sample(rng)
    arrays = space.to_arrays(arch, space.initial_widths())
    ids = rng.integers(7, VOCAB, (2, SEQ)).astype(np.int32)
    changed = ids.copy()
    changed[:, 7:] = rng.integers(7, VOCAB, (2, SEQ - 7))
    a, b = sn(ids, arrays).logits, sn(changed, arrays).logits
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-4


def test_gradients_off_the_path_are_exactly_zero():
    space = make_space("mlm")
    sn = init_supernet(space, seed=4)
    rng = np.random.default_rng(5)
    arch = space.sample(rng)
    while arch.num_active == space.layers:  # want a skipped layer too
        arch = space.sample(rng)
    widths = grown_widths(space, rng)
    arrays = space.to_arrays(arch, widths)
    ids, mask = batch(rng, False)
    graphdef, params = nnx.split(sn, nnx.Param)

    def loss(params):
        out = nnx.merge(graphdef, params)(ids, arrays, mask)
        return jnp.mean(out.logits ** 2)

    grads = nnx.to_flat_state(jax.grad(loss)(params))
    grads = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in grads}
    for f, table in FAMILY_PARAMS.items():
        for path, (_, _, ffn_axis) in table.items():
            g = grads[f"blocks.{f}.p.{_pkey(path)}"]
            for l, lc in enumerate(arch.layers):
                for j in range(space.candidates):
                    used = lc.active and lc.family == f and lc.candidate == j
                    gl = g[l, j]
                    if not used:
                        assert not gl.any(), (f, path, l, j)
                    elif ffn_axis is not None:
                        w = int(widths[l, FAMILY_INDEX[f], j])
                        beyond = np.take(gl, np.arange(w, gl.shape[ffn_axis]), axis=ffn_axis)
                        assert not beyond.any(), (f, path, l, "beyond width")
                        assert np.take(gl, np.arange(w), axis=ffn_axis).any()


@pytest.fixture(scope="module")
def engine():
    """Supernet training on an 8-device mesh, one architecture per device (shard_map)."""
    space = make_space("mlm")
    mesh = sharding.make_mesh(ConfigDict(dict(data=-1, fsdp=1)))
    loss_fn, eval_fn = supernet_lm_fns(mesh)
    tc = ConfigDict(dict(steps=100, lr=1e-2, warmup_frac=0.1, seed=0))
    trainer = train_lib.Trainer(init_supernet(space, seed=6), loss_fn, eval_fn, tc, mesh)
    return space, mesh, trainer


class _Toy:
    """A tiny learnable MLM source (each row counts up from a random start), pure in step."""

    def batch(self, step, process_index=0, process_count=1):
        rng = np.random.default_rng([7, step])
        start = rng.integers(0, VOCAB - 7, (16, 1))
        ids = ((start + np.arange(SEQ)) % (VOCAB - 7) + 7).astype(np.int32)
        w = (rng.random((16, SEQ)) < 0.3).astype(np.float32)
        return {"inputs": np.where(w > 0, 4, ids), "targets": ids, "weights": w,
                "mask": np.ones_like(ids), "segment_ids": np.zeros_like(ids)}

    def batches(self, process_index=0, process_count=1):
        for s in range(3):
            yield self.batch(1000 + s)


def test_one_compilation_for_many_architectures(engine):
    space, mesh, trainer = engine
    src = ArchBatches(_Toy(), space, space.initial_widths(), mode="device", num_devices=8, seed=0)
    state = trainer.init_state()
    seen, losses = set(), []
    for step in range(8):  # 8 devices x 8 steps = 64 architectures
        seen.update(a.arch_id for a in src.archs(step))
        state, m = trainer.train_step(state, sharding.global_batch(src.batch(step), mesh))
        losses.append(float(m["loss"]))
    for k in range(50):
        arch = space.sample(np.random.default_rng([9, k]))
        train_lib.evaluate(trainer, state, FixedArchBatches(_Toy(), space, arch, space.initial_widths()))
    assert len(seen) >= 50
    assert trainer.train_step._cache_size() == 1 and trainer.train_step_traces == 1
    assert trainer.eval_step._cache_size() == 1
    assert all(np.isfinite(losses))


def test_per_device_architectures_give_the_mean_of_their_losses(engine):
    space, mesh, trainer = engine
    state = trainer.init_state()
    rng = np.random.default_rng(11)
    archs = [space.sample(rng) for _ in range(8)]
    arrays = [space.to_arrays(a, space.initial_widths()) for a in archs]
    b = _Toy().batch(0)
    got = trainer.eval_step(state, sharding.global_batch(b | arch_rows(arrays, 16), mesh))
    model = trainer.model_from_state(state)
    from elm_jax.engine.losses import weighted_cross_entropy
    want = 0.0
    for d in range(8):  # device d holds rows 2d, 2d+1 and architecture d
        sl = slice(2 * d, 2 * d + 2)
        out = model(b["inputs"][sl], arrays[d], b["mask"][sl])
        want += float(weighted_cross_entropy(out.logits, b["targets"][sl], b["weights"][sl])["loss_sum"])
    assert abs(float(got["loss_sum"]) - want) < 1e-4 * abs(want)


def test_supernet_training_reduces_the_loss(engine):
    space, mesh, trainer = engine
    src = ArchBatches(_Toy(), space, space.initial_widths(), mode="step", num_devices=8, seed=1)
    ev = FixedArchBatches(_Toy(), space, space.largest(), space.initial_widths())
    state = trainer.init_state()
    before = train_lib.evaluate(trainer, state, ev)["loss"]
    for step in range(100):
        state, _ = trainer.train_step(state, sharding.global_batch(src.batch(step), mesh))
    after = train_lib.evaluate(trainer, state, ev)["loss"]
    assert after < before - 0.2, (before, after)


def candidate_outputs(sn, widths, l, x, mask):
    """Every candidate block of layer ``l`` (families in ``sn.families`` order, then candidates)
    applied to ``x``, each as the only block of its extracted dense model: float64 ``[B, S, H]``."""
    space = sn.space
    amask = attention_mask(jnp.asarray(mask), x.shape[1], space.task == "clm")
    ys = []
    for f in sn.families:
        for c in range(space.candidates):
            layers = [LayerChoice(f, c, space.base_heads, i == l) for i in range(space.layers)]
            dense = extract(sn, widths, Arch(tuple(layers)))
            ys.append(np.asarray(dense.blocks[0](jnp.asarray(x), amask).out, np.float64))
    return ys


def numpy_cka(xs, mask):
    """Linear CKA between every pair of ``[B, S, H]`` arrays over the real tokens, from
    column-centred token matrices: ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``."""
    real = np.asarray(mask) != 0
    cs = [x[real] - x[real].mean(0) for x in xs]
    return np.array([[np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))
                      for b in cs] for a in cs])


def old_cosine(ys, mask):
    """The former block discrimination: mean uncentred cosine between the candidates' outputs."""
    flat = [(y * np.asarray(mask)[..., None]).reshape(-1) for y in ys]
    flat = [v / np.linalg.norm(v) for v in flat]
    cos = np.array([[a @ b for b in flat] for a in flat])
    return (cos.sum() - np.trace(cos)) / (len(flat) * (len(flat) - 1))


def offdiag_mean(m):
    return (m.sum() - np.trace(m)) / (len(m) * (len(m) - 1))


@pytest.mark.fidelity
@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_block_cka_matches_the_extracted_candidates(task):
    """block_cka_matrix[l] == numpy linear CKA between the extracted candidates' contributions
    ``block(x_l) - x_l`` on layer l's input; a candidate sharing another's weights and width has
    CKA exactly 1 with it."""
    space = make_space(task)
    sn = init_supernet(space, seed=8)
    randomize(sn, 8)
    rng = np.random.default_rng(9)
    widths = grown_widths(space, rng)
    bert = sn.blocks["bert"].p  # candidate 1 of every BERT layer: a copy of candidate 0
    for name in list(bert.keys()):
        v = bert[name][...]
        bert[name] = nnx.Param(v.at[:, 1].set(v[:, 0]))
    widths[:, FAMILY_INDEX["bert"], 1] = widths[:, FAMILY_INDEX["bert"], 0]
    ids, mask = batch(rng, task == "clm")
    arch = space.sample(rng)
    out = sn(ids, space.to_arrays(arch, widths), mask)
    got = np.asarray(block_cka_matrix(sn, out.embedding, out.layers.block, widths, mask))
    means = np.asarray(block_cka(sn, out.embedding, out.layers.block, widths, mask))
    n = len(sn.families) * space.candidates
    assert got.shape == (space.layers, n, n) and means.shape == (space.layers,)
    for l in range(space.layers):
        x = np.asarray(out.embedding if l == 0 else out.layers.block[l - 1], np.float64)
        want = numpy_cka([y - x for y in candidate_outputs(sn, widths, l, x, mask)], mask)
        np.testing.assert_allclose(got[l], want, atol=2e-5, err_msg=f"layer {l}")
        assert abs(means[l] - offdiag_mean(want)) < 2e-5
        assert abs(got[l, 0, 1] - 1.0) < 1e-5  # shared weights
        assert offdiag_mean(want) < 0.9  # the other candidates differ: the comparison is not vacuous


@pytest.mark.fidelity
def test_block_cka_ignores_the_shared_residual_input():
    """A large component of the layer input that no MobileBERT candidate reads (its row of
    dense_in / Q / K / V is zero) and that every candidate passes through unchanged (out_norm
    scale 1) is part of every output but of no contribution: block CKA stays the same, while the
    former uncentred cosine between the outputs goes to 1."""
    space = make_space("mlm", families=("mobilebert",))
    sn = init_supernet(space, seed=5)
    randomize(sn, 5)
    k = 3
    p = sn.blocks["mobilebert"].p
    for name in ("dense_in", "attn.query", "attn.key", "attn.value"):
        key = _pkey(name + ".kernel")
        p[key] = nnx.Param(p[key][...].at[0, :, k, :].set(0.0))
    key = _pkey("out_norm.scale")
    p[key] = nnx.Param(p[key][...].at[0, :, k].set(1.0))
    rng = np.random.default_rng(6)
    widths = grown_widths(space, rng)
    ids, mask = batch(rng, False)
    out = sn(ids, space.to_arrays(space.sample(rng), widths), mask)
    emb = np.asarray(out.embedding)
    big = emb.copy()
    big[..., k] += 300.0 * rng.standard_normal(emb.shape[:2])
    base = np.asarray(block_cka_matrix(sn, jnp.asarray(emb), out.layers.block, widths, mask))[0]
    moved = np.asarray(block_cka_matrix(sn, jnp.asarray(big), out.layers.block, widths, mask))[0]
    np.testing.assert_allclose(moved, base, atol=1e-4)
    assert offdiag_mean(base) < 0.9
    cos_base = old_cosine(candidate_outputs(sn, widths, 0, emb, mask), mask)
    cos_moved = old_cosine(candidate_outputs(sn, widths, 0, big, mask), mask)
    assert cos_moved > 0.99 and cos_moved - cos_base > 0.1, (cos_base, cos_moved)
