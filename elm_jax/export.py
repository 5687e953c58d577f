"""Standalone dense model directories: save and load (teachers now; exported sub-networks later).

A model directory holds::

  config.json          {"dense_config": DenseConfig.to_dict(), "meta": {...}}
  model.safetensors    every nnx.Param of the DenseLM, keyed by its dotted path
  orbax/               the same parameters as an orbax checkpoint (exported models)
  arch.json            architecture, widths, heads after CKA, params, FLOPs, latency (exported)
  <tokenizer file>     the tokenizer the model was trained with (exported)

It is written to a temporary sibling and renamed into place, so a directory that exists is
complete. ``load_model(path)`` needs no config file or code from the run that made it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from elm_jax.fileio import atomic_directory, atomic_write_json
from elm_jax.models.dense import DenseConfig, DenseLM, empty_model

CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"


def flat_params(model: DenseLM) -> dict[str, np.ndarray]:
    """``{dotted.path: array}`` of every parameter of ``model``."""
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()))
            for k, v in nnx.to_flat_state(state)}


def write_model_files(directory: str | os.PathLike, model: DenseLM,
                      meta: dict[str, Any] | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` of ``model`` into ``directory``."""
    d = Path(directory)
    save_file(flat_params(model), os.fspath(d / PARAMS_FILE))
    cfg = {"dense_config": model.cfg.to_dict(), "meta": meta or {}}
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_model(path: str | os.PathLike, model: DenseLM, meta: dict[str, Any] | None = None,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Writes ``model`` (config + parameters) atomically to the directory ``path``.

    ``extra(tmp_dir)`` may add more files (arch.json, orbax params, the tokenizer) before the
    directory is renamed into place, so a model directory that exists is always complete.
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_model_files(tmp, model, meta)
        if extra is not None:
            extra(tmp)
    return path


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / PARAMS_FILE).is_file()


def load_model(path: str | os.PathLike) -> tuple[DenseLM, dict[str, Any]]:
    """The DenseLM saved in ``path`` and its metadata; clear errors for a bad directory."""
    p = Path(path)
    if not is_model_dir(p):
        raise FileNotFoundError(
            f"{p} is not an elm-jax model directory (it needs {CONFIG_FILE} and {PARAMS_FILE})")
    info = json.loads((p / CONFIG_FILE).read_text())
    cfg = DenseConfig.from_dict(info["dense_config"])
    return model_from_flat(cfg, load_file(os.fspath(p / PARAMS_FILE)), where=str(p / PARAMS_FILE)), info.get("meta", {})


def model_from_flat(cfg: DenseConfig, tensors: dict[str, np.ndarray], where: str = "parameters") -> DenseLM:
    """A DenseLM of ``cfg`` holding ``tensors`` (``{dotted.path: array}``, every parameter, exact
    shapes); extra or missing names are errors."""
    model = empty_model(cfg)
    state = nnx.state(model, nnx.Param)
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(tensors))
    extra = sorted(set(tensors) - set(flat))
    if missing or extra:
        raise ValueError(f"{where}: missing parameters {missing[:5]}, unexpected {extra[:5]}")
    for k, var in flat.items():
        want = tuple(var.get_value().shape)
        if tuple(tensors[k].shape) != want:
            raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {want}")
        var.set_value(jax.numpy.asarray(tensors[k], jax.numpy.float32))
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------------------------------------
# The export stage


def cka_head_counts(model: DenseLM, batches: list[dict], threshold: float = 0.9,
                    allowed: tuple[int, ...] | None = None) -> list[dict]:
    """DESIGN §1.3 on a dense model: per layer, linear CKA between its heads' contexts over the
    given batches' examples; heads ``k > j`` with ``CKA(j, k) > threshold`` are redundant and the
    new head count is the number of non-redundant heads reduced to a divisor of the width."""
    from elm_jax.dynamic import head_cka_matrix, mean_offdiag_cka, reduced_head_count

    ctxs = [model(b["inputs"], b["mask"], b["segment_ids"], return_internals=True).head_ctx
            for b in batches]
    out = []
    for i, spec in enumerate(model.cfg.blocks):
        ctx = jax.numpy.concatenate([c[i] for c in ctxs])  # [N, S, heads, d]
        mask = jax.numpy.concatenate([jax.numpy.asarray(b["mask"]) for b in batches])
        ctx = ctx.reshape(*ctx.shape[:2], -1)
        cka = np.asarray(head_cka_matrix(ctx, spec.heads, mask))
        width = model.cfg.hidden if spec.family != "mobilebert" else model.cfg.inner
        new = reduced_head_count(cka, width, threshold, allowed)
        out.append({"layer": i, "heads": spec.heads, "new_heads": min(new, spec.heads),
                    "mean_offdiag_cka": mean_offdiag_cka(cka)})
    return out


def with_heads(model: DenseLM, heads: list[int]) -> DenseLM:
    """The same parameters re-split into ``heads[i]`` heads per layer (no tensor changes)."""
    import dataclasses

    blocks = tuple(dataclasses.replace(b, heads=h) for b, h in zip(model.cfg.blocks, heads))
    return model_from_flat(dataclasses.replace(model.cfg, blocks=blocks), flat_params(model))


def uniform_baseline(space, widths, family: str, budget: dict, seq_len: int):
    """The hand-designed baseline of a budget: every active layer the same ``family`` block
    (same candidate, all base heads), the largest such model (most parameters) that satisfies
    the budget's parameter and FLOPs bounds; ``None`` when none does. Depth is the first ``n``
    layers active; all ``(candidate, n)`` combinations are tried."""
    from elm_jax import arch as arch_lib

    if family not in space.families:
        return None
    best = None
    lo = space.min_layers if space.elastic_depth else space.layers
    for n in range(lo, space.layers + 1):
        for j in range(space.candidates):
            layers = tuple(arch_lib.LayerChoice(family, j, space.base_heads, l < n)
                           for l in range(space.layers))
            a = space.validate(arch_lib.Arch(layers))
            p = arch_lib.count_params(space, a, widths)
            f = arch_lib.count_flops(space, a, widths, seq_len)
            ok = all(budget.get(f"max_{k}", float("inf")) >= v and budget.get(f"min_{k}", 0) <= v
                     for k, v in (("params", p), ("flops", f)))
            if ok and (best is None or p > best[0]):
                best = (p, a)
    return None if best is None else best[1]


def save_orbax_params(path: str | os.PathLike, model: DenseLM) -> None:
    """The parameters as an orbax checkpoint (``path``), next to the safetensors copy."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(path), flat_params(model))


def _reusable(out: Path, arch_id: str, kind: str) -> dict[str, Any] | None:
    """The arch.json of a complete model directory exported earlier for the same architecture
    and kind (a killed or preempted export resumes there), else None."""
    try:
        info = json.loads((out / "arch.json").read_text())
    except (OSError, ValueError):
        return None
    if is_model_dir(out) and (out / "orbax").is_dir() and info.get("arch_id") == arch_id \
            and info.get("kind") == kind:
        return info
    return None


def run_export_stage(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Each budget's best architecture from the search -> a standalone model directory
    ``WORKDIR/export/<budget>/`` (config.json, model.safetensors, orbax/, arch.json,
    tokenizer), with the CKA head module applied when ``export.cka_heads``.

    Each model directory is built in a temporary sibling and renamed into place when complete;
    a rerun after a kill or a preemption (SIGTERM: checked between models) reuses the complete
    ones, and ``export/result.json`` (written last) marks the stage complete."""
    from elm_jax import arch as arch_lib
    from elm_jax import preemption
    from elm_jax.supernet import load_supernet

    root = Path(workdir) / "export"
    done_path = root / "result.json"
    if done_path.is_file():
        print(f"[export] complete already: {root}")
        return json.loads(done_path.read_text())
    search_path = Path(workdir) / "search" / "result.json"
    if not search_path.is_file():
        raise FileNotFoundError(f"{search_path} is missing: run --stages=search first")
    search = json.loads(search_path.read_text())
    net, widths, _ = load_supernet(Path(workdir) / "supernet" / "final")
    space = net.space
    batches = [data.eval.global_batch(k) for k in range(min(2, len(data.eval)))]
    candidates = []  # (output name, budget name, arch, kind)
    for name, entry in search["budgets"].items():
        candidates.append((name, name, arch_lib.Arch.from_dict(entry["arch"]), "found"))
        budget = next((b for b in cfg.search.budgets if b["name"] == name), {})
        for fam in (cfg.export.baselines if cfg.export.baselines else ()):
            base = uniform_baseline(space, widths, fam, dict(budget), cfg.data.seq_len)
            if base is not None:
                candidates.append((f"{name}_uniform_{fam}", name, base, f"uniform {fam}"))
    main = jax.process_index() == 0
    result = {}
    for i, (out_name, name, arch, kind) in enumerate(candidates):
        if preemption.agreed():
            raise preemption.Preempted(i, f"export: preempted (SIGTERM) after {i} of {len(candidates)} "
                                          f"models; the finished ones are kept in {root}; rerun the same "
                                          f"command to resume")
        out = root / out_name
        info = _reusable(out, arch.arch_id, kind)
        if info is not None:
            print(f"[export] {out_name} ({kind}): complete already: {out}")
        else:
            info = _export_one(cfg, data, net, widths, batches, search, out, name, arch, kind, main)
        result[out_name] = {k: info[k] for k in ("budget", "kind", "arch_id", "describe", "params", "flops",
                                                 "heads", "predicted_latency_ms", "measured_latency_ms")}
        result[out_name]["path"] = os.fspath(out)
    if main:
        atomic_write_json(done_path, result)
    return result


def _export_one(cfg, data, net, widths, batches, search, out: Path, name: str, arch, kind: str,
                main: bool) -> dict[str, Any]:
    """Extracts ``arch`` (CKA heads for a found model), measures it and writes its model
    directory atomically; returns its arch.json record."""
    from elm_jax import arch as arch_lib
    from elm_jax.models.elastic import extract

    space = net.space
    entry = search["budgets"][name] if kind == "found" else {}
    model = extract(net, widths, arch)
    heads_report = None
    if cfg.export.cka_heads and kind == "found":
        heads_report = cka_head_counts(model, batches, cfg.export.cka_threshold,
                                       tuple(space.head_choices))
        model = with_heads(model, [r["new_heads"] for r in heads_report])
    measured = None
    if cfg.export.measure_latency:
        from elm_jax.latency import measure_model_ms

        lc = cfg.latency
        measured = measure_model_ms(model, lc.batch, lc.seq_len or cfg.data.seq_len, lc.repeats, lc.warmup)
    info = {
        "budget": name, "kind": kind,
        "arch": arch.to_dict(), "arch_id": arch.arch_id, "describe": arch.describe(),
        "widths": [b.ffn for b in model.cfg.blocks],
        "heads": [b.heads for b in model.cfg.blocks],
        "cka_heads": heads_report,
        "params": arch_lib.count_params(space, arch, widths),
        "flops": arch_lib.count_flops(space, arch, widths, cfg.data.seq_len),
        "predicted_latency_ms": entry.get("latency_ms"),
        "measured_latency_ms": measured,
        "search_score": entry.get("score"),
        "config": cfg.to_dict(),
    }
    assert info["params"] == sum(v.size for v in flat_params(model).values())

    def extra(tmp: Path) -> None:
        save_orbax_params(tmp / "orbax", model)
        tok = getattr(data.tokenizer, "path", None)
        if tok is not None:
            (tmp / Path(tok).name).write_bytes(Path(tok).read_bytes())
        (tmp / "arch.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    if main:
        save_model(out, model, meta={"role": "exported", "budget": name, "kind": kind,
                                     "arch_id": arch.arch_id}, extra=extra)
    print(f"[export] {out.name} ({kind}): {arch.describe()} heads {info['heads']} -> {out} "
          f"({info['params']:,} params)")
    return info
