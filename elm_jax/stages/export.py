"""The ``export`` stage: each budget's best architecture, and its hand-designed baselines, as
standalone model directories.

For every budget of ``search/result.json`` the found architecture is extracted from the supernet
(:func:`elm_jax.models.extract.extract`), the CKA head module is applied
(:func:`elm_jax.dynamic.cka_head_counts`, ``export.cka_heads``), its latency is measured
(``export.measure_latency``) and it is written to ``WORKDIR/export/<budget>/`` (a model directory
of :mod:`elm_jax.models.io` with ``orbax/``, ``arch.json`` and the tokenizer). The uniform
baselines of ``export.baselines`` (:func:`uniform_baseline`) go to
``WORKDIR/export/<budget>_uniform_<family>/``. ``export/result.json`` is written last; a rerun
reuses every complete model directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from elm_jax.accounting import count_flops, count_params
from elm_jax.distributed import is_main_process
from elm_jax.dynamic import cka_head_counts
from elm_jax.fileio import atomic_write_json
from elm_jax.models.extract import with_heads
from elm_jax.models.io import flat_params, is_model_dir, save_model, save_orbax_params

# ---------------------------------------------------------------------------------------------
# The export stage


def uniform_baseline(space, widths, family: str, budget: dict, seq_len: int, latency_fn=None,
                     name: str | None = None):
    """The hand-designed baseline of a budget: every active layer the same ``family`` block
    (same candidate, all base heads), the largest such model (most parameters) that satisfies
    the budget (:class:`~elm_jax.search.constraints.Constraints`, the search's own reading of
    it); ``None`` when none does. Depth is the first ``n`` layers active; all
    ``(candidate, n)`` combinations are tried.

    ``budget`` is a ``cfg.search.budgets`` entry; ``{}`` (a budget no longer in the config) is
    unconstrained, named ``name`` (default ``uniform_<family>``). Latency bounds are IGNORED
    when no ``latency_fn`` is given (the export stage gives none today: baselines are chosen by
    parameters and FLOPs only); with ``latency_fn`` they are enforced like every other bound."""
    from elm_jax import arch as arch_lib
    from elm_jax.search.constraints import Constraints

    if family not in space.families:
        return None
    budget = dict(budget)
    budget.setdefault("name", name or f"uniform_{family}")
    if latency_fn is None:  # explicitly: no latency table, so latency bounds cannot be tested
        budget = {k: v for k, v in budget.items() if not k.endswith("latency_ms")}
    constraints = Constraints.from_budget(budget, space, widths, seq_len, latency_fn=latency_fn)
    best = None
    lo = space.min_layers if space.elastic_depth else space.layers
    for n in range(lo, space.layers + 1):
        for j in range(space.candidates):
            layers = tuple(arch_lib.LayerChoice(family, j, space.base_heads, l < n)
                           for l in range(space.layers))
            a = space.validate(arch_lib.Arch(layers))
            if constraints.ok(a):
                p = constraints.measures(a)["params"]
                if best is None or p > best[0]:
                    best = (p, a)
    return None if best is None else best[1]


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


def run(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Each budget's best architecture from the search -> a standalone model directory
    ``WORKDIR/export/<budget>/`` (config.json, model.safetensors, orbax/, arch.json,
    tokenizer), with the CKA head module applied when ``export.cka_heads``.

    Each model directory is built in a temporary sibling and renamed into place when complete;
    a rerun after a kill or a preemption (SIGTERM: checked between models) reuses the complete
    ones, and ``export/result.json`` (written last) marks the stage complete."""
    from elm_jax import arch as arch_lib
    from elm_jax import preemption
    from elm_jax.models.io import load_supernet

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
    main = is_main_process()
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
    from elm_jax.models.extract import extract

    space = net.space
    entry = search["budgets"][name] if kind == "found" else {}
    model = extract(net, widths, arch)
    heads_report = None
    if cfg.export.cka_heads and kind == "found":
        heads_report = cka_head_counts(model, batches, cfg.export.cka_threshold,
                                       tuple(space.head_choices))
        model = with_heads(model, [r["new_heads"] for r in heads_report])
    # Latency of the model AS EXPORTED (post-CKA heads), predicted by the run's table and measured
    # under the table's own timing policy (cfg.latency); the search's pre-CKA figure is kept apart.
    from elm_jax import latency

    measured = None
    if cfg.export.measure_latency:
        measured = latency.measure_exported_ms(model, cfg.latency, cfg.data.seq_len)
    predicted = latency.predict_exported_ms(latency.table_for(cfg, space), space, model.cfg)
    info = {
        "budget": name, "kind": kind,
        "arch": arch.to_dict(), "arch_id": arch.arch_id, "describe": arch.describe(),
        "widths": [b.ffn for b in model.cfg.blocks],
        "heads": [b.heads for b in model.cfg.blocks],
        "cka_heads": heads_report,
        "params": count_params(space, arch, widths),
        "flops": count_flops(space, arch, widths, cfg.data.seq_len),
        "predicted_latency_ms": predicted,
        "search_predicted_latency_ms": entry.get("latency_ms"),
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
