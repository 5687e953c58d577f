"""A tiny LM, synthetic sources and configs for the training-engine tests.

Also the worker script of ``test_multihost.py``: run as
``python tests/toy_train.py --process_id I --num_processes N --port P --workdir W``
it joins a ``jax.distributed`` job on 127.0.0.1 and trains the toy model with
:func:`elm_jax.train.fit` on the global mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

import numpy as np

VOCAB = 32
SEQ = 8
BATCH = 16


class ToySource:
    """Synthetic next-token data, a pure function of ``(seed, step)``.

    Targets are ``(3 * inputs + 1) % VOCAB``, so the task is learnable by an
    embedding + MLP. ``nan_steps``: steps whose weights are NaN (to inject a NaN loss).
    ``fail_at``: raise (simulated crash) when batch ``fail_at`` is requested.
    ``sigterm_at``: send SIGTERM to this process when batch ``sigterm_at`` is requested.
    """

    def __init__(
        self,
        seed: int = 0,
        batch: int = BATCH,
        nan_steps: tuple[int, ...] = (),
        fail_at: int | None = None,
        sigterm_at: int | None = None,
    ):
        self.seed, self.batch_size = seed, batch
        self.nan_steps = set(nan_steps)
        self.fail_at, self.sigterm_at = fail_at, sigterm_at

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        inputs = rng.integers(0, VOCAB, (self.batch_size, SEQ)).astype(np.int32)
        targets = ((3 * inputs + 1) % VOCAB).astype(np.int32)
        weights = np.ones((self.batch_size, SEQ), np.float32)
        weights[:, -1] = 0.0  # some padding
        if step in self.nan_steps:
            weights[0, 0] = np.nan
        return {
            "inputs": inputs,
            "targets": targets,
            "weights": weights,
            "mask": (weights != 0).astype(np.int32),
        }

    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        if self.fail_at is not None and step == self.fail_at:
            raise RuntimeError(f"simulated crash at step {step}")
        if self.sigterm_at is not None and step == self.sigterm_at:
            import signal  # pylint: disable=import-outside-toplevel

            os.kill(os.getpid(), signal.SIGTERM)
        g = self.global_batch(step)
        n = self.batch_size // process_count
        return {k: v[process_index * n : (process_index + 1) * n] for k, v in g.items()}


class ToyEvalSource:
    """Two fixed eval batches."""

    def __init__(self, seed: int = 1000, n: int = 2):
        self._src = ToySource(seed)
        self.n = n

    def batches(self, process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.n):
            yield self._src.batch(i, process_index, process_count)


def make_model(seed: int = 0, dropout: float = 0.0):
    """Embedding -> Linear/GELU -> LayerNorm -> Dropout -> Linear, plus a token
    counter (non-param state) and a dropout RNG stream (typed key in 'other')."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    class ToyLM(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed = nnx.Embed(VOCAB, 16, rngs=rngs)
            self.hidden = nnx.Linear(16, 32, rngs=rngs)
            self.norm = nnx.LayerNorm(32, rngs=rngs)
            self.drop = nnx.Dropout(dropout, rngs=rngs)
            self.out = nnx.Linear(32, VOCAB, rngs=rngs)
            self.tokens_seen = nnx.BatchStat(jnp.zeros((), jnp.float32))

        def __call__(self, inputs, rng=None):
            self.tokens_seen.set_value(self.tokens_seen.get_value() + inputs.size)
            x = nnx.gelu(self.hidden(self.embed(inputs)))
            x = self.drop(self.norm(x), rngs=rng)
            return self.out(x)

    return ToyLM(nnx.Rngs(seed))


def loss_fn(model, batch, rng):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    logits = model(batch["inputs"], rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    loss_sum, weight_sum = jnp.sum(ce * w), jnp.sum(w)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w)
    return loss_sum / jnp.maximum(weight_sum, 1.0), {
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "correct_sum": correct,
    }


def eval_fn(model, batch):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel

    model.drop.deterministic = True
    logits = model(batch["inputs"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    return {
        "loss_sum": jnp.sum(ce * w),
        "weight_sum": jnp.sum(w),
        "correct_sum": jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w),
    }


def make_tc(**overrides):
    import ml_collections  # pylint: disable=import-outside-toplevel

    tc = ml_collections.ConfigDict(
        dict(
            steps=12,
            lr=1e-2,
            warmup_frac=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            clip_norm=1.0,
            log_every=1,
            eval_every=0,
            checkpoint_every=4,
            keep_checkpoints=3,
            nan_policy="stop",
            seed=0,
        )
    )
    tc.update(overrides)
    return tc


def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--process_id", type=int, required=True)
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    import ml_collections  # pylint: disable=import-outside-toplevel
    from elm_jax import distributed  # pylint: disable=import-outside-toplevel

    distributed.maybe_initialize(
        ml_collections.ConfigDict(
            dict(
                enabled=True,
                coordinator_address=f"127.0.0.1:{a.port}",
                num_processes=a.num_processes,
                process_id=a.process_id,
                initialization_timeout=60,
            )
        )
    )
    import jax  # pylint: disable=import-outside-toplevel
    from elm_jax.engine import sharding
    from elm_jax import engine as train

    assert jax.process_count() == a.num_processes, jax.process_count()
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
    tc = make_tc(steps=a.steps, checkpoint_every=3, log_every=1)
    trainer = train.Trainer(make_model(), loss_fn, eval_fn, tc, mesh)
    state, summary = train.fit(trainer, ToySource(), ToyEvalSource(), a.workdir, name="mh")
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    emb = multihost_utils.process_allgather(state.params["embed"]["embedding"].get_value(), tiled=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "num_devices": len(jax.devices()),
                "eval": summary["eval"],
                "final_step": summary["final_step"],
                "embedding": np.asarray(emb).tolist(),
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(sys.argv[1:])
