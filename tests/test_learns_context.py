"""The dense MLM uses context (issue 28 part 3), and the teacher stage says when it has not.

Synthetic task: every row is one random piece repeated; with BERT masking (80/10/10) the answer at
a masked position is the piece at every other position, so the context-free answer (the unigram at
``[MASK]``, the Bayes rule at a visible piece; :mod:`elm_jax.data.context_free`) stays near
``log V`` there while a model that attends gets it almost exactly. The positive control trains the
same model with every attention output replaced by zeros (no information moves between positions):
it must not beat the context-free answer, so the first test proves that context is what it used.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from elm_jax import engine
from elm_jax.data import context_free, pipeline
from elm_jax.data.tokenizer import SpecialIds
from elm_jax.engine import sharding
from elm_jax.engine.losses import LM_RATIOS
from elm_jax.lm import lm_eval_fn, lm_loss_fn
from elm_jax.models import layers
from elm_jax.models.dense import BlockSpec, DenseConfig, init_dense

SPECIAL = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
VOCAB, SEQ, BATCH = 40, 16, 32
MASKING = pipeline.Masking(0.3, 0.8, 0.1, max_predictions=pipeline.auto_max_predictions(0.3, SEQ))


def _rows(n: int, seed: int) -> np.ndarray:
    tok = np.random.default_rng(seed).integers(7, VOCAB, (n, 1))
    return np.repeat(tok, SEQ, axis=1).astype(np.int32)


def _gain(zero_attention: bool, monkeypatch) -> tuple[float, float]:
    """Trains 300 steps; returns (validation loss, its context-free answer)."""
    if zero_attention:
        call = layers.Attention.__call__

        def no_context(self, *a, **k):
            out = call(self, *a, **k)
            return out._replace(out=jnp.zeros_like(out.out))

        monkeypatch.setattr(layers.Attention, "__call__", no_context)
    train = pipeline.LMBatches(_rows(2048, 0), "mlm", BATCH, 0, SPECIAL, VOCAB, MASKING)
    evals = pipeline.EvalBatches(_rows(256, 1), "mlm", BATCH, 0, SPECIAL, VOCAB, MASKING)
    cfg = DenseConfig(vocab_size=VOCAB, hidden=32, inner=8, blocks=(BlockSpec("bert", 64, 2),) * 2,
                      max_len=SEQ, head="mlm")
    tc = ConfigDict(dict(steps=300, lr=3e-3, warmup_frac=0.1, seed=0))
    # each step awaited: an unbounded queue of collective steps over 8 fake CPU
    # devices on 2 cores can starve XLA's rendezvous
    trainer = engine.Trainer(init_dense(cfg, seed=0), lm_loss_fn, lm_eval_fn, tc,
                             sharding.make_mesh(ConfigDict(dict(data=-1, fsdp=1))), ratios=LM_RATIOS)
    state = trainer.init_state()
    for step in range(tc.steps):
        state, m = trainer.train_step(state, sharding.global_batch(train.batch(step), trainer.mesh))
        jax.block_until_ready(m)
    loss = engine.evaluate(trainer, state, evals)["loss"]
    u = context_free.unigram(train.rows, "mlm", VOCAB, SPECIAL)
    cf = context_free.loss((evals.global_batch(k) for k in range(len(evals))), u, "mlm", SPECIAL,
                           MASKING)["loss"]
    return loss, cf


def test_the_model_uses_context(monkeypatch):
    loss, cf = _gain(False, monkeypatch)
    assert cf > 1.0  # the task is not trivial without context
    assert cf - loss > 0.75 * cf, (loss, cf)  # far below the context-free answer


def test_positive_control_without_attention_it_cannot(monkeypatch):
    loss, cf = _gain(True, monkeypatch)
    assert cf - loss < 0.05, (loss, cf)  # the assertion above fails without context


def test_teacher_gain_record():
    from elm_jax.stages.teacher import gain_record

    assert gain_record(4.0, 5.0) == {"trivial_loss": 5.0, "gain_nats": 1.0, "learned": True}
    assert gain_record(5.5, 5.0)["learned"] is False and gain_record(5.5, 5.0)["gain_nats"] == -0.5
    assert gain_record(float("nan"), 5.0) == {"trivial_loss": 5.0, "gain_nats": None, "learned": False}
    assert gain_record(None, 5.0) == {} and gain_record(4.0, None) == {}
    json.dumps(gain_record(float("inf"), 5.0))  # JSON-safe: no NaN written
