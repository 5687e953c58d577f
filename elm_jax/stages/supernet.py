"""The supernet stage: ELM supernet pre-training under relational distillation (DESIGN §1.2-1.5).

Each step samples architectures (one per step, one per data-parallel device, or the sandwich
rule across devices) from a host RNG derived from ``(seed, step)``; the frozen teacher (from the
teacher stage; passed to the engine as ``frozen``, never checkpointed with the student) and the
supernet run on the same inputs, and the loss is

    L = D(E_T, P E_S) + sum_{active l} [ D(A_T^{m(l)}, P_fam(l) A_S^l) + D(H_T^{m(l)}, P H_S^l) ]
        + gt_weight * CE(student logits, targets)

with ``D`` the relational (Pearson) loss by default (``supernet.kd_loss``). Only the sampled
path is updated: AdamW with one step count and moments per candidate tensor, and a tensor that
no architecture of the step used keeps its weights and optimiser state
(:class:`elm_jax.students.SupernetPath`, :func:`elm_jax.engine.optim.sampled_path_adamw`; weight
decay on weight matrices and embeddings only). Every ``calc_every`` steps the PCA statistic ``k``
of the sampled architectures' FFNs is accumulated per (layer, family, candidate), and the mean
off-diagonal head CKA per layer (``cka/layer{l}``) and the mean CKA between the candidate blocks'
contributions on the same input (``block_cka/layer{l}``,
:func:`elm_jax.dynamic.block_cka`; higher = the candidates are more alike) are logged; at
every epoch end but the last step the top ``num_add`` candidates by mean ``k`` widen by ``f0``
(DESIGN §1.2). Widths,
the accumulated statistics and the growth history are saved with every checkpoint, so a
resumed run continues exactly.

Output: ``WORKDIR/supernet/final/`` with the supernet weights (``supernet.safetensors``),
``widths.json`` (widths, space, growth history) and ``WORKDIR/supernet/result.json``, whose
``block_cka`` is the per-layer ``block_cka`` of the last statistics step, averaged over the
devices' batches (work directories from before it have ``block_discrimination`` instead, the
mean uncentred cosine between the candidates' outputs, which the shared residual input
dominated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from elm_jax.data import context_free
from elm_jax import arch as arch_lib
from elm_jax import engine
from elm_jax.accounting import count_params
from elm_jax.config import ConfigError
from elm_jax.data.arch_batches import ArchBatches, FixedArchBatches, local_arch
from elm_jax.data.prepare import DataBundle
from elm_jax.distributed import is_main_process
from elm_jax.dynamic import PCAAccumulator, block_cka, grow_widths, layer_head_cka, layer_pca_stats
from elm_jax.engine import sharding
from elm_jax.engine.sharding import BATCH_AXES
from elm_jax.fileio import atomic_write_json
from elm_jax.lm import load_teacher
from elm_jax.models.dense import DenseLM
from elm_jax.models.io import save_supernet
from elm_jax.space import SearchSpace
from elm_jax.students import paths_per_device, supernet_trainer


def space_of(cfg, vocab_size: int) -> SearchSpace:
    return SearchSpace.from_config(cfg.space, vocab_size=vocab_size, max_len=cfg.data.seq_len,
                                   task=cfg.task)


class SupernetHooks:
    """PCA statistics, CKA logging and epoch-end width growth between steps (checkpointed).

    The statistics run each device's rows through the architecture of its first row: with
    ``supernet.paths_per_device > 1``, that of its first path."""

    def __init__(self, cfg, space: SearchSpace, trainer: engine.Trainer, epoch_steps: int):
        self.cfg, self.space, self.trainer, self.epoch_steps = cfg, space, trainer, epoch_steps
        self.widths = space.initial_widths()
        self.sources: list[Any] = []  # batch sources whose ``widths`` follow this state
        self.acc = PCAAccumulator(space.layers, space.candidates)
        self.history: list[dict] = []
        # latest per-layer mean CKA between the candidate blocks' contributions (block_cka)
        self.block_cka: list[float] | None = None
        self._stats = self._build_stats()

    def _build_stats(self):
        mesh, graphdef = self.trainer.mesh, self.trainer.graphdef
        axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        base_heads = self.space.base_heads

        def per_device(params, other, batch, widths):
            net = nnx.merge(graphdef, params, other).net
            arch = local_arch(batch)
            out = net(batch["inputs"], arch, batch["mask"], batch["segment_ids"], return_internals=True)
            f = out.layers
            k = layer_pca_stats(f.ffn_pre_bert, f.ffn_pre_mobilebert, arch, batch["mask"])
            cka = layer_head_cka(f.ctx_bert, f.ctx_mobilebert, arch, base_heads, batch["mask"])
            bcka = block_cka(net, out.embedding, f.block, widths, batch["mask"])
            return k[None], cka[None], bcka[None]

        fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(axes), P()),
                           out_specs=(P(axes), P(axes), P(axes)), check_vma=False)
        return jax.jit(fn)

    def after_step(self, done: int, state, local_batch, writer) -> None:
        sc = self.cfg.supernet
        if done % sc.calc_every == 0:
            batch = sharding.global_batch(local_batch, self.trainer.mesh)
            k, cka, bcka = jax.device_get(self._stats(state.params, state.other, batch, self.widths))
            self.block_cka = bcka.mean(axis=0).tolist()  # mean over the devices' batches
            writer.write_scalars(done, {f"block_cka/layer{l}": float(v)
                                        for l, v in enumerate(self.block_cka)})
            rows = len(local_batch["inputs"]) // len(k)
            for d in range(len(k)):  # each device's rows carry that device's architecture
                arrays = arch_lib.ArchArrays(**{f: local_batch[f"arch_{f}"][d * rows]
                                                for f in ("family", "candidate", "width", "heads", "active")})
                self.acc.add(k[d], arrays)
            with warnings.catch_warnings():  # layers no device ran with >1 head are all-NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                per_layer = np.nanmean(cka, axis=0)
            writer.write_scalars(done, {f"cka/layer{l}": float(v) for l, v in enumerate(per_layer)
                                        if np.isfinite(v)})
        # Grow at every epoch end but never after the final step: a unit that is added must be
        # trained (DESIGN 1.2), and the saved widths are what search and export use.
        if sc.grow and done % self.epoch_steps == 0 and done < self.trainer.total_steps:
            self.grow(done, writer)

    def set_widths(self, widths: np.ndarray) -> None:
        """The new widths state, pushed to every batch source in :attr:`sources`."""
        self.widths = widths
        for src in self.sources:
            src.widths = widths

    def mean_params(self) -> float:
        rng = np.random.default_rng(12345)
        return float(np.mean([count_params(self.space, self.space.sample(rng), self.widths)
                              for _ in range(1000)]))

    def grow(self, done: int, writer) -> None:
        sc = self.cfg.supernet
        new, grown = grow_widths(self.widths, self.acc, sc.num_add, self.space.f0,
                                 self.space.max_widths(), self.space.families,
                                 mean_params_fn=self.mean_params,
                                 upper_params=float(sc.upper_params) if sc.upper_params > 0 else None)
        event = {"step": done, "grown": [list(map(int, g)) for g in grown],
                 "mean_k": np.nan_to_num(self.acc.mean(), nan=-1.0).round(3).tolist()}
        self.history.append(event)
        self.set_widths(new)
        self.acc.reset()
        writer.write_scalars(done, {"widths/total": float(new.sum()), "widths/grown": float(len(grown))})

    def meta(self) -> dict:
        acc = self.acc.state_dict()
        return {"widths": self.widths.tolist(), "history": self.history,
                "block_cka": self.block_cka,
                "acc": {k: np.asarray(v).tolist() for k, v in acc.items()}}

    def on_restore(self, meta: Mapping[str, Any]) -> None:
        if not meta:
            return
        self.set_widths(self.space.validate_widths(np.asarray(meta["widths"], np.int32)))
        self.history = list(meta["history"])
        # absent in checkpoints from before block_cka (their "discrimination" was another metric)
        self.block_cka = meta.get("block_cka")
        self.acc = PCAAccumulator.from_state_dict({k: np.asarray(v) for k, v in meta["acc"].items()})


def run(cfg, workdir: str | os.PathLike, data: DataBundle) -> dict[str, Any]:
    """Trains the supernet (resuming when a checkpoint exists) and writes its final weights."""
    out = Path(workdir) / "supernet"
    final = out / "final"
    result_path = out / "result.json"
    if (final / "widths.json").is_file() and result_path.is_file():
        print(f"[supernet] complete already: {final}")
        return json.loads(result_path.read_text())
    teacher: DenseLM = load_teacher(workdir)
    space = space_of(cfg, data.tokenizer.vocab_size)
    if teacher.cfg.vocab_size != space.vocab_size:
        raise ConfigError(f"config.teacher.source: the teacher's vocabulary has {teacher.cfg.vocab_size} "
                          f"entries but the tokenizer has {space.vocab_size}; use the teacher's own tokenizer")
    sc = cfg.supernet
    mesh = sharding.make_mesh(cfg.mesh)
    num_devices = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
    trainer = supernet_trainer(cfg, space, teacher, mesh)
    tc = trainer.tc
    epoch_steps = int(sc.epoch_steps) or max(1, int(round(data.train.steps_per_epoch)))
    hooks = SupernetHooks(cfg, space, trainer, epoch_steps)
    train_src = ArchBatches(data.train, space, hooks.widths, mode=sc.sample_per,
                            num_devices=num_devices, seed=cfg.seed, sandwich=sc.sandwich,
                            paths_per_device=paths_per_device(sc))
    eval_src = FixedArchBatches(data.eval, space, space.largest(), hooks.widths)
    hooks.sources = [train_src, eval_src]
    print(f"[supernet] {space.layers} layers x {space.candidates} candidates x {list(space.families)}, "
          f"{trainer.num_params():,} parameters (with projections); {tc.steps} steps, "
          f"{sc.kd_loss} distillation, architectures per {sc.sample_per}"
          f"{f' ({paths_per_device(sc)} per device)' if paths_per_device(sc) > 1 else ''}"
          f"{' (sandwich)' if sc.sandwich else ''}, epoch = {epoch_steps} steps")
    state, summary = engine.fit(trainer, train_src, eval_src, workdir, name="supernet",
                                meta={"task": cfg.task}, hooks=hooks,
                                trivial_loss=context_free.trivial_loss_of(data))
    model = trainer.model_from_state(state)
    eval_metrics = summary["eval"]
    if eval_metrics.get("kd_count"):
        eval_metrics["kd"] = eval_metrics["kd_total"] / eval_metrics["kd_count"]
    result = {"space": dataclasses.asdict(space), "widths": hooks.widths.tolist(),
              "growth": hooks.history, "eval_largest": eval_metrics, "train": summary,
              "block_cka": hooks.block_cka,
              "train_step_compilations": trainer.train_step._cache_size()}
    if is_main_process():
        save_supernet(final, model.net, hooks.widths, hooks.history)
        atomic_write_json(result_path, result)
    grown = sum(len(e["grown"]) for e in hooks.history)
    print(f"[supernet] done: largest-architecture validation kd {eval_metrics.get('kd', float('nan')):.4f}, "
          f"MLM/CLM loss {eval_metrics.get('loss', float('nan')):.4f}; {grown} width increments")
    return result
