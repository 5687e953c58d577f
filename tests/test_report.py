"""``python -m elm_jax.report``: tables and plots rebuilt from a work directory's files.

The work directories here are synthetic: the JSON and JSONL files the stages write (same names
and fields as teacher.py, supernet.py, search.py, export.py, retrain.py, finetune.py and the
training engine write), with known values.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from elm_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _train_log(steps, loss0, kd=False):
    """Engine-style records: train windows every step in ``steps``, eval at the last one."""
    out = []
    for s in steps:
        r = {"step": s, "train/loss": loss0 / s, "train/loss_sum": 100.0 * loss0 / s, "train/weight_sum": 20.0,
             "train/correct": 0.1 * s, "train/lr": 1e-3, "train/grad_norm": 1.0 / s}
        if kd:
            r.update({"train/kd_total": 8.0 / s, "train/kd_count": 4.0})
        out.append(r)
    out.append({"step": steps[-1], "eval/loss": loss0 / 2, "eval/loss_sum": 50.0 * loss0, "eval/weight_sum": 100.0,
                "eval/correct": 0.5})
    return out


def _complete_workdir(wd):
    _write(wd / "data" / "stats.json", {"train": {"docs": 6}})
    _write(wd / "teacher" / "result.json", {"num_params": 27744, "eval": {"loss": 5.25, "perplexity": 190.6}})
    _jsonl(wd / "teacher" / "metrics.jsonl", _train_log([5, 10, 15, 20], 6.0))
    sup = _train_log([4, 8, 12], 6.0, kd=True)
    sup += [{"step": 2, "cka/layer0": 0.8, "block_cka/layer0": 0.31},
            {"step": 4, "cka/layer0": 0.9, "block_cka/layer0": 0.28}]
    _jsonl(wd / "supernet" / "metrics.jsonl", sup)
    _write(wd / "supernet" / "result.json", {"widths": [[[16, 32]]]})
    scored = [{"arch_id": "a", "describe": "b1h2 -", "score": 5.54, "params": 15104, "flops": 983040,
               "latency_ms": None, "best_for": ["small"]},
              {"arch_id": "b", "describe": "- m1h1", "score": 5.60, "params": 12800, "flops": 770048,
               "latency_ms": None, "best_for": []}]
    _write(wd / "search" / "result.json", {"complete": True, "budget_names": ["small"], "scored": scored,
                                           "budgets": {"small": {"describe": "b1h2 -", "params": 15104,
                                                                 "score": 5.54}}})
    _write(wd / "export" / "result.json", {
        "small": {"kind": "found", "describe": "b1h2 -", "params": 15104, "flops": 983040,
                  "predicted_latency_ms": None, "measured_latency_ms": 0.384},
        "small_uniform_mobilebert": {"kind": "uniform mobilebert", "describe": "m0h2 m0h2", "params": 15904,
                                     "param_gap": 800, "flops": 1015808, "predicted_latency_ms": 1.25,
                                     "measured_latency_ms": 0.362}})
    _write(wd / "retrain" / "result.json", {"small": {"before": {"loss": 5.5424}, "after": {"loss": 5.5238}},
                                            "small_uniform_mobilebert": {"before": {"loss": 5.5425},
                                                                         "after": {"loss": 5.5203}}})
    for m in ("small", "small_uniform_mobilebert"):
        _jsonl(wd / "retrain" / f"{m}_run" / "metrics.jsonl", _train_log([3, 6], 10.0, kd=True))
        _jsonl(wd / "finetune" / f"{m}_run" / "metrics.jsonl", _train_log([3, 6], 0.7))
    _write(wd / "finetune" / "result.json", {"small": {"test_accuracy": 0.625},
                                             "small_uniform_mobilebert": {"test_accuracy": 0.5}})
    _write(wd / "evaluate" / "result.json", {
        "small": {"loss": 5.5238, "perplexity": 250.6, "params": 15104, "embedding_params": 4000},
        "small_uniform_mobilebert": {"loss": 5.5203, "perplexity": 249.7, "params": 15904},
        "teacher": {"loss": 5.1713, "perplexity": 176.147, "params": 27744}})


def _table(text):
    """The rows of the report's markdown table as dicts."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {r["model"]: r for r in (dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
                                    for ln in lines[1:])}


def _assert_png(path):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 0  # something was drawn


def test_report_command_on_a_complete_workdir(tmp_path):
    wd = tmp_path / "wd"
    _complete_workdir(wd)
    run = subprocess.run([sys.executable, "-m", "elm_jax.report", f"--workdir={wd}"], cwd=REPO,
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (wd / "report.md").read_text()
    assert run.stdout == text  # the table is printed
    assert "Missing" not in text and "evaluate complete" in text
    assert "Teacher: 27,744 parameters, validation loss 5.171, perplexity 176.1." in text
    rows = _table(text)
    assert set(rows) == {"small", "small_uniform_mobilebert"}
    small, mob = rows["small"], rows["small_uniform_mobilebert"]
    assert small["architecture"] == "`b1h2 -`" and small["params"] == "15,104"
    assert small["non-embedding params"] == "11,104"  # 15,104 less the fixture's 4,000 in tables
    assert small["FLOPs/seq"] == "983,040" and small["pred. latency ms"] == "-"
    assert small["meas. latency ms"] == "0.384" and small["val loss (inherited)"] == "5.542"
    assert small["val loss (retrained)"] == "5.524" and small["fine-tune test acc."] == "0.625"
    assert mob["kind"] == "uniform mobilebert" and mob["pred. latency ms"] == "1.25"
    assert mob["perplexity"] == "249.7"
    assert mob["params - found"] == "800" and small["params - found"] == "-"  # the size gap, beside
    for name in ("curves_teacher", "curves_supernet", "curves_retrain", "curves_finetune", "pareto"):
        _assert_png(wd / "report" / f"{name}.png")
        assert f"`report/{name}.png`" in text


def test_curve_series_and_panels(tmp_path):
    wd = tmp_path / "wd"
    _complete_workdir(wd)
    metrics = report.stage_metrics(wd)
    assert list(metrics) == ["teacher", "supernet", "retrain", "finetune"]
    assert list(metrics["retrain"]) == ["small", "small_uniform_mobilebert"]  # '<model>_run' dirs
    sup = metrics["supernet"]["supernet"]
    # derived: cross-entropy = loss_sum / weight_sum, kd = kd_total / kd_count (per record)
    assert sup["train/cross_entropy"] == ([4, 8, 12], [100 * 6.0 / s / 20 for s in (4, 8, 12)])
    assert sup["train/kd"] == ([4, 8, 12], [8.0 / s / 4 for s in (4, 8, 12)])
    assert sup["eval/cross_entropy"] == ([12], [3.0])
    assert sup["cka/layer0"] == ([2, 4], [0.8, 0.9])
    titles = [t for t, _ in report._panels(metrics["supernet"])]
    assert titles == ["training objective", "cross-entropy", "distillation loss", "accuracy",
                      "learning rate", "gradient norm", "block_cka", "cka"]
    assert "distillation loss" not in [t for t, _ in report._panels(metrics["teacher"])]


def test_partial_workdir_reports_missing_stages(tmp_path, capsys):
    wd = tmp_path / "wd"
    _write(wd / "data" / "stats.json", {})
    _write(wd / "teacher" / "result.json", {"num_params": 1000, "eval": {"loss": 4.5, "perplexity": 90.0}})
    lines = _train_log([5, 10], 6.0)
    (wd / "teacher" / "metrics.jsonl").write_text(  # the last line cut by a kill
        "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 11, "train/lo')
    (wd / "supernet" / "checkpoints").mkdir(parents=True)  # a stopped supernet stage
    assert report.main([f"--workdir={wd}"]) == 0
    out = capsys.readouterr().out
    assert "teacher complete" in out and "supernet MISSING" in out
    assert "Missing stages: supernet, search, export, retrain, finetune, evaluate" in out
    assert "Teacher: 1,000 parameters, validation loss 4.5, perplexity 90." in out
    assert "No exported models yet" in out and "pareto" not in out
    _assert_png(wd / "report" / "curves_teacher.png")
    assert sorted(p.name for p in (wd / "report").iterdir()) == ["curves_teacher.png"]
    assert report.read_series(wd / "teacher" / "metrics.jsonl")["train/loss"][0] == [5, 10]


def test_not_a_workdir_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert report.main([f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an elm-jax work directory" in err
    assert report.main([f"--workdir={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("value,text", [(None, "-"), (15104, "15,104"), (5.54237, "5.542"),
                                        (123456.7, "123,457"), (math.inf, "inf"), ("x", "x")])
def test_fmt(value, text):
    assert report.fmt(value) == text


def test_report_shows_each_gain_over_the_trivial_answer_and_marks_no_gain(tmp_path):
    """Schema 2 of evaluate/result.json: the trivial answer beside every model, a model that does
    not beat it marked; the schema-1 work directory above is still read."""
    wd = tmp_path / "wd"
    _complete_workdir(wd)
    _write(wd / "evaluate" / "result.json", {
        "schema_version": 2, "task": "mlm", "split": "validation",
        "baselines": {"context_free_loss": 5.53, "bag_of_words_test_accuracy": 0.68},
        "models": {
            "small": {"kind": "found", "loss": 5.5238, "gain_nats": 5.53 - 5.5238, "perplexity": 250.6,
                      "params": 15104, "param_gap": None},
            "small_uniform_mobilebert": {"kind": "baseline_matched", "loss": 5.54, "gain_nats": 5.53 - 5.54,
                                         "perplexity": 254.7, "params": 15904, "param_gap": 800},
            "teacher": {"kind": "teacher", "loss": 5.1713, "gain_nats": 5.53 - 5.1713, "params": 27744,
                        "perplexity": 176.147}}})
    text = report.build_report(wd, plots=False)
    assert "Trivial answer on the validation split: 5.53 nats, the context-free MLM predictor" in text
    assert "Bag-of-words logistic regression, fine-tuning test accuracy: 0.68." in text
    assert "validation loss 5.171 (gain 0.3587 nats)" in text
    rows = _table(text)
    assert rows["small"]["gain (nats)"] == "0.0062" and rows["small"]["val loss (retrained)"] == "5.524"
    assert rows["small_uniform_mobilebert"]["gain (nats)"] == "-0.01 (no gain)"


def test_report_gives_the_mean_over_seeds_and_the_paired_comparisons(tmp_path):
    """A model fine-tuned with several seeds is reported with their mean, every seed and the
    from-scratch runs beside it, and each paired comparison with its interval and verdict."""
    wd = tmp_path / "wd"
    _complete_workdir(wd)
    boot = {"lo": 0.01, "hi": 0.09, "level": 0.9, "n_boot": 4000, "examples": 400, "runs_b": 1}
    _write(wd / "finetune" / "result.json", {
        "small": {"test_accuracy": 0.6, "validation_accuracy": 0.61,
                  "seeds": {"seeds": [0, 1, 2], "test_accuracy": [0.6, 0.64, 0.62], "mean_test_accuracy": 0.62,
                            "sd_test_accuracy": 0.02},
                  "scratch": {"seeds": [0, 1, 2], "test_accuracy": [0.55, 0.56, 0.57], "mean_test_accuracy": 0.56,
                              "sd_test_accuracy": 0.01},
                  "comparisons": {"pretrained_minus_scratch": boot | {"diff": 0.06, "runs_b": 3, "runs_a": 3,
                                                                      "verdict": "higher"},
                                  "minus_bag_of_words": boot | {"diff": -0.04, "lo": -0.08, "hi": 0.0,
                                                                "runs_a": 3, "verdict": "unresolved"}}},
        "small_uniform_mobilebert": {"test_accuracy": 0.5}})
    text = report.build_report(wd, plots=False)
    rows = _table(text)
    assert rows["small"]["fine-tune test acc."] == "0.62" and rows["small_uniform_mobilebert"]["fine-tune test acc."] == "0.5"
    assert "- small: pre-trained, seeds [0, 1, 2]: test accuracy 0.6000, 0.6400, 0.6200; mean 0.6200 (sd 0.0200)" in text
    assert "- small: from scratch, seeds [0, 1, 2]: test accuracy 0.5500, 0.5600, 0.5700; mean 0.5600" in text
    assert ("- small: pre-trained minus from scratch: +0.0600 accuracy, 90% paired bootstrap [+0.0100, +0.0900]"
            " over 400 test examples x 3 / 3 runs: higher") in text
    assert "- small: minus bag-of-words: -0.0400 accuracy" in text and "3 / 1 runs: unresolved" in text


def test_report_gives_each_gain_its_standard_error_and_each_baseline_comparison(tmp_path):
    wd = tmp_path / "wd"
    _complete_workdir(wd)
    noise = {"se": 0.0123, "level": 0.9}
    _write(wd / "evaluate" / "result.json", {
        "schema_version": 2, "task": "mlm", "split": "validation", "baselines": {"context_free_loss": 5.53},
        "models": {
            "small": {"kind": "found", "loss": 5.5, "gain_nats": 0.03, "params": 15104,
                      "gain_noise": noise | {"gain": 0.03, "lo": 0.0098, "hi": 0.0502, "verdict": "lower"},
                      "versus": {"small_uniform_mobilebert": {"gain": 0.004, "se": 0.003, "lo": -0.0009,
                                                              "hi": 0.0089, "level": 0.9,
                                                              "verdict": "within noise"}}},
            "small_uniform_mobilebert": {"kind": "baseline_matched", "loss": 5.504, "gain_nats": 0.026,
                                         "params": 15904, "gain_noise": noise | {
                                             "gain": 0.026, "lo": -0.004, "hi": 0.046, "verdict": "within noise"}}}})
    text = report.build_report(wd, plots=False)
    rows = _table(text)
    assert rows["small"]["gain (nats)"] == "0.03 ± 0.012"
    assert rows["small_uniform_mobilebert"]["gain (nats)"] == "0.026 ± 0.012 (within noise)"
    assert ("- small vs small_uniform_mobilebert: small_uniform_mobilebert's loss minus small's +0.0040 nats, "
            "90% paired interval [-0.0009, +0.0089]: a difference inside the noise.") in text
