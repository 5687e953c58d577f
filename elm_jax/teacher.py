"""The teacher stage: train a dense teacher on the corpus, or load a pretrained one.

``teacher.source``:
  ``train``           train ``teacher.model`` with MLM / CLM on the configured corpus;
  ``hf_bert:DIR``     a Hugging Face BERT checkpoint directory (needs its WordPiece tokenizer:
                      ``data.tokenizer.kind=wordpiece``, ``data.tokenizer.path=DIR``);
  ``hf_gpt2:DIR``     a Hugging Face GPT-2 checkpoint directory (vocabulary must match);
  ``checkpoint:DIR``  a model directory written by an earlier elm-jax run.

Output: ``WORKDIR/teacher/model`` (an :mod:`elm_jax.export` model directory; the teacher is
frozen from here on and never checkpointed with a student) and ``WORKDIR/teacher/result.json``
with its validation loss and perplexity. A complete output is reused, not recomputed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from elm_jax import export, sharding
from elm_jax import train as train_lib
from elm_jax.config import ConfigError
from elm_jax.data.prepare import DataBundle
from elm_jax.fileio import atomic_write_json
from elm_jax.losses import weighted_cross_entropy
from elm_jax.models.dense import BlockSpec, DenseConfig, DenseLM, count_params, init_dense


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
    """Training loss: mean token cross-entropy ``loss_sum / max(weight_sum, 1)`` with dropout."""
    out = model(batch["inputs"], batch["mask"], batch["segment_ids"], deterministic=False,
                rngs=nnx.Rngs(dropout=rng))
    sums = weighted_cross_entropy(out.logits, batch["targets"], batch["weights"])
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums


def lm_eval_fn(model: DenseLM, batch: dict) -> dict:
    """Evaluation sums (no dropout): ``loss_sum``, ``weight_sum``, ``correct_sum``."""
    out = model(batch["inputs"], batch["mask"], batch["segment_ids"], deterministic=True)
    return weighted_cross_entropy(out.logits, batch["targets"], batch["weights"])


def with_perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """Adds ``perplexity = exp(loss)`` (loss capped at 50) to evaluation metrics."""
    out = dict(metrics)
    if "loss" in out and math.isfinite(out["loss"]):
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def evaluate_lm(model: DenseLM, eval_source, mesh) -> dict[str, float]:
    """Validation ``loss`` (token mean), ``correct`` (accuracy) and ``perplexity`` of a dense LM
    on the fixed evaluation batches, through the engine's sharded eval step."""
    trainer = train_lib.Trainer(model, lm_loss_fn, lm_eval_fn, ConfigDict({"steps": 1, "lr": 1.0}), mesh)
    return with_perplexity(train_lib.evaluate(trainer, trainer.init_state(), eval_source))


def _load_pretrained(cfg, data: DataBundle) -> tuple[DenseLM, dict[str, Any]]:
    from elm_jax.models import hf

    kind, _, path = cfg.teacher.source.partition(":")
    if kind == "hf_bert":
        model, _ = hf.load_hf_bert(path)  # with its MLM head when the checkpoint has one
    elif kind == "hf_gpt2":
        model, _ = hf.load_hf_gpt2(path)
    else:  # checkpoint
        model, _ = export.load_model(path)
    if model.cfg.vocab_size != data.tokenizer.vocab_size:
        raise ConfigError(
            f"config.teacher.source: the teacher's vocabulary has {model.cfg.vocab_size} entries but "
            f"the tokenizer has {data.tokenizer.vocab_size}; use the teacher's own tokenizer "
            f"(e.g. --config.data.tokenizer.kind=wordpiece --config.data.tokenizer.path={path})")
    if cfg.task == "clm" and not model.cfg.causal:
        raise ConfigError("config.teacher.source: an MLM (bidirectional) teacher cannot guide a CLM task")
    if model.cfg.max_len < cfg.data.seq_len:
        raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} exceeds the teacher's "
                          f"max_len={model.cfg.max_len}")
    return model, {"source": cfg.teacher.source}


def run_teacher_stage(cfg, workdir: str | os.PathLike, data: DataBundle) -> dict[str, Any]:
    """Trains or loads the teacher, evaluates it, writes ``teacher/model`` and the summary."""
    out_dir = teacher_dir(workdir)
    model_dir = out_dir / "model"
    summary_path = out_dir / "result.json"
    if export.is_model_dir(model_dir) and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        print(f"[teacher] complete already: {model_dir}")
        return summary

    mesh = sharding.make_mesh(cfg.mesh)
    kind = cfg.teacher.source.partition(":")[0]
    if kind == "train":
        model = init_dense(dense_config_from(cfg, data.tokenizer.vocab_size), seed=cfg.seed)
        tc = ConfigDict(cfg.teacher.train.to_dict() | {"seed": cfg.seed})
        trainer = train_lib.Trainer(model, lm_loss_fn, lm_eval_fn, tc, mesh)
        print(f"[teacher] training {count_params(model):,} parameters for {tc.steps} steps "
              f"({cfg.task}, {len(model.cfg.blocks)} x {model.cfg.hidden})")
        state, fit_summary = train_lib.fit(trainer, data.train, data.eval, workdir, name="teacher",
                                           meta={"task": cfg.task})
        model = trainer.model_from_state(state)
        eval_metrics = fit_summary["eval"]
        extra = {"train": fit_summary}
    else:
        model, extra = _load_pretrained(cfg, data)
        if model.cfg.head == "none":
            print("[teacher] no LM head in this checkpoint: a feature-only teacher (distillation "
                  "uses its hidden states; no validation loss to report)")
            eval_metrics = {}
        else:
            eval_metrics = evaluate_lm(model, data.eval, mesh)
    eval_metrics = with_perplexity(eval_metrics)
    summary = {"source": cfg.teacher.source, "task": cfg.task, "num_params": count_params(model),
               "dense_config": model.cfg.to_dict(), "eval": eval_metrics, **extra}
    if jax.process_index() == 0:
        export.save_model(model_dir, model, meta={"role": "teacher", "source": cfg.teacher.source,
                                                  "eval": eval_metrics})
        atomic_write_json(summary_path, summary)
    if eval_metrics:
        nan = float("nan")  # a non-finite loss (e.g. after skipped steps) has no perplexity
        print(f"[teacher] validation loss {eval_metrics.get('loss', nan):.4f}, perplexity "
              f"{eval_metrics.get('perplexity', nan):.2f}, accuracy {eval_metrics.get('correct', nan):.4f}")
    return summary


def load_teacher(workdir: str | os.PathLike) -> DenseLM:
    """The frozen teacher of a work directory (after the teacher stage)."""
    model_dir = teacher_dir(workdir) / "model"
    if not export.is_model_dir(model_dir):
        raise ConfigError(f"no teacher in {model_dir}: run --stages=teacher first")
    return export.load_model(model_dir)[0]
