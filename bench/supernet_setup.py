"""The supernet stage's engine set up outside the pipeline, for bench/compile_count.py and bench/mfu.py.

:func:`build` gives the exact compiled step the supernet stage runs
(:func:`elm_jax.students.supernet_trainer`), its batch sampler
(:class:`elm_jax.data.arch_batches.ArchBatches`) and a randomly initialised teacher of the shape the
stage would distil from (weights do not change compilation or speed):

- ``teacher.source = 'train'``: ``cfg.teacher.model`` via :func:`elm_jax.lm.dense_config_from`
  (also for ``checkpoint:``, whose directory is not read);
- ``hf_bert:``: BERT-base (hidden 768, 12 layers, 12 heads, FFN 3072, 512 positions, 2 segments);
- ``hf_gpt2:``: GPT-2 small (hidden 768, 12 layers, 12 heads, FFN 3072, 1024 positions);

both built by the Hugging Face loaders' own config mapping, with the run's vocabulary.

Data: the config's corpus through the real pipeline, or (``synthetic=True``, no corpus or
tokenizer needed) uniformly random token rows fed through the real
:class:`elm_jax.data.pipeline.LMBatches` (MLM masking / CLM targets), so the batches have the
pipeline's keys, dtypes and shapes: ``inputs, targets, weights, mask, segment_ids`` ``[B, S]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from elm_jax.engine import sharding
from elm_jax.data.pipeline import LMBatches
from elm_jax.data.tokenizer import SpecialIds
from elm_jax.models import hf
from elm_jax.models.dense import DenseConfig, DenseLM, init_dense
from elm_jax.stages.supernet import space_of
from elm_jax.students import paths_per_device, supernet_trainer
from elm_jax.data.arch_batches import ArchBatches
from elm_jax.engine.sharding import BATCH_AXES
from elm_jax.lm import dense_config_from
from elm_jax.engine.trainer import Trainer
from elm_jax.space import SearchSpace

# Synthetic special ids: 0..6; every other id is an ordinary token.
SYNTHETIC_SPECIAL = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)
_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def teacher_config(cfg: Any, vocab_size: int) -> DenseConfig:
    """The shape of the teacher the supernet stage of ``cfg`` distils from (see module doc)."""
    kind = str(cfg.teacher.source).partition(":")[0]
    if kind == "hf_bert":
        return hf.bert_config(dict(model_type="bert", vocab_size=vocab_size, max_position_embeddings=512,
                                   type_vocab_size=2, **_BASE), head="mlm")
    if kind == "hf_gpt2":
        return hf.gpt2_config({"model_type": "gpt2", "vocab_size": vocab_size, "n_positions": 1024,
                               "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": 3072}, head="clm")
    return dense_config_from(cfg, vocab_size)


def synthetic_batches(cfg: Any, vocab_size: int, seed: int = 0) -> LMBatches:
    """Training batches of ``cfg.data`` shape from random tokens through the real pipeline class
    (``batch(step)`` a pure function of ``(seed, step)``, like the corpus batches)."""
    d = cfg.data
    first = max(SYNTHETIC_SPECIAL.all()) + 1
    if vocab_size <= first:
        raise ValueError(f"synthetic data needs a vocabulary larger than {first}, got {vocab_size}")
    width = d.seq_len + (1 if cfg.task == "clm" else 0)  # CLM rows carry the next token
    rows = np.random.default_rng([seed, 0x5E]).integers(first, vocab_size, (4 * d.batch_size, width),
                                                         dtype=np.int32)
    return LMBatches(rows, cfg.task, d.batch_size, seed, SYNTHETIC_SPECIAL, vocab_size)


@dataclasses.dataclass
class SupernetBench:
    """What a benchmark of the supernet step needs (see :func:`build`)."""

    cfg: Any
    space: SearchSpace
    mesh: Any
    teacher: DenseLM
    trainer: Trainer
    train: ArchBatches
    eval_batches: list[dict[str, np.ndarray]]
    num_devices: int


def build(cfg: Any, *, synthetic: bool, widths: str | np.ndarray = "initial",
          eval_batches: int = 2) -> SupernetBench:
    """The supernet stage's trainer and sampler for ``cfg``.

    Args:
      cfg: a loaded config (``cfg.precision`` is honoured by the trainer).
      synthetic: random-token batches instead of the config's corpus.
      widths: the sampler's widths state: ``'initial'`` (the start of training), ``'grown'``
        (every candidate at its cap, the end state of PCA growth) or a widths array ``[L, 2, T]``.
      eval_batches: how many fixed validation batches to return.
    """
    if synthetic:
        vocab = int(cfg.data.tokenizer.vocab_size)
        train_src = synthetic_batches(cfg, vocab, cfg.seed)
        evals = [train_src.batch(1_000_000 + k) for k in range(eval_batches)]
    else:
        from elm_jax.data.prepare import prepare_data

        data = prepare_data(cfg)
        vocab = data.tokenizer.vocab_size
        train_src = data.train
        evals = [data.search.global_batch(k) for k in range(min(eval_batches, len(data.search)))]
    space = space_of(cfg, vocab)
    mesh = sharding.make_mesh(cfg.mesh)
    num_devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
    teacher = init_dense(teacher_config(cfg, vocab), seed=cfg.seed + 7)
    trainer = supernet_trainer(cfg, space, teacher, mesh)
    if isinstance(widths, str) and widths in ("initial", "grown"):
        w = space.initial_widths() if widths == "initial" else space.max_widths()
    elif isinstance(widths, str):
        raise ValueError(f"widths must be 'initial', 'grown' or a widths array, got {widths!r}")
    else:
        w = np.asarray(widths, np.int32)
    sc = cfg.supernet
    src = ArchBatches(train_src, space, w, mode=sc.sample_per, num_devices=num_devices, seed=cfg.seed,
                      sandwich=sc.sandwich, paths_per_device=paths_per_device(sc))
    return SupernetBench(cfg, space, mesh, teacher, trainer, src, evals, num_devices)


def recorded_command(script: str, argv: list[str]) -> str:
    """The command line for BENCHMARKS.md: ``python SCRIPT ARGS`` without ``--note`` / ``--out``
    (the note is its own line of the section)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--note", "--out"):
            skip = True
        elif not a.startswith(("--note=", "--out=")):
            kept.append(a)
    return " ".join(["python", script, *kept])
