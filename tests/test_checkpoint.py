"""Checkpointer: sharded round trip, keep-N, save interval, fallback past damaged steps."""

from __future__ import annotations

import glob
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from elm_jax.engine import checkpoint as ckpt_lib
from elm_jax.engine import sharding as shd

# Orbax's async reader leaves an un-awaited coroutine / closed event loop behind when a
# restore of a deliberately damaged step fails; that noise is not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning"),
]


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))


def _state(mesh, scale: float = 1.0):
    """A small train-state-like pytree: an fsdp-sharded matrix, vectors, a typed key."""
    tree = {
        "w": jnp.arange(64.0).reshape(16, 4) * scale,
        "b": jnp.ones(4) * scale,
        "key": jax.random.key(7),
        "step": jnp.int32(3),
    }
    abstract = jax.eval_shape(lambda: tree)
    shardings = shd.state_shardings(abstract, mesh)
    placed = jax.tree.map(jax.device_put, tree, shardings)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return placed, abstract


def test_roundtrip_restores_into_target_shardings(mesh, tmp_path):
    state, abstract = _state(mesh)
    with ckpt_lib.Checkpointer(tmp_path, keep=2, save_every=1) as ck:
        assert ck.save(5, state, {"note": "x", "n": 1})
        ck.wait()
        restored, meta, step = ck.restore_latest(abstract)
    assert step == 5 and meta == {"note": "x", "n": 1}
    assert tuple(restored["w"].sharding.spec) == ("fsdp", None)
    assert restored["w"].sharding == abstract["w"].sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(state["key"]))
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    assert int(restored["step"]) == 3


def test_keep_and_save_interval(mesh, tmp_path):
    state, abstract = _state(mesh)
    with ckpt_lib.Checkpointer(tmp_path, keep=2, save_every=2) as ck:
        assert not ck.save(3, state, {})  # off the interval
        assert ck.save(3, state, {}, force=True)
        for s in (4, 6, 8):
            assert ck.save(s, state, {})
        assert not ck.save(8, state, {}, force=True)  # already there
        ck.wait()
        assert ck.all_steps() == [6, 8]
    with ckpt_lib.Checkpointer(tmp_path / "empty", keep=2, save_every=2) as ck:
        assert ck.restore_latest(abstract) is None


def _corrupt(step_dir: str, how: str) -> None:
    files = [
        f
        for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
        if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f
    ]
    assert files
    for f in files:
        if how == "delete":
            os.remove(f)
        elif how == "garbage":
            with open(f, "wb") as fh:
                fh.write(b"\x00garbage" * 7)
        else:  # truncate
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)


@pytest.mark.parametrize("how", ["delete", "garbage", "truncate"])
def test_damaged_latest_falls_back_with_warning(mesh, tmp_path, caplog, how):
    good, abstract = _state(mesh, 1.0)
    newer, _ = _state(mesh, 2.0)
    ck = ckpt_lib.Checkpointer(tmp_path, keep=3, save_every=1)
    ck.save(10, good, {"step": 10})
    ck.save(20, newer, {"step": 20})
    ck.wait()
    _corrupt(os.path.join(tmp_path, "20"), how)
    with caplog.at_level(logging.WARNING, logger="elm_jax.checkpoint"):
        restored, meta, step = ck.restore_latest(abstract)
    assert step == 10 and meta["step"] == 10
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(good["w"]))
    assert any("step 20" in r.getMessage() for r in caplog.records)
    assert ck.all_steps() == [10]  # the bad step is gone, so it can be saved again
    assert ck.save(20, newer, {"step": 20})
    ck.close()


def test_nonfinite_checkpoint_is_skipped(mesh, tmp_path, caplog):
    good, abstract = _state(mesh, 1.0)
    bad, _ = _state(mesh, float("nan"))
    with ckpt_lib.Checkpointer(tmp_path, keep=3, save_every=1) as ck:
        ck.save(1, good, {})
        ck.save(2, bad, {})
        ck.wait()
        with caplog.at_level(logging.WARNING, logger="elm_jax.checkpoint"):
            _, _, step = ck.restore_latest(abstract)
    assert step == 1
    assert any("step 2" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)
