"""Tables and plots of a work directory: ``python -m elm_jax.report --workdir=DIR``.

``build_report(workdir)`` reads the stages' outputs and writes

- ``WORKDIR/report.md``: which stages are complete and which are missing; the teacher; one row per
  exported model (the searched architecture and the uniform all-BERT / all-MobileBERT baselines of
  its budget: the largest that fits and the one nearest in size) with parameters, the parameter gap
  of each baseline to the found model, FLOPs, predicted and measured latency, validation loss before and
  after retraining, perplexity and sentence-polarity accuracy (MLM); and the list of plots;
- ``WORKDIR/report/curves_<stage>.png``: the training curves of every training stage (teacher,
  supernet, retrain, finetune), read from the engine's ``metrics.jsonl`` files
  (``WORKDIR/<stage>/metrics.jsonl`` or one per model, ``WORKDIR/<stage>/<model>_run/metrics.jsonl``);
- ``WORKDIR/report/pareto.png``: the search's quality-vs-cost plot, rebuilt from
  ``WORKDIR/search/result.json``.

The evaluate stage calls it at the end of the pipeline; the command rebuilds everything from the
files alone (no model is loaded), so it also works on a partial or copied work directory: missing
stages are listed as missing. A directory without any stage output is refused with a one-line
error (exit code 2).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from elm_jax.fileio import atomic_write_bytes
from elm_jax.pipeline import STAGES
from elm_jax.evaluation import baseline_loss, comparison_lines, finetune_accuracy, model_results, versus_line

# The file each stage writes last: the stage is complete when it exists (the pipeline's registry).
STAGE_OUTPUTS = {s.name: s.outputs[-1] for s in STAGES}
TRAINING_STAGES = ("teacher", "supernet", "retrain", "finetune")
REPORT_DIR = "report"

# Curve panels: (title, metric names); a panel is drawn when any run has any of its metrics.
# ``cross-entropy`` is ``loss_sum / weight_sum`` (for the supernet and retraining the training
# ``loss`` is the distillation objective, not the LM loss); ``kd`` is ``kd_total / kd_count``.
CURVE_PANELS = (
    ("training objective", ("train/loss",)),
    ("cross-entropy", ("train/cross_entropy", "eval/cross_entropy")),
    ("distillation loss", ("train/kd", "eval/kd")),
    ("accuracy", ("train/correct", "eval/correct")),
    ("learning rate", ("train/lr",)),
    ("gradient norm", ("train/grad_norm",)),
)


class ReportError(ValueError):
    """The directory is not a work directory (nothing to report)."""


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when the file does not exist."""
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def fmt(v: Any, digits: int = 4) -> str:
    """A table cell: ``-`` for missing, thousands separators for integers and large floats,
    ``digits`` significant digits otherwise."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]],
                   cell: Callable[[Any], str] = fmt) -> list[str]:
    """Lines of a markdown table, body cells through ``cell`` (default :func:`fmt`; benchmarks
    pass ``str`` for cells they formatted themselves)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


# ----------------------------------------------------------------------------------
# What a work directory holds
# ----------------------------------------------------------------------------------

def stage_status(workdir: str | os.PathLike) -> dict[str, bool]:
    """``{stage: complete}`` in pipeline order (complete = the stage's final output exists)."""
    wd = Path(workdir)
    return {s: (wd / f).is_file() for s, f in STAGE_OUTPUTS.items()}


def check_workdir(workdir: str | os.PathLike) -> Path:
    """``workdir`` as a Path; :class:`ReportError` when it is not a directory or holds no stage
    output or stage directory at all."""
    wd = Path(workdir)
    if not wd.is_dir():
        raise ReportError(f"{wd} is not a directory")
    if not any((wd / s).is_dir() for s in STAGE_OUTPUTS):
        raise ReportError(f"{wd} is not an elm-jax work directory (none of "
                          f"{', '.join(s + '/' for s in STAGE_OUTPUTS)} is in it)")
    return wd


def _as_float(v: Any) -> float:
    try:
        return float(v)  # non-finite values are logged as the strings 'nan' / 'inf'
    except (TypeError, ValueError):
        return float("nan")


def _with_derived(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics record as floats plus ``<p>/cross_entropy`` (``loss_sum / weight_sum``) and
    ``<p>/kd`` (``kd_total / kd_count``) for ``p`` in ``train``, ``eval``."""
    out = {k: _as_float(v) for k, v in record.items() if k != "step"}
    for p in ("train", "eval"):
        w = out.get(f"{p}/weight_sum")
        if f"{p}/loss_sum" in out and w:
            out[f"{p}/cross_entropy"] = out[f"{p}/loss_sum"] / w
        n = out.get(f"{p}/kd_count")
        if f"{p}/kd_total" in out and n:
            out[f"{p}/kd"] = out[f"{p}/kd_total"] / n
    return out


def read_series(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` of one ``metrics.jsonl`` (with the derived metrics of
    :func:`_with_derived`); a line cut short by a kill is skipped."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                continue
            for k, v in _with_derived(rec).items():
                xs, ys = series.setdefault(k, ([], []))
                xs.append(step)
                ys.append(v)
    return series


def stage_metrics(workdir: str | os.PathLike) -> dict[str, dict[str, dict]]:
    """``{stage: {run: series}}`` for every training stage with logged metrics: the stage's own
    ``metrics.jsonl`` (run = the stage name) and one per model (run = the model name)."""
    wd = Path(workdir)
    out: dict[str, dict[str, dict]] = {}
    for stage in TRAINING_STAGES:
        runs = {}
        if (wd / stage / "metrics.jsonl").is_file():
            runs[stage] = read_series(wd / stage / "metrics.jsonl")
        for p in sorted((wd / stage).glob("*/metrics.jsonl")):
            name = p.parent.name
            runs[name.removesuffix("_run")] = read_series(p)
        runs = {k: v for k, v in runs.items() if v}
        if runs:
            out[stage] = runs
    return out


# ----------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------

def _panels(runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """The fixed panels that have data, then one panel per other metric prefix (e.g. ``cka``,
    ``block_cka``, ``widths``) with all its metrics (an old work directory's
    ``discrimination`` series gets its own panel too)."""
    present = set().union(*(set(s) for s in runs.values()))
    panels = [(t, [k for k in keys if k in present]) for t, keys in CURVE_PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    extra: dict[str, list[str]] = {}
    for k in sorted(present):
        prefix = k.split("/", 1)[0]
        if prefix not in ("train", "eval"):
            extra.setdefault(prefix, []).append(k)
    return panels + [(p, ks) for p, ks in extra.items()]


def curves_figure(runs: Mapping[str, Mapping[str, tuple[Sequence[int], Sequence[float]]]], title: str):
    """A matplotlib ``Figure`` (no pyplot, so no backend is touched) with one panel per metric
    group; every run of the stage is drawn in each panel (training solid, evaluation dashed
    with markers)."""
    from matplotlib.figure import Figure

    panels = _panels(runs)
    ncols = min(3, max(len(panels), 1))
    nrows = max(1, -(-len(panels) // ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows))
    for i, (ptitle, keys) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for r, (run, series) in enumerate(runs.items()):
            for j, k in enumerate(keys):
                if k not in series:
                    continue
                xs, ys = series[k]
                label = k if len(runs) == 1 else f"{run}: {k}"
                style = {"ls": "--", "marker": "o", "ms": 3} if k.startswith("eval/") else {"ls": "-"}
                # one colour per run when several runs share the panel, else one per metric
                ax.plot(xs, ys, label=label, color=f"C{r if len(runs) > 1 else j}", **style)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write_bytes(path, buf.getvalue())


def plot_curves(workdir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``WORKDIR/report/curves_<stage>.png`` for every stage with metrics; returns
    ``{stage: path}``."""
    wd = Path(workdir)
    out = {}
    for stage, runs in stage_metrics(wd).items():
        out[stage] = _save_png(curves_figure(runs, f"{stage} ({wd.name})"),
                               wd / REPORT_DIR / f"curves_{stage}.png")
    return out


def plot_search(workdir: str | os.PathLike) -> Path | None:
    """Rebuilds the search's Pareto plot (every scored architecture, the front, each budget's
    best) as ``WORKDIR/report/pareto.png`` from ``search/result.json``; ``None`` when the search
    stage is missing."""
    wd = Path(workdir)
    result = load_json(wd / STAGE_OUTPUTS["search"])
    if not result.get("scored"):
        return None
    from elm_jax.search.pareto import plot_pareto

    return plot_pareto(result["scored"], wd / REPORT_DIR / "pareto.png")


# ----------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------

MODEL_HEADER = ("model", "kind", "architecture", "params", "non-embedding params", "params - found", "FLOPs/seq",
                "pred. latency ms", "meas. latency ms", "val loss (inherited)", "val loss (retrained)",
                "gain (nats)", "perplexity", "fine-tune test acc.")


def model_rows(workdir: str | os.PathLike) -> list[list[Any]]:
    """One row per exported model (columns :data:`MODEL_HEADER`), raw values (``None`` = missing)."""
    wd = Path(workdir)
    export = load_json(wd / STAGE_OUTPUTS["export"])
    evaluate = model_results(load_json(wd / STAGE_OUTPUTS["evaluate"]))
    finetune = load_json(wd / STAGE_OUTPUTS["finetune"])
    retrain = load_json(wd / STAGE_OUTPUTS["retrain"])
    rows = []
    for name, e in export.items():
        ev, ft, rt = evaluate.get(name, {}), finetune.get(name, {}), retrain.get(name, {})
        emb = ev.get("embedding_params")
        rows.append([name, e.get("kind", "found"), f"`{e.get('describe', '?')}`", e.get("params"),
                     None if emb is None or e.get("params") is None else e["params"] - emb,
                     e.get("param_gap"), e.get("flops"), e.get("predicted_latency_ms"),
                     e.get("measured_latency_ms"),
                     rt.get("before", {}).get("loss"), ev.get("loss"), _gain(ev), ev.get("perplexity"),
                     finetune_accuracy(ft)])
    return rows


def _gain(entry: Mapping[str, Any]) -> str | None:
    """The gain over the trivial answer with its paired standard error where recorded, marked
    when the model does not beat it (beyond the noise: ``within noise``)."""
    g = entry.get("gain_nats")
    if g is None:
        return None
    noise = entry.get("gain_noise") or {}
    cell = fmt(g) + (f" ± {fmt(noise['se'], 2)}" if noise.get("se") is not None else "")
    if g <= 0:
        return f"{cell} (no gain)"
    return f"{cell} (within noise)" if noise.get("verdict") == "within noise" else cell


def versus_lines(evaluate: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each found model against each baseline: the baseline's validation loss minus the found
    model's, its paired interval and whether the difference is beyond the noise."""
    lines = [f"- {versus_line(name, b, v)}." for name, e in evaluate.items()
             for b, v in (e.get("versus") or {}).items()]
    return ["", "Found model vs baselines (validation loss, paired over the same rows):", *lines] if lines else []


def finetune_lines(finetune: Mapping[str, Any]) -> list[str]:
    """What the fine-tune column means: the task, its own test metrics per model (F1 for
    MRPC/QQP, Matthews correlation for CoLA), every seed's and the from-scratch runs' accuracies
    with the paired comparisons (against bag-of-words; pre-trained minus scratch), the
    distillation setting and the fine-tuned teacher's test metrics when KD was used."""
    models = {k: v for k, v in finetune.items() if k != "teacher" and isinstance(v, Mapping)}
    if not models:
        return []
    first = next(iter(models.values()))
    kd = first.get("kd") or {}
    lines = ["", f"Fine-tuning task: {first.get('task', 'polarity')}"
                 + (f"; distillation {kd.get('kind')} from the fine-tuned teacher (weight "
                    f"{fmt(kd.get('weight'))}, temperature {fmt(kd.get('temperature'))})"
                    if kd.get("kind", "none") != "none" else "; no distillation") + "."]
    extra = [m for m in first.get("metric_names", []) if m != "accuracy"]
    for name, v in models.items():
        if extra:
            tm = v.get("test_metrics", {})
            lines.append(f"- {name}: " + ", ".join(f"test {m} {fmt(tm.get(m))}" for m in extra))
        lines += [f"- {name}: {line}" for line in comparison_lines(v)]
    t = finetune.get("teacher")
    if isinstance(t, Mapping):
        tm = t.get("test_metrics", {})
        lines.append("- fine-tuned teacher: " + ", ".join(f"test {m} {fmt(x)}" for m, x in tm.items()))
    return lines


def build_report(workdir: str | os.PathLike, plots: bool = True) -> str:
    """Writes and returns ``WORKDIR/report.md``; with ``plots`` also (re)builds the PNGs under
    ``WORKDIR/report/`` and lists them."""
    wd = Path(workdir)
    status = stage_status(wd)
    lines = [f"# elm-jax report: {wd}", ""]
    missing = [s for s, done in status.items() if not done]
    lines += ["Stages: " + ", ".join(f"{s} {'complete' if done else 'MISSING'}"
                                     for s, done in status.items()) + ".", ""]
    if missing:
        lines += [f"Missing stages: {', '.join(missing)} (their values show as `-`).", ""]
    evaluate_doc = load_json(wd / STAGE_OUTPUTS["evaluate"])
    evaluate = model_results(evaluate_doc)
    teacher = load_json(wd / STAGE_OUTPUTS["teacher"])
    trivial = baseline_loss(evaluate_doc)
    if trivial is not None:
        what = ("context-free MLM predictor (sees only the input piece)" if evaluate_doc.get("task") == "mlm"
                else "unigram model of the training split")
        lines += [f"Trivial answer on the validation split: {fmt(trivial)} nats, the {what}; "
                  f"`gain (nats)` is its loss minus each model's (a model without gain learned nothing), "
                  f"± its standard error paired over the validation rows."]
        bow = evaluate_doc.get("baselines", {}).get("bag_of_words_test_accuracy")
        if bow is not None:
            lines += [f"Bag-of-words logistic regression, fine-tuning test accuracy: {fmt(bow)}."]
        lines += [""]
    reused = (teacher or {}).get("cache", {}).get("reused")
    origin = (f" Reused from the teacher cache (key {teacher['cache'].get('key')}): trained once for "
              f"this corpus, tokenizer, config, seed and code." if reused else "")
    if "teacher" in evaluate:
        t = evaluate["teacher"]
        g = t.get("gain_nats")
        gain = "" if g is None else f" (gain {fmt(g)} nats{'' if g > 0 else ': no gain'})"
        lines += [(f"Teacher: {fmt(t.get('params'))} parameters, validation loss {fmt(t.get('loss'))}{gain}, "
                   f"perplexity {fmt(t.get('perplexity'))}.{origin}"), ""]
    elif teacher:
        ev = teacher.get("eval", {})
        g = teacher.get("gain_nats")
        gain = "" if g is None else f" (gain {fmt(g)} nats{'' if g > 0 else ': no gain'})"
        lines += [(f"Teacher: {fmt(teacher.get('num_params'))} parameters, validation loss "
                   f"{fmt(ev.get('loss'))}{gain}, perplexity {fmt(ev.get('perplexity'))}.{origin}"), ""]
    rows = model_rows(wd)
    if rows:
        lines += markdown_table(MODEL_HEADER, rows)
        lines += versus_lines(evaluate)
        lines += finetune_lines(load_json(wd / STAGE_OUTPUTS["finetune"]))
    else:
        lines += ["No exported models yet (the export stage is missing)."]
    if plots:
        made = [("training curves: " + s, p) for s, p in plot_curves(wd).items()]
        pareto = plot_search(wd)
        if pareto is not None:
            made.append(("search: validation loss vs. cost, Pareto front, each budget's best", pareto))
        if made:
            lines += ["", "Plots:", ""]
            lines += [f"- {what}: `{p.relative_to(wd)}`" for what, p in made]
    elif (wd / "search" / "pareto.png").is_file():
        lines += ["", "Pareto front of the search (validation loss vs. parameters): `search/pareto.png`."]
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(wd / "report.md", text.encode())
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m elm_jax.report --workdir=DIR [--no_plots]``: rebuilds and prints the report."""
    parser = argparse.ArgumentParser(prog="python -m elm_jax.report", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a work directory of `python -m elm_jax.main`")
    parser.add_argument("--no_plots", action="store_true", help="only the table (report.md)")
    args = parser.parse_args(argv)
    try:
        wd = check_workdir(args.workdir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(build_report(wd, plots=not args.no_plots), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())


