"""Thin orbax wrapper: periodic (async) saves, keep-N, restore the latest VALID step.

Layout: ``<directory>/<step>/{state,meta}``; ``state`` is the train-state pytree
(orbax ``StandardSave``: every process writes its own shards, collectively), ``meta``
a small JSON dict (e.g. the config, counters the host keeps). Orbax writes a step to
a temporary directory and renames it when complete, so a process killed mid-save
leaves no half-written step behind. What orbax cannot know is a step damaged *after*
it was committed (a deleted or overwritten file, a truncated copy, a flipped bit);
``save`` therefore stores a content checksum of every array in ``meta`` and
``restore_latest`` tries the steps newest first, checks that each restores, matches
its checksums and is finite (we never save a non-finite state), warns naming each
bad step and falls back to the previous one.

Typed PRNG key arrays (``jax.random.key``, e.g. in an NNX ``RngKey`` variable) are
stored as their raw ``uint32`` key data and re-wrapped on restore.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)


def is_prng_key(x: Any) -> bool:
    """True for typed PRNG key arrays (and their ShapeDtypeStructs)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
    """Typed PRNG key leaves -> their uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def _abstract_keys_to_data(abstract: Any) -> Any:
    """Same as ``keys_to_data`` for ``ShapeDtypeStruct`` leaves (keeps shardings)."""

    def one(x: Any) -> Any:
        if not is_prng_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(data.shape) - len(sharding.spec))
            sharding = NamedSharding(sharding.mesh, P(*spec))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

    return jax.tree.map(one, abstract)


def _data_to_keys(tree: Any, abstract: Any) -> Any:
    """Re-wraps key data into typed keys where ``abstract`` has a key dtype."""

    def one(x: Any, a: Any) -> Any:
        if is_prng_key(a):
            # KeyTy._impl is the PRNG implementation the key type was made with.
            return jax.random.wrap_key_data(x, impl=a.dtype._impl)  # pylint: disable=protected-access
        return x

    return jax.tree.map(one, tree, abstract)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def tree_all_finite(tree: Any) -> bool:
    """True when every float leaf of ``tree`` is finite (one host sync)."""
    return bool(_all_finite(keys_to_data(tree)))


_CHECKSUM_KEY = "_checksums"


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``uint32 [2]``: the sum of the leaf's bit patterns and their position-weighted sum,
    both mod 2**32. Integer sums do not depend on the reduction order, so the value is the
    same for any sharding or device count; any single flipped bit changes the first."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        size = jnp.dtype(x.dtype).itemsize
        if size == 8:  # x64 only: two uint32 words per element
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32).sum(axis=-1, dtype=jnp.uint32)
        else:
            word = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
            bits = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    # Position weights 2*i + 1 (i = flat index) from broadcasted iotas: no reshape, so a
    # sharded leaf stays sharded.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
        stride *= bits.shape[d]
    weights = index * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


def tree_checksums(tree: Any) -> list[list[int]]:
    """One ``[sum, weighted sum]`` pair per leaf of ``tree`` (typed PRNG keys as key data),
    computed on device; the host gets ``2 x leaves`` integers."""
    leaves = jax.tree.leaves(keys_to_data(tree))
    if not leaves:
        return []
    out_sharding = None
    first = getattr(leaves[0], "sharding", None)
    if isinstance(first, NamedSharding):
        out_sharding = NamedSharding(first.mesh, P())
    fn = jax.jit(lambda xs: jnp.stack([_leaf_checksum(x) for x in xs]), out_shardings=out_sharding)
    return [[int(a), int(b)] for a, b in jax.device_get(fn(leaves))]


class Checkpointer:
    """Periodic checkpoints of one training run.

    Args:
      directory: where the step directories live (created if missing).
      keep: how many most recent steps to keep (>= 2 so that a damaged newest step
        still leaves one to fall back to).
      save_every: ``save(step, ...)`` writes only when ``step % save_every == 0``
        (or ``force=True``).
      async_save: write in a background thread; training continues while the
        arrays (already copied off the device buffers) are written.
    """

    def __init__(self, directory: str | os.PathLike, keep: int, save_every: int, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        self.save_every = max(int(save_every), 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep if self.keep > 0 else None,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """The committed steps on disk, ascending."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(
        self, step: int, state_pytree: Any, meta: dict[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Starts saving ``state_pytree`` (and the JSON-able ``meta``) as ``step``.

        Returns whether a save was started: not when ``step`` is off the save interval
        (unless ``force``) or already on disk. Collective: every process must call it
        with the same step.
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            return False
        meta = dict(meta or {})
        meta[_CHECKSUM_KEY] = tree_checksums(state_pytree)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(keys_to_data(state_pytree)),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._mngr.save(step, args=args, force=True))

    def _restore_raw(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        target = _abstract_keys_to_data(abstract_state)
        out = self._mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        )
        return _data_to_keys(out.state, abstract_state), dict(out.meta or {})

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """``step`` restored into ``abstract_state``'s layout, unchecked; meta as saved."""
        state, meta = self._restore_raw(step, abstract_state)
        meta.pop(_CHECKSUM_KEY, None)
        return state, meta

    def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Like ``_restore_step``, but raises ValueError when the restored arrays differ from
        what was saved (content checksums in the meta; steps saved without them are not
        checked) or hold non-finite floats."""
        state, meta = self._restore_raw(step, abstract_state)
        want = meta.pop(_CHECKSUM_KEY, None)
        if want is not None:
            got = tree_checksums(state)
            if len(got) != len(want):
                raise ValueError(f"the checkpoint has {len(got)} arrays but {len(want)} checksums")
            bad = [i for i, (g, w) in enumerate(zip(got, want)) if list(g) != list(w)]
            if bad:
                raise ValueError(f"content checksum mismatch in {len(bad)} of {len(got)} arrays "
                                 f"(first: array #{bad[0]}): its files changed after they were saved")
        if not tree_all_finite(state):
            raise ValueError("restored state has non-finite values")
        return state, meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of the committed ``step``, restored into ``abstract_state``'s layout
        and verified like :meth:`restore_latest` (checksums, finite) but with no fallback:
        raises FileNotFoundError when ``step`` is not on disk, ValueError when it is damaged."""
        self.wait()
        step = int(step)
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}")
        return self._restore_verified(step, abstract_state)

    def delete(self, step: int) -> None:
        """Removes the committed ``step`` (collective: every process calls it)."""
        self.wait()
        self._mngr.delete(int(step))

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any], int] | None:
        """Restores the newest readable, finite checkpoint into ``abstract_state``'s layout.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` whose ``sharding``
        fields say where each restored array goes (restored straight into those
        shardings, no host copy of the whole state). Damaged newer steps are reported
        with a warning naming them and deleted (so the resumed run can save those steps
        again). Returns ``(state, meta, step)`` or ``None`` when no step is usable.
        """
        self.wait()
        bad: list[int] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self._restore_verified(step, abstract_state)
            except Exception as exc:  # pylint: disable=broad-except
                log.warning(
                    "checkpoint step %d in %s is unusable (%s: %s); falling back to the previous checkpoint",
                    step,
                    self.directory,
                    type(exc).__name__,
                    str(exc)[:300],
                )
                bad.append(step)
                continue
            for b in bad:
                self._delete(b)
            return state, meta, step
        if bad:
            log.warning(
                "no usable checkpoint in %s (bad steps: %s); starting from scratch", self.directory, bad
            )
            for b in bad:
                self._delete(b)
        return None

    def _delete(self, step: int) -> None:
        try:
            self._mngr.delete(step)
            log.warning("deleted unusable checkpoint step %d in %s", step, self.directory)
        except Exception as exc:  # pylint: disable=broad-except
            log.warning("could not delete unusable checkpoint step %d: %s", step, exc)

    def wait(self) -> None:
        """Blocks until pending async saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
