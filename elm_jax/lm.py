"""Language-model loss and evaluation shared by every stage (teacher, supernet, retrain, evaluate).

- :func:`lm_loss_fn` / :func:`lm_eval_fn`: the MLM / CLM token cross-entropy of a dense model
  as engine loss and eval functions (sums over the batch), whose derived metrics are
  :data:`LM_RATIOS` (``loss = loss_sum / weight_sum``, the token mean over the whole evaluation
  set, and ``correct = correct_sum / weight_sum``, the accuracy; the engine's default).
- :func:`evaluate_lm`: validation loss, accuracy and perplexity ``exp(loss)`` of a dense LM;
  :func:`lm_row_sums`: the same sums per evaluation row (for standard errors).
- :func:`supernet_lm_fns`: the same loss for the supernet with the architecture in the batch.
- :func:`dense_config_from` / :func:`load_teacher`: the teacher trained here, and the frozen
  teacher of a work directory (``WORKDIR/teacher/model``).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from elm_jax.config import ConfigError
from elm_jax.data.arch_batches import local_arch
from elm_jax.engine import sharding
from elm_jax.engine import trainer as trainer_lib
from elm_jax.engine.losses import LM_RATIOS, head_positions, scored_cross_entropy
from elm_jax.engine.sharding import sharded_sums
from elm_jax.models.dense import BlockSpec, DenseConfig, DenseLM
from elm_jax.models.elastic import Supernet
from elm_jax.models.io import is_model_dir, load_model


def teacher_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / "teacher"


def dense_config_from(cfg, vocab_size: int) -> DenseConfig:
    """The DenseConfig of a teacher trained here (``cfg.teacher.model``, all layers alike)."""
    m = cfg.teacher.model
    return DenseConfig(
        vocab_size=vocab_size,
        hidden=m.hidden,
        inner=max(m.hidden // 4, 1),
        blocks=tuple(BlockSpec(m.family, m.ffn, m.heads) for _ in range(m.layers)),
        max_len=cfg.data.seq_len,
        embedding=m.embedding,
        embed_size=m.embed_size,
        causal=cfg.task == "clm",
        head=cfg.task,
        final_norm=m.family == "gpt2",
        dropout=m.dropout,
    )


def lm_loss_fn(model: DenseLM, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Training loss: mean token cross-entropy ``loss_sum / max(weight_sum, 1)`` with dropout
    (the LM head only at the batch's scored positions when it carries them)."""
    out = model(batch["inputs"], batch["mask"], batch["segment_ids"], deterministic=False,
                rngs=nnx.Rngs(dropout=rng), head_positions_BxK=head_positions(batch))
    sums = scored_cross_entropy(out.logits, batch)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums


def lm_eval_fn(model: DenseLM, batch: dict) -> dict:
    """Evaluation sums (no dropout): ``loss_sum``, ``weight_sum``, ``correct_sum``."""
    out = model(batch["inputs"], batch["mask"], batch["segment_ids"], deterministic=True,
                head_positions_BxK=head_positions(batch))
    return scored_cross_entropy(out.logits, batch)


def with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """Adds ``perplexity = exp(loss)`` (loss capped at 50) to evaluation metrics."""
    out = dict(metrics)
    if "loss" in out and math.isfinite(out["loss"]):
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def evaluate_lm(model: DenseLM, eval_source, mesh) -> dict[str, float]:
    """Validation ``loss`` (token mean), ``correct`` (accuracy) and ``perplexity`` of a dense LM
    on the fixed evaluation batches, through the engine's sharded eval step."""
    trainer = trainer_lib.Trainer(model, lm_loss_fn, lm_eval_fn, ConfigDict({"steps": 1, "lr": 1.0}), mesh,
                                  ratios=LM_RATIOS)
    return with_perplexity(trainer_lib.evaluate(trainer, trainer.init_state(), eval_source))


def lm_row_sums(model: DenseLM, eval_source, mesh: Mesh) -> np.ndarray:
    """``float64 [R, 3]``: each evaluation row's ``(loss_sum, weight_sum, correct_sum)`` of the
    token cross-entropy (no dropout), over every fixed batch of ``eval_source`` in order, rows in
    global-batch order (each process passes its slice; the result is replicated on every one).
    Column sums divided give :func:`evaluate_lm`'s ``loss`` / ``correct``; the rows are what the
    standard errors of :mod:`elm_jax.search.fitness_noise` pair."""
    graphdef, state = nnx.split(model)
    rep = sharding.replicated(mesh)
    state = jax.device_put(state, rep)

    @functools.partial(jax.jit, out_shardings=rep)
    def rows(state, batch):
        out = nnx.merge(graphdef, state)(batch["inputs"], batch["mask"], batch["segment_ids"],
                                         deterministic=True, head_positions_BxK=head_positions(batch))

        def one(logits, row):
            s = scored_cross_entropy(logits[None], jax.tree.map(lambda v: v[None], row))
            return jnp.stack([s["loss_sum"], s["weight_sum"], s["correct_sum"]])

        return jax.vmap(one)(out.logits, batch)

    out = [np.asarray(rows(state, sharding.global_batch(local, mesh)), np.float64)
           for local in eval_source.batches(jax.process_index(), jax.process_count())]
    return np.concatenate(out) if out else np.zeros((0, 3))


def load_teacher(workdir: str | os.PathLike) -> DenseLM:
    """The frozen teacher of a work directory (after the teacher stage)."""
    model_dir = teacher_dir(workdir) / "model"
    if not is_model_dir(model_dir):
        raise ConfigError(f"no teacher in {model_dir}: run --stages=teacher first")
    return load_model(model_dir)[0]


def _lm_sums(model: Supernet, batch: dict) -> dict:
    out = model(batch["inputs"], local_arch(batch), batch["mask"], batch["segment_ids"],
                head_positions_BxK=head_positions(batch))
    return scored_cross_entropy(out.logits, batch)


def supernet_lm_fns(mesh: Mesh) -> tuple[Callable, Callable]:
    """The engine's ``loss_fn`` and ``eval_fn`` for ground-truth LM training of the supernet
    (mean token cross-entropy of each row's architecture; derived metrics :data:`LM_RATIOS`).
    Distillation builds on the same :func:`sharded_sums`."""
    sums = sharded_sums(mesh, _lm_sums)

    def loss_fn(model, batch, rng):
        del rng  # the supernet has no dropout
        s = sums(model, batch)
        return s["loss_sum"] / jnp.maximum(s["weight_sum"], 1.0), s

    return loss_fn, sums
