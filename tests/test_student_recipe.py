"""bench/student_recipe.py: the figures it logs are read from a run's own files, and the BENCHMARKS
section is written from the logged lines, never typed."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import student_recipe  # noqa: E402


def test_search_fitness_is_the_spread_of_every_scored_candidate(tmp_path):
    scores = {"a": 4.31, "b": 4.27, "c": 4.40, "d": 4.29}
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "state_small.json").write_text(json.dumps({"cache": scores, "history": []}))
    fit = student_recipe.search_fitness(tmp_path)
    assert set(fit) == {"small"}
    assert fit["small"]["scored"] == 4 and fit["small"]["best"] == pytest.approx(4.27)
    assert fit["small"]["range"] == pytest.approx(4.40 - 4.27)
    assert fit["small"]["sd"] == pytest.approx(statistics.stdev(scores.values()))
    assert "noise_ratio" not in fit["small"]  # no search/result.json: nothing claimed
    noise = {"paired_se": 0.004, "ratio": 12.5}
    (tmp_path / "search" / "result.json").write_text(json.dumps({"budgets": {"small": {"noise": noise}}}))
    fit = student_recipe.search_fitness(tmp_path)
    assert fit["small"]["paired_se"] == 0.004 and fit["small"]["noise_ratio"] == 12.5


def test_curve_reads_only_evaluation_records(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [{"step": 10, "train/loss": 6.0},
                                                    {"step": 500, "eval/loss": 4.7},
                                                    {"step": 1000, "eval/loss": 4.5, "eval/gain": 0.8}]))
    assert student_recipe.curve_of(m) == [[500, 4.7], [1000, 4.5]]
    assert student_recipe.curve_of(tmp_path / "missing.jsonl") == []


def _record(seed: int, found_gain: float) -> dict:
    return {"date": "2026-12-05", "commit": "abc1234", "config": "configs/mlm.py:demo",
            "overrides": ["supernet.train.steps=1500"], "seed": seed,
            "recipe": {"task": "mlm", "supernet.train.steps": 1500, "retrain.train.steps": 600},
            "stages_s": {"data": 9.0, "teacher": 4.0, "supernet": 480.0, "retrain": 300.0},
            "total_s": 900.0, "cf": 5.363,
            "models": {"teacher": {"kind": "teacher", "gain_nats": 1.214},
                       "found_small": {"kind": "found", "gain_nats": found_gain},
                       "small_matched_bert": {"kind": "baseline_matched", "gain_nats": 1.131}},
            "supernet_curve": [[500, 4.685], [1500, 4.4]],
            "search": {"small": {"scored": 49, "best": 4.273, "range": 0.035, "sd": 0.01,
                                 **({"noise_ratio": 2.5} if seed else {})}},
            "finetune": {"found_small": {"test_accuracy": 0.6125, "scratch_test_accuracy": None} if not seed else
                         {"test_accuracy": 0.6125, "mean_test_accuracy": 0.62, "scratch_test_accuracy": 0.55,
                          "seed_accuracies": [0.6125, 0.63, 0.6175],
                          "comparisons": {"pretrained_minus_scratch": {"diff": 0.07, "lo": 0.031, "hi": 0.11,
                                                                       "level": 0.9, "verdict": "higher"}}}}}


def test_section_is_written_from_the_lines(tmp_path, monkeypatch):
    log = tmp_path / "student_recipe.jsonl"
    log.write_text("".join(json.dumps(_record(s, g)) + "\n" for s, g in ((0, 1.0873), (1, 0.9121))))
    monkeypatch.setattr(student_recipe, "LOG", log)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n### Other (2026-01-01)\n\nkept\n")
    monkeypatch.setattr(sys, "argv", ["student_recipe.py", "--report-only", f"--out={out}"])
    student_recipe.main()
    text = out.read_text()
    assert "### Other (2026-01-01)\n\nkept" in text and text.count("### Student recipes") == 1
    section = text[text.index("### Student recipes"):]
    for figure in ("+1.087", "+0.912", "small_matched_bert +1.131", "best 4.273, range 0.035 over 49",
                   "range 0.035 over 49, sd / paired SE 2.5x", "retrain.train.steps=600",
                   "found_small 0.613", "supernet 480 / retrain 300", "4.685@500 / 4.400@1500",
                   "found_small 0.620 (mean of 3 seeds), scratch 0.550; pre-trained minus from scratch "
                   "+0.070 [+0.031, +0.110]"):
        assert figure in section, figure
    student_recipe.main()  # rewritten in place, not appended
    assert out.read_text().count("### Student recipes") == 1


def test_finetune_figures_read_seeds_scratch_and_comparisons(tmp_path):
    ft = {"small": {"test_accuracy": 0.6, "validation_accuracy": 0.6,
                    "seeds": {"test_accuracy": [0.6, 0.64], "mean_test_accuracy": 0.62},
                    "scratch": {"test_accuracy": [0.5, 0.52], "mean_test_accuracy": 0.51},
                    "scratch_test_accuracy": 0.51,
                    "comparisons": {"minus_bag_of_words": {"diff": -0.04, "lo": -0.07, "hi": -0.01, "level": 0.9,
                                                           "verdict": "lower", "n_boot": 4000}}},
          "small_matched_bert": {"test_accuracy": 0.58}, "teacher": {"task": "polarity"}}
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "result.json").write_text(json.dumps(ft))
    got = student_recipe.finetune_accuracies(tmp_path)
    assert set(got) == {"small", "small_matched_bert"}
    assert got["small"]["mean_test_accuracy"] == 0.62 and got["small"]["seed_accuracies"] == [0.6, 0.64]
    assert got["small"]["scratch_test_accuracy"] == 0.51 and got["small"]["scratch_accuracies"] == [0.5, 0.52]
    assert got["small"]["comparisons"] == {"minus_bag_of_words": {"diff": -0.04, "lo": -0.07, "hi": -0.01,
                                                                  "level": 0.9, "verdict": "lower"}}
    assert got["small_matched_bert"] == {"test_accuracy": 0.58, "scratch_test_accuracy": None,
                                         "mean_test_accuracy": 0.58}


def test_reuse_copies_a_finished_workdir_without_the_stages_to_run(tmp_path):
    src = tmp_path / "src"
    for rel in ("supernet/final/x.safetensors", "finetune/result.json", "evaluate/result.json",
                "report/curves.png", "report.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("{}")
    dest = tmp_path / "dest"
    student_recipe.reuse_workdir(src, dest, "finetune,evaluate")
    assert (dest / "supernet/final/x.safetensors").is_file()
    assert not any((dest / p).exists() for p in ("finetune", "evaluate", "report", "report.md"))
    assert (src / "finetune/result.json").is_file()  # the source is untouched
    with pytest.raises(SystemExit, match="--stages=search,export,retrain,finetune,evaluate"):
        student_recipe.reuse_workdir(src, tmp_path / "dest3", "search")  # export... would be stale
    (src / "evaluate/result.json").unlink()
    with pytest.raises(SystemExit, match="not a finished work directory"):
        student_recipe.reuse_workdir(src, tmp_path / "dest2", "finetune,evaluate")


def test_the_recipe_logged_is_the_one_the_run_used(tmp_path):
    """The recipe comes from the run's own fingerprints.json, not from the config file as it is
    when the run ends (edited meanwhile: the search's batches here)."""
    fields = {f: i for i, f in enumerate(student_recipe.RECIPE_FIELDS)}
    names = list(fields)
    stages = {"supernet": {"fields": {k: fields[k] for k in names[:5]}},
              "search": {"fields": {k: fields[k] for k in names[5:]}}}
    (tmp_path / "fingerprints.json").write_text(json.dumps({"stages": stages, "version": 1}))
    assert student_recipe.recipe_of_workdir(tmp_path) == fields
    del stages["search"]["fields"][names[-1]]
    (tmp_path / "fingerprints.json").write_text(json.dumps({"stages": stages, "version": 1}))
    assert student_recipe.recipe_of_workdir(tmp_path) is None  # incomplete: the resolved config instead
    assert student_recipe.recipe_of_workdir(tmp_path / "missing") is None
    # the logged recipe keeps every recorded field and takes the missing one from the config
    logged = student_recipe.logged_recipe(tmp_path, "configs/mlm.py:demo", [f"{names[-1]}=0.5"])
    assert logged == {**fields, names[-1]: 0.5}


def test_versus_reads_each_found_model_against_its_baselines(tmp_path):
    v = {"gain": 0.05, "se": 0.001, "lo": 0.048, "hi": 0.052, "level": 0.9, "verdict": "lower"}
    ev = {"models": {"small": {"kind": "found", "versus": {"small_random": v}},
                     "small_matched_bert": {"kind": "baseline_matched"}, "teacher": {"kind": "teacher"}}}
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "result.json").write_text(json.dumps(ev))
    assert student_recipe.versus_of(tmp_path) == {
        "small": {"small_random": {"gain": 0.05, "lo": 0.048, "hi": 0.052, "verdict": "lower"}}}
    assert student_recipe.versus_of(tmp_path / "missing") == {}


def test_fill_archs_adds_the_exported_architectures_to_older_lines(tmp_path, monkeypatch):
    """A line logged before ``archs`` was recorded gains them from its work directory's export;
    a line that has them, or whose work directory is gone, is left as it was."""
    w = tmp_path / "w"
    (w / "export").mkdir(parents=True)
    (w / "export" / "result.json").write_text(json.dumps(
        {"small": {"describe": "- - m0h4 b2h1", "params": 1}, "small_matched_bert": {"describe": "b0h4 b0h4 - - ffn=128"}}))
    old = {**_record(2, 1.0), "workdir": str(w)}
    has = {**_record(1, 1.0), "workdir": str(w), "archs": {"small": "x"}}
    gone = {**_record(0, 1.0), "workdir": str(tmp_path / "gone")}
    log = tmp_path / "student_recipe.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (old, has, gone)))
    monkeypatch.setattr(student_recipe, "LOG", log)
    monkeypatch.setattr(student_recipe, "render", lambda records, *a: "\n### Student recipes\n")
    import results_md
    monkeypatch.setattr(results_md, "write", lambda *a, **k: "")
    monkeypatch.setattr(sys, "argv", ["student_recipe.py", "--fill-archs", f"--out={tmp_path / 'B.md'}"])
    student_recipe.main()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[0]["archs"] == {"small": "- - m0h4 b2h1", "small_matched_bert": "b0h4 b0h4 - - ffn=128"}
    assert lines[0] == {**old, "archs": lines[0]["archs"]}
    assert lines[1] == has and lines[2] == gone


def test_host_devices_env_splits_the_cpu_and_replaces_an_earlier_count():
    env = student_recipe.host_devices_env(4, {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
                                              "HOME": "/h"})
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
    assert env["HOME"] == "/h"
    code = "import jax; print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], env=student_recipe.host_devices_env(3),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"
