"""Properties of the search space, architectures and exact accounting (elm_jax.arch)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import base_config
from elm_jax import arch as A
from elm_jax.arch import Arch, ArchArrays, ArchError, LayerChoice
from elm_jax.models.dense import BlockSpec, DenseLM
from elm_jax.models.dense import count_params as dense_count_params
from elm_jax.accounting import block_params, count_flops, count_params
from elm_jax.models.dense import dense_config
from elm_jax.space import SearchSpace

# Three small spaces: both families with elastic depth and segments (MLM), a CLM space
# without elastic depth, and a single-family space with a restricted head menu.
MLM = SearchSpace(
    layers=4, hidden=32, inner=8, embed_size=8, candidates=3, f0=8,
    max_ffn={"bert": 64, "mobilebert": 20}, base_heads=4,
    families=("bert", "mobilebert"), elastic_depth=True, min_layers=2,
    vocab_size=50, max_len=16, task="mlm", type_vocab_size=2,
)
CLM = SearchSpace(
    layers=3, hidden=24, inner=12, embed_size=6, candidates=2, f0=12,
    max_ffn={"bert": 48, "mobilebert": 36}, base_heads=2,
    families=("mobilebert", "bert"), elastic_depth=False, min_layers=1,
    vocab_size=40, max_len=12, task="clm",
)
BERT_ONLY = SearchSpace(
    layers=5, hidden=16, inner=8, embed_size=4, candidates=4, f0=4,
    max_ffn={"bert": 30}, base_heads=4, head_choices=(4, 1),
    families=("bert",), elastic_depth=True, min_layers=1,
    vocab_size=30, max_len=10, task="mlm",
)
SPACES = {"mlm": MLM, "clm": CLM, "bert_only": BERT_ONLY}


def grown_widths(space: SearchSpace, rng: np.random.Generator) -> np.ndarray:
    """A random widths state the dynamic dimension module could reach: each candidate
    widened by a random number of f0 steps from its initial width, never past its cap."""
    w = space.initial_widths().astype(np.int64)
    steps = rng.integers(0, 4, size=w.shape)
    caps = np.array([space.max_ffn_of(f) for f in A.SEARCH_FAMILIES])[None, :, None]
    return np.minimum(w + space.f0 * steps, caps).astype(np.int32)


def genes(a: Arch) -> list[tuple]:
    return [(lc.family, lc.candidate, lc.heads, lc.active) for lc in a.layers]


# ----------------------------------------------------------------------------------
# Arch: JSON and id
# ----------------------------------------------------------------------------------

FIXED = Arch((LayerChoice("bert", 2, 4, True), LayerChoice("mobilebert", 0, 1, False)))
FIXED_JSON = ('{"layers":[{"active":true,"candidate":2,"family":"bert","heads":4},'
              '{"active":false,"candidate":0,"family":"mobilebert","heads":1}]}')


def test_json_round_trip_and_stable_id():
    assert FIXED.to_json() == FIXED_JSON
    assert FIXED.arch_id == hashlib.sha256(FIXED_JSON.encode()).hexdigest()[:16]
    assert len(FIXED.arch_id) == 16
    assert Arch.from_json(FIXED.to_json()) == FIXED
    assert Arch.from_dict(FIXED.to_dict()) == FIXED
    # Equal archs (also built from numpy scalars and dicts) have equal ids.
    same = Arch(({"family": "bert", "candidate": np.int64(2), "heads": np.int32(4),
                  "active": np.bool_(True)},
                 LayerChoice("mobilebert", 0, 1, False)))
    assert same == FIXED and same.arch_id == FIXED.arch_id and same.to_json() == FIXED_JSON
    # Any changed gene changes the id.
    ids = {FIXED.arch_id}
    for field, value in [("family", "mobilebert"), ("candidate", 1), ("heads", 2),
                         ("active", False)]:
        changed = Arch((dataclasses.replace(FIXED.layers[0], **{field: value}),
                        FIXED.layers[1]))
        ids.add(changed.arch_id)
    assert len(ids) == 5
    rng = np.random.default_rng(0)
    archs = {MLM.sample(rng) for _ in range(200)}
    assert len({a.arch_id for a in archs}) == len(archs)


def test_canonical_merges_inactive_genes():
    a = Arch((LayerChoice("bert", 1, 2), LayerChoice("bert", 2, 4),
              LayerChoice("mobilebert", 2, 4, False), LayerChoice("bert", 0, 1, False)))
    b = Arch(a.layers[:2] + (LayerChoice("bert", 0, 2, False),
                             LayerChoice("mobilebert", 1, 4, False)))
    assert a.arch_id != b.arch_id
    assert MLM.canonical(a) == MLM.canonical(b)
    w = MLM.initial_widths()
    assert dense_config(MLM, a, w) == dense_config(MLM, MLM.canonical(a), w)


# ----------------------------------------------------------------------------------
# Sampling, mutation, crossover
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPACES))
def test_operators_always_valid(name):
    space = SPACES[name]
    rng = np.random.default_rng(1)
    pop = [space.sample(rng) for _ in range(20)]
    for _ in range(500):
        a = space.sample(rng)
        space.validate(a)
        m = space.mutate(a, float(rng.random()), rng)
        space.validate(m)
        c = space.crossover(pop[int(rng.integers(len(pop)))], m, rng)
        space.validate(c)
        pop[int(rng.integers(len(pop)))] = c
        if not space.elastic_depth:
            assert all(lc.active for lc in (*a.layers, *m.layers, *c.layers))


def test_mutate_p0_same_and_p1_changes_every_gene():
    rng = np.random.default_rng(2)
    for space in SPACES.values():
        for _ in range(100):
            a = space.sample(rng)
            assert space.mutate(a, 0.0, rng) == a
            m = space.mutate(a, 1.0, rng)
            for x, y in zip(a.layers, m.layers):
                assert (x.family != y.family) == (len(space.families) > 1)
                assert x.candidate != y.candidate
                assert x.heads != y.heads
                if not space.elastic_depth:
                    assert y.active
            if space.elastic_depth:
                flipped = sum(x.active != y.active for x, y in zip(a.layers, m.layers))
                # Every bit flips, except those the repair switched back on.
                assert flipped >= space.layers - space.min_layers
    with pytest.raises(ArchError, match="p="):
        MLM.mutate(MLM.sample(rng), 1.5, rng)


def test_mutate_rate_matches_p():
    rng = np.random.default_rng(3)
    space = dataclasses.replace(MLM, elastic_depth=False, min_layers=1)
    changed = total = 0
    for _ in range(1000):
        a = space.sample(rng)
        m = space.mutate(a, 0.3, rng)
        for x, y in zip(a.layers, m.layers):
            changed += (x.family != y.family) + (x.candidate != y.candidate) + (x.heads != y.heads)
            total += 3
    assert abs(changed / total - 0.3) < 0.02


def test_crossover_genes_come_from_parents():
    rng = np.random.default_rng(4)
    for space in SPACES.values():
        from_a = 0
        for _ in range(300):
            a, b = space.sample(rng), space.sample(rng)
            c = space.crossover(a, b, rng)
            repaired = False
            for x, y, z in zip(a.layers, b.layers, c.layers):
                if z in (x, y):
                    from_a += z == x
                    continue
                # Only the repair may differ from both parents: it switches a layer on.
                z_off = dataclasses.replace(z, active=False)
                assert z.active and z_off in (x, y)
                repaired = True
            if repaired:
                assert c.num_active == space.min_layers
        assert 0.4 < from_a / (300 * space.layers) < 0.8  # about half (ties count for a)


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_bound(k: int) -> float:
    """A loose upper bound (mean + 6 sd) of a chi-square with k - 1 degrees of freedom."""
    return (k - 1) + 6 * math.sqrt(2 * (k - 1))


@pytest.mark.parametrize("name", ["mlm", "bert_only"])
def test_sampling_is_uniform(name):
    space = SPACES[name]
    rng = np.random.default_rng(5)
    archs = [space.sample(rng) for _ in range(4000)]
    for l in range(space.layers):
        for values, gene in [(space.families, "family"), (range(space.candidates), "candidate"),
                             (space.head_choices, "heads")]:
            values = list(values)
            counts = np.zeros(len(values))
            for a in archs:
                counts[values.index(getattr(a.layers[l], gene))] += 1
            assert counts.min() > 0, (gene, l)
            if len(values) > 1:
                assert chi_square(counts) < chi_square_bound(len(values)), (gene, l, counts)
    # The active mask is uniform over the masks with >= min_layers active layers.
    valid = [m for m in itertools.product([False, True], repeat=space.layers)
             if sum(m) >= space.min_layers]
    counts = np.zeros(len(valid))
    for a in archs:
        counts[valid.index(tuple(lc.active for lc in a.layers))] += 1
    assert counts.min() > 0
    assert chi_square(counts) < chi_square_bound(len(valid))


# ----------------------------------------------------------------------------------
# Widths
# ----------------------------------------------------------------------------------

def test_initial_widths_formula_and_caps():
    w = MLM.initial_widths()
    assert w.shape == (4, 2, 3) and w.dtype == np.int32
    np.testing.assert_array_equal(w[:, 0], np.tile([8, 16, 24], (4, 1)))   # bert cap 64
    np.testing.assert_array_equal(w[:, 1], np.tile([8, 16, 20], (4, 1)))   # mobilebert cap 20
    # A family off the menu still gets entries (default cap f0 * T).
    wb = BERT_ONLY.initial_widths()
    assert wb.shape == (5, 2, 4)
    np.testing.assert_array_equal(wb[0, 0], [4, 8, 12, 16])
    np.testing.assert_array_equal(wb[0, 1], [4, 8, 12, 16])
    assert BERT_ONLY.max_ffn_of("mobilebert") == 16 and BERT_ONLY.max_ffn_of("bert") == 30
    # Paper settings: F in {132, ..., 792}.
    paper = SearchSpace.from_config(base_config("mlm", "paper").space, vocab_size=30522,
                                    max_len=128, task="mlm")
    np.testing.assert_array_equal(paper.initial_widths()[0, 0], 132 * np.arange(1, 7))
    for space in (MLM, CLM, BERT_ONLY, paper):
        space.validate_widths(space.initial_widths())
        space.validate_widths(space.max_widths())
        space.validate_widths(grown_widths(space, np.random.default_rng(0)))


def test_validate_widths_errors():
    w = MLM.initial_widths()
    cases = [(w[:2], "shape"), (w.astype(np.float32), "integers")]
    bad = w.copy(); bad[1, 0, 2] = 0
    cases.append((bad, r"layer 1, bert, candidate 2\] = 0 must be positive"))
    bad = w.copy(); bad[2, 1, 0] = 24
    cases.append((bad, r"layer 2, mobilebert, candidate 0\] = 24 exceeds"))
    bad = w.copy(); bad[3, 0, 1] = 12
    cases.append((bad, r"layer 3, bert, candidate 1\] = 12 is neither a multiple of f0=8"))
    for widths, msg in cases:
        with pytest.raises(ArchError, match=msg):
            MLM.validate_widths(widths)
    ok = w.copy(); ok[0, 1, 2] = 20  # the cap, not a multiple of f0: allowed
    MLM.validate_widths(ok)


# ----------------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------------

def test_to_arrays_shapes_and_values():
    rng = np.random.default_rng(6)
    w = grown_widths(MLM, rng)
    a = Arch((LayerChoice("bert", 2, 4), LayerChoice("mobilebert", 1, 1, False),
              LayerChoice("mobilebert", 0, 2), LayerChoice("bert", 0, 1)))
    arr = MLM.to_arrays(a, w)
    np.testing.assert_array_equal(arr.family, [0, 1, 1, 0])
    np.testing.assert_array_equal(arr.candidate, [2, 1, 0, 0])
    np.testing.assert_array_equal(arr.width, [w[0, 0, 2], w[1, 1, 1], w[2, 1, 0], w[3, 0, 0]])
    np.testing.assert_array_equal(arr.heads, [4, 1, 2, 1])
    np.testing.assert_array_equal(arr.active, [True, False, True, True])
    for x in (arr.family, arr.candidate, arr.width, arr.heads):
        assert x.dtype == np.int32 and x.shape == (4,)
    assert arr.active.dtype == bool
    assert MLM.from_arrays(arr) == a
    # Shapes depend on the space only; stacking adds a population axis.
    archs = [MLM.sample(rng) for _ in range(5)]
    arrays = [MLM.to_arrays(x, w) for x in archs]
    assert {jax.tree.map(np.shape, x) == jax.tree.map(np.shape, arr) for x in arrays} == {True}
    st = A.stack_arrays(arrays)
    assert jax.tree.map(np.shape, st) == ArchArrays(*[(5, 4)] * 5)
    assert isinstance(st.family, np.ndarray)
    for p, x in enumerate(archs):
        assert MLM.from_arrays(jax.tree.map(lambda y: y[p], st)) == x
    # A pytree: jax arrays stack too, and ArchArrays passes through jit.
    st_j = A.stack_arrays([jax.tree.map(jnp.asarray, x) for x in arrays])
    assert isinstance(st_j.width, jax.Array)
    total = jax.jit(lambda x: jnp.sum(x.width * x.active))(st_j)
    assert int(total) == int(np.sum(st.width * st.active))


# ----------------------------------------------------------------------------------
# Invalid spaces and archs
# ----------------------------------------------------------------------------------

def space_kwargs(**kw) -> dict:
    base = {f.name: getattr(MLM, f.name) for f in dataclasses.fields(MLM)}
    base["max_ffn"] = dict(MLM.max_ffn)
    base.update(kw)
    return base


SPACE_CASES = [
    (dict(hidden=30), "hidden=30 is not divisible by space.base_heads=4"),
    (dict(inner=6), "inner=6 is not divisible by space.base_heads=4"),
    (dict(head_choices=(1, 3)), "head_choices: 3 does not divide base_heads=4"),
    (dict(head_choices=(2, 2)), "head_choices lists a head count twice"),
    (dict(f0=0), "f0"),
    (dict(candidates=0), "candidates"),
    (dict(max_ffn={"bert": 64, "mobilebert": 4}), "max_ffn.mobilebert=4 is below f0=8"),
    (dict(max_ffn={"bert": 64}), "no cap for family 'mobilebert'"),
    (dict(max_ffn={"bert": 64, "mobilebert": 20, "gpt2": 64}), "max_ffn: unknown family 'gpt2'"),
    (dict(min_layers=0), "min_layers=0"),
    (dict(min_layers=5), "min_layers=5"),
    (dict(families=()), "families is empty"),
    (dict(families=("bert", "gpt2")), "unknown family 'gpt2'"),
    (dict(families=("bert", "bert")), "twice"),
    (dict(task="seq2seq"), "space.task"),
    (dict(layers=0), "space.layers"),
    (dict(type_vocab_size=-1), "type_vocab_size"),
    (dict(layers=2.5), "space.layers must be an integer"),
]


@pytest.mark.parametrize("kw,msg", SPACE_CASES)
def test_invalid_space(kw, msg):
    with pytest.raises(ArchError, match=msg):
        SearchSpace(**space_kwargs(**kw))


def _mlm_arch(*changes: tuple[int, dict]) -> Arch:
    layers = [LayerChoice("bert", 0, 4), LayerChoice("mobilebert", 1, 2),
              LayerChoice("bert", 2, 1), LayerChoice("mobilebert", 0, 4)]
    for l, ch in changes:
        layers[l] = dataclasses.replace(layers[l], **ch)
    return Arch(tuple(layers))


ARCH_CASES = [
    (MLM, Arch(_mlm_arch().layers[:3]), "arch has 3 layers, the space has 4"),
    (MLM, _mlm_arch((2, dict(family="gpt2"))), "layer 2: family 'gpt2' is not on the menu"),
    (BERT_ONLY, Arch((LayerChoice("mobilebert", 0, 4),) + (LayerChoice("bert", 0, 4),) * 4),
     "layer 0: family 'mobilebert' is not on the menu"),
    (MLM, _mlm_arch((1, dict(candidate=3))), r"layer 1: candidate 3 out of range \[0, 3\)"),
    (MLM, _mlm_arch((3, dict(candidate=-1))), "layer 3: candidate -1 out of range"),
    (MLM, _mlm_arch((0, dict(heads=3))), r"layer 0: heads 3 not in head_choices \(1, 2, 4\)"),
    (BERT_ONLY, Arch((LayerChoice("bert", 0, 4),) * 4 + (LayerChoice("bert", 0, 2),)),
     "layer 4: heads 2 not in head_choices"),
    (MLM, _mlm_arch((0, dict(active=False)), (1, dict(active=False)), (2, dict(active=False))),
     "1 active layers, fewer than min_layers=2"),
    (CLM, Arch((LayerChoice("bert", 0, 2), LayerChoice("bert", 0, 2, False),
                LayerChoice("bert", 0, 2))), "layer 1: inactive, but .*elastic_depth=False"),
]


@pytest.mark.parametrize("space,arch,msg", ARCH_CASES)
def test_invalid_arch(space, arch, msg):
    with pytest.raises(ArchError, match=msg):
        space.validate(arch)
    for fn in (lambda: space.to_arrays(arch, space.initial_widths()),
               lambda: count_params(space, arch, space.initial_widths()),
               lambda: dense_config(space, arch, space.initial_widths())):
        with pytest.raises(ArchError, match=msg):
            fn()


@pytest.mark.parametrize("make,msg", [
    (lambda: LayerChoice("bert", 1.0, 4), "candidate must be an integer"),
    (lambda: LayerChoice("bert", True, 4), "candidate must be an integer"),
    (lambda: LayerChoice("bert", 0, "4"), "heads must be an integer"),
    (lambda: LayerChoice("bert", 0, 4, 1), "active must be a bool"),
    (lambda: Arch.from_json("{"), "not a valid Arch JSON"),
    (lambda: Arch.from_json('{"layers":[],"x":1}'), "exactly one key 'layers'"),
    (lambda: Arch.from_json('{"layers":[{"family":"bert","candidate":0,"heads":4}]}'),
     "exactly the keys"),
])
def test_invalid_arch_json(make, msg):
    with pytest.raises(ArchError, match=msg):
        make()


# ----------------------------------------------------------------------------------
# Extraction config and exact accounting
# ----------------------------------------------------------------------------------

def test_dense_config_fields():
    w = grown_widths(MLM, np.random.default_rng(7))
    a = _mlm_arch((1, dict(active=False)))
    cfg = dense_config(MLM, a, w)
    assert cfg.blocks == (BlockSpec("bert", int(w[0, 0, 0]), 4),
                          BlockSpec("bert", int(w[2, 0, 2]), 1),
                          BlockSpec("mobilebert", int(w[3, 1, 0]), 4))
    sizes = (cfg.hidden, cfg.inner, cfg.embed_size, cfg.vocab_size, cfg.max_len)
    assert sizes == (32, 8, 8, 50, 16)
    assert cfg.embedding == "factorized" and cfg.type_vocab_size == 2
    assert cfg.head == "mlm" and not cfg.causal and not cfg.final_norm
    c2 = dense_config(CLM, CLM.sample(np.random.default_rng(0)), CLM.initial_widths(), dropout=0.1)
    assert c2.head == "clm" and c2.causal and c2.dropout == 0.1 and c2.type_vocab_size == 0
    with pytest.raises(ArchError, match="cannot override"):
        dense_config(MLM, a, w, final_norm=True)


@pytest.mark.parametrize("name,tv,n", [("mlm", 2, 50), ("clm", 0, 50), ("bert_only", 0, 30),
                                       ("mlm", 0, 10), ("clm", 3, 10)])
def test_count_params_equals_dense_tree(name, tv, n):
    """The closed form equals the size of the extracted model's (abstract) parameter tree,
    for random archs under initial and grown widths, and for the extremes."""
    space = dataclasses.replace(SPACES[name], type_vocab_size=tv)
    rng = np.random.default_rng(8)
    archs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n - 2)]
    for i, a in enumerate(archs):
        w = space.initial_widths() if i % 3 == 0 else grown_widths(space, rng)
        assert count_params(space, a, w) == dense_count_params(dense_config(space, a, w)), a


def test_flops_hand_count_all_bert():
    """All-BERT MLM arch, every layer active: S=10, H=32, E=8, V=50, F = 24, 16, 8, 64."""
    w = MLM.initial_widths()
    w[3, 0, 1] = 64  # a grown candidate (the bert cap)
    a = Arch((LayerChoice("bert", 2, 4), LayerChoice("bert", 1, 2),
              LayerChoice("bert", 0, 1), LayerChoice("bert", 1, 4)))
    S, H, E, V = 10, 32, 8, 50
    embed = 2 * S * (3 * E) * H                          # proj 3E -> H
    total = embed
    for F in (24, 16, 8, 64):
        qkv = 3 * 2 * S * H * H
        out = 2 * S * H * H
        scores = 2 * S * S * H                           # sum over heads of S*S*d
        context = 2 * S * S * H
        ffn = 2 * S * H * F + 2 * S * F * H
        total += qkv + out + scores + context + ffn
    head = 2 * S * H * H + 2 * S * H * E + 2 * S * E * V  # transform, proj, vocab
    total += head
    assert count_flops(MLM, a, w, S) == total
    # Heads do not change the FLOPs.
    a4 = Arch(tuple(dataclasses.replace(lc, heads=4) for lc in a.layers))
    assert count_flops(MLM, a4, w, S) == total


def test_flops_hand_count_mixed_with_skip():
    """CLM-like mixed arch with a skipped middle layer: S=7, H=24, I=12, E=6, V=40."""
    space = dataclasses.replace(CLM, elastic_depth=True)
    w = space.initial_widths()   # bert [12, 24], mobilebert [12, 24]
    a = Arch((LayerChoice("mobilebert", 1, 2), LayerChoice("bert", 1, 2, False),
              LayerChoice("bert", 0, 1)))
    S, H, I, E, V = 7, 24, 12, 6, 40
    embed = 2 * S * 3 * E * H
    mb_F = 24
    mobile = (2 * S * H * I              # dense_in
              + 3 * 2 * S * H * I        # Q, K, V from the H-wide input
              + 2 * S * I * I            # output I -> I
              + 2 * S * S * I            # scores
              + 2 * S * S * I            # context
              + 2 * S * I * mb_F + 2 * S * mb_F * I   # FFN
              + 2 * S * I * H)           # dense_out
    bert_F = 12
    bert = 4 * 2 * S * H * H + 2 * 2 * S * S * H + 2 * 2 * S * H * bert_F
    head = 2 * S * H * E + 2 * S * E * V  # CLM: proj H -> E, vocab
    assert count_flops(space, a, w, S) == embed + mobile + bert + head
    with pytest.raises(ArchError, match="seq_len"):
        count_flops(space, a, w, space.max_len + 1)


def _jaxpr_matmul_flops(jaxpr) -> int:
    """2 x multiply-accumulates of every dot_general in a jaxpr (recursing into calls)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            free_r = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
            total += 2 * int(np.prod(lhs)) * int(np.prod(free_r))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _jaxpr_matmul_flops(inner)
    return total


@pytest.mark.parametrize("name", ["mlm", "clm"])
def test_flops_match_traced_model(name):
    """count_flops equals the matmul FLOPs of the extracted model's traced forward."""
    space = dataclasses.replace(SPACES[name], elastic_depth=True, min_layers=1)
    rng = np.random.default_rng(9)
    for _ in range(2):
        a, w, seq = space.sample(rng), grown_widths(space, rng), int(rng.integers(3, 9))
        model = nnx.eval_shape(lambda: DenseLM(dense_config(space, a, w), rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        fwd = lambda st, ids: nnx.merge(graphdef, st)(ids).logits
        jaxpr = jax.make_jaxpr(fwd)(state, jax.ShapeDtypeStruct((1, seq), jnp.int32))
        assert count_flops(space, a, w, seq) == _jaxpr_matmul_flops(jaxpr.jaxpr), a


# ----------------------------------------------------------------------------------
# Largest / smallest
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SPACES))
def test_largest_and_smallest_are_extremes(name):
    space = SPACES[name]
    rng = np.random.default_rng(10)
    archs = [space.sample(rng) for _ in range(2000)]
    for widths, lg, sm in [
        (space.max_widths(), space.largest(), space.smallest()),
        (space.initial_widths(), space.largest(space.initial_widths()),
         space.smallest(space.initial_widths())),
        (w := grown_widths(space, rng), space.largest(w), space.smallest(w)),
    ]:
        counts = [count_params(space, a, widths) for a in archs]
        assert count_params(space, lg, widths) >= max(counts)
        assert count_params(space, sm, widths) <= min(counts)
    # The definition with widths at the caps: all active, last candidate, max heads, the
    # family with the most params at max width; smallest: first min_layers layers.
    lg, sm = space.largest(), space.smallest()
    big = max(space.families, key=lambda f: block_params(space, f, space.max_ffn_of(f)))
    small = min(space.families, key=lambda f: block_params(space, f, space.max_ffn_of(f)))
    assert all(lc == LayerChoice(big, space.candidates - 1, max(space.head_choices), True)
               for lc in lg.layers)
    n_on = space.min_layers if space.elastic_depth else space.layers
    assert [lc.active for lc in sm.layers] == [l < n_on for l in range(space.layers)]
    assert all((lc.family, lc.candidate, lc.heads) == (small, 0, min(space.head_choices))
               for lc in sm.layers)


def test_largest_family_is_computed():
    """With a huge MobileBERT cap, MobileBERT blocks are the larger ones."""
    space = SearchSpace(**space_kwargs(max_ffn={"bert": 16, "mobilebert": 4000}))
    assert block_params(space, "mobilebert", 4000) > block_params(space, "bert", 16)
    assert {lc.family for lc in space.largest().layers} == {"mobilebert"}
    assert {lc.family for lc in space.smallest().layers} == {"bert"}


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["mlm", "clm"])
@pytest.mark.parametrize("variant", ["demo", "test", "paper"])
def test_from_config(task, variant):
    cfg = base_config(task, variant)
    space = SearchSpace.from_config(cfg.space, vocab_size=100, max_len=cfg.data.seq_len,
                                    task=task)
    assert space.layers == cfg.space.layers and space.task == task
    assert space.max_ffn_of("bert") == cfg.space.max_ffn.bert
    assert space.head_choices == tuple(d for d in range(1, cfg.space.base_heads + 1)
                                       if cfg.space.base_heads % d == 0)
    assert hash(space) == hash(dataclasses.replace(space))
    a = space.sample(np.random.default_rng(0))
    assert count_params(space, a, space.initial_widths()) > 0
    seg = SearchSpace.from_config(cfg.space, vocab_size=100, max_len=8, task=task,
                                  type_vocab_size=2)
    assert seg.type_vocab_size == 2


def test_head_choices_from_the_config_restrict_sampling():
    """``space.head_choices=(4,)`` in the config (the paper's fixed heads): every sampled, mutated
    and largest / smallest architecture has 4 heads per layer."""
    cfg = base_config("mlm", "demo")
    assert cfg.space.head_choices == ()  # declared, so --config.space.head_choices=(4,) overrides it
    cfg.space.head_choices = (4,)
    space = SearchSpace.from_config(cfg.space, vocab_size=100, max_len=cfg.data.seq_len, task="mlm")
    assert space.head_choices == (4,)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(50)] + [space.largest(), space.smallest()]
    assert {lc.heads for a in archs for lc in a.layers} == {4}


def test_from_config_missing_key():
    d = base_config("mlm", "test").space.to_dict()
    del d["f0"]
    with pytest.raises(ArchError, match="lacks the required key 'f0'"):
        SearchSpace.from_config(d, vocab_size=100, max_len=8, task="mlm")
