"""The ``export`` stage: each budget's best architecture, and its hand-designed baselines, as
standalone model directories.

For every budget of ``search/result.json`` the found architecture is extracted from the supernet
(:func:`elm_jax.models.extract.extract`), the CKA head module is applied
(:func:`elm_jax.dynamic.cka_head_counts`, ``export.cka_heads``, on search-split batches), its
latency is measured (``export.measure_latency``) and it is written to ``WORKDIR/export/<budget>/``
(a model directory of :mod:`elm_jax.models.io` with ``orbax/``, ``arch.json`` and the tokenizer);
``predicted_latency_ms`` is the latency table's prediction for the model as exported (post-CKA
heads), measured under the same timing policy (:mod:`elm_jax.latency`), and
``search_predicted_latency_ms`` the search's figure for the pre-CKA architecture.
For each family of ``export.baselines`` the uniform baselines of :mod:`elm_jax.search.baselines`,
chosen under every bound of the budget, go to ``WORKDIR/export/<budget>_largest_<family>/``
(the largest that fits) and ``WORKDIR/export/<budget>_matched_<family>/`` (nearest in parameters
to the found model; not exported again when it is the largest one), each with ``param_gap``
(its parameters minus the found model's). With the search's random-search control
(``search.random_control``) its best goes to ``WORKDIR/export/<budget>_random/`` (kind
``random_best``, CKA heads as for the found model, ``param_gap`` as for a baseline; not exported
when it is the found model). ``export/result.json`` is written last; a rerun reuses every complete
model directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from elm_jax import latency
from elm_jax.accounting import count_flops, count_params
from elm_jax.arch import FAMILY_INDEX
from elm_jax.distributed import is_main_process
from elm_jax.dynamic import cka_head_counts
from elm_jax.fileio import atomic_write_json
from elm_jax.models.extract import with_heads
from elm_jax.models.io import flat_params, is_model_dir, save_model, save_orbax_params
from elm_jax.search.evolution import RANDOM_KIND


@dataclasses.dataclass(frozen=True)
class _Item:
    """One model to export: ``arch`` extracted at ``widths``."""

    out_name: str
    budget: str
    kind: str                   # "found" | "random_best" | one of baselines.KINDS
    arch: Any
    widths: np.ndarray
    family: str | None = None   # baselines: the uniform family
    param_gap: int | None = None  # baselines: params minus the found model's

    def ffn(self) -> list[int]:
        """The FFN width of each active layer (what the exported model has)."""
        return [int(self.widths[l, FAMILY_INDEX[c.family], c.candidate])
                for l, c in enumerate(self.arch.layers) if c.active]


def _reusable(out: Path, item: _Item) -> dict[str, Any] | None:
    """The arch.json of a complete model directory exported earlier for the same architecture,
    widths and kind (a killed or preempted export resumes there), else None."""
    try:
        info = json.loads((out / "arch.json").read_text())
    except (OSError, ValueError):
        return None
    if is_model_dir(out) and (out / "orbax").is_dir() and info.get("arch_id") == item.arch.arch_id \
            and info.get("kind") == item.kind and info.get("widths") == item.ffn():
        return info
    return None


def _items(cfg, space, widths, search: dict[str, Any], latency_for) -> list[_Item]:
    """The found model of every budget, then its baselines (largest, matched) per family."""
    from elm_jax import arch as arch_lib
    from elm_jax.accounting import count_params
    from elm_jax.search import baselines

    items = []
    for name, entry in search["budgets"].items():
        found = arch_lib.Arch.from_dict(entry["arch"])
        items.append(_Item(name, name, "found", found, widths))
        target = count_params(space, found, widths)
        if "random" in entry:  # the random-search control: exported like the found model
            rnd = arch_lib.Arch.from_dict(entry["random"]["arch"])
            if space.canonical(rnd).arch_id == space.canonical(found).arch_id:
                print(f"[export] {name}: the random search's best is the found model")
            else:
                items.append(_Item(f"{name}_random", name, RANDOM_KIND, rnd, widths, None,
                                   count_params(space, rnd, widths) - target))
        budget = next((dict(b) for b in cfg.search.budgets if b["name"] == name), {})
        for fam in (cfg.export.baselines if cfg.export.baselines else ()):
            largest = baselines.largest_uniform(space, widths, fam, budget, cfg.data.seq_len, latency_for)
            matched = baselines.matched_uniform(space, widths, fam, budget, cfg.data.seq_len, target,
                                                latency_for)
            for b, tag in ((largest, "largest"), (matched, "matched")):
                if b is None:
                    print(f"[export] {name}: no uniform {fam} model satisfies the budget ({tag})")
                    continue
                if tag == "matched" and largest is not None and b.arch == largest.arch \
                        and np.array_equal(b.widths, largest.widths):
                    print(f"[export] {name}: the size-matched uniform {fam} model is the largest one "
                          f"({name}_largest_{fam})")
                    continue
                items.append(_Item(f"{name}_{tag}_{fam}", name, b.kind, b.arch, b.widths, fam,
                                   b.params - target))
    return items


def run(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Each budget's best architecture from the search -> a standalone model directory
    ``WORKDIR/export/<budget>/`` (config.json, model.safetensors, orbax/, arch.json,
    tokenizer), with the CKA head module applied when ``export.cka_heads``, and its uniform
    baselines (module docstring).

    Each model directory is built in a temporary sibling and renamed into place when complete;
    a rerun after a kill or a preemption (SIGTERM: checked between models) reuses the complete
    ones, and ``export/result.json`` (written last) marks the stage complete."""
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
    # the CKA head module chooses head counts: from the search split, never the validation split
    # on which the exported models are then compared
    batches = [data.search.global_batch(k) for k in range(min(2, len(data.search)))]
    # the search's latency table (None without latency bounds or latency.predict): it bounds the
    # baselines like the search and predicts every exported model as exported
    table = latency.table_for(cfg, space)
    latency_for = None if table is None else (lambda w: (lambda a: table.predict_ms(space, a, w)))
    items = _items(cfg, space, widths, search, latency_for)
    main = is_main_process()
    result = {}
    for i, item in enumerate(items):
        if preemption.agreed():
            raise preemption.Preempted(i, f"export: preempted (SIGTERM) after {i} of {len(items)} "
                                          f"models; the finished ones are kept in {root}; rerun the same "
                                          f"command to resume")
        out = root / item.out_name
        info = _reusable(out, item)
        if info is not None:
            print(f"[export] {item.out_name} ({item.kind}): complete already: {out}")
        else:
            info = _export_one(cfg, data, net, batches, search, table, out, item, main)
        result[item.out_name] = {k: info.get(k) for k in (
            "budget", "kind", "family", "arch_id", "describe", "params", "param_gap", "flops", "heads",
            "predicted_latency_ms", "search_predicted_latency_ms", "measured_latency_ms")}
        result[item.out_name]["path"] = os.fspath(out)
    if main:
        atomic_write_json(done_path, result)
    return result


def _export_one(cfg, data, net, batches, search, table, out: Path, item: _Item, main: bool) -> dict[str, Any]:
    """Extracts ``item`` (CKA heads for a found model), measures it and writes its model
    directory atomically; returns its arch.json record."""
    from elm_jax.models.extract import extract

    space = net.space
    name, arch, kind, widths = item.budget, item.arch, item.kind, item.widths
    entry = {"found": search["budgets"][name],
             RANDOM_KIND: search["budgets"][name].get("random", {})}.get(kind, {})
    model = extract(net, widths, arch)
    heads_report = None
    if cfg.export.cka_heads and kind in ("found", RANDOM_KIND):  # searched: the head module acts
        heads_report = cka_head_counts(model, batches, cfg.export.cka_threshold,
                                       tuple(space.head_choices))
        model = with_heads(model, [r["new_heads"] for r in heads_report])
    # Latency of the model AS EXPORTED (post-CKA heads), predicted by the run's table and measured
    # under the table's own timing policy (cfg.latency); the search's pre-CKA figure is kept apart.
    measured = None
    if cfg.export.measure_latency:
        measured = latency.measure_exported_ms(model, cfg.latency, cfg.data.seq_len)
    predicted = latency.predict_exported_ms(table, space, model.cfg)
    info = {
        "budget": name, "kind": kind, "family": item.family, "param_gap": item.param_gap,
        "arch": arch.to_dict(), "arch_id": arch.arch_id,
        "describe": arch.describe() + ("" if item.family is None else f" ffn={item.ffn()[0]}"),
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
    gap = "" if item.param_gap is None else f", {item.param_gap:+,} vs the found model"
    print(f"[export] {out.name} ({kind}): {info['describe']} heads {info['heads']} -> {out} "
          f"({info['params']:,} params{gap})")
    return info
