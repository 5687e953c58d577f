"""bench/results_md.py: RESULTS.md is computed from the logged lines: which runs are the demo, the
verdict of each paired comparison, and the counts its sentences state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import results_md  # noqa: E402
import student_recipe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _v(gain, half=0.002):
    return {"gain": gain, "lo": gain - half, "hi": gain + half, "verdict": "x"}


def _run(seed, found_gain, matched_vs, random_vs, ratio, commit="abc1234", recipe=None, pol=None):
    models = {"small": {"kind": "found", "params": 300_000, "gain_nats": found_gain},
              "small_matched_bert": {"kind": "baseline_matched", "params": 299_000, "gain_nats": found_gain - matched_vs["gain"]},
              "small_largest_bert": {"kind": "baseline_largest", "params": 400_000, "gain_nats": found_gain + 0.01},
              "small_random": {"kind": "random_best", "params": 300_000, "gain_nats": found_gain - random_vs["gain"]},
              "teacher": {"kind": "teacher", "params": 2_000_000, "gain_nats": 1.3}}
    ft = {"small": {"mean_test_accuracy": 0.65, "scratch_test_accuracy": 0.64,
                    "comparisons": pol or {"pretrained_minus_scratch": {"diff": 0.01, "lo": -0.02, "hi": 0.04},
                                           "minus_bag_of_words": {"diff": -0.02, "lo": -0.05, "hi": 0.01}}}}
    return {"recipe": recipe or results_md.default_recipe("mlm"), "seed": seed, "commit": commit,
            "teacher_gain": 1.3, "models": models, "finetune": ft,
            "versus": {"small": {"small_matched_bert": matched_vs, "small_random": random_vs}},
            "search": {"small": {"noise_ratio": ratio}}, "archs": {"small": "b0h1 - m2h1 -"}, "tag": "t"}


def test_verdict_and_the_search_bar_follow_the_interval():
    assert results_md.verdict(_v(0.01)) == "better"
    assert results_md.verdict(_v(-0.01)) == "worse"
    assert results_md.verdict(_v(0.001)) == "inside the noise"
    assert results_md.verdict(None) == "-"
    assert results_md.meets_search_target(_v(0.01))           # ahead beyond the noise
    assert results_md.meets_search_target(_v(0.001))          # inside the noise, mean ahead
    assert not results_md.meets_search_target(_v(-0.001))     # inside the noise, mean behind
    assert not results_md.meets_search_target(_v(-0.01))


def test_the_demo_is_the_latest_line_per_seed_at_the_defaults():
    other_recipe = {**results_md.default_recipe("mlm"), "supernet.train.steps": 7}
    old = _run(1, 0.9, _v(-0.01), _v(0.05), 4.0, commit="old0001")
    new = _run(1, 1.1, _v(-0.01), _v(0.05), 4.0, commit="new0001")
    lines = [_run(2, 1.0, _v(0.01), _v(0.05), 6.0), old, _run(0, 1.0, _v(0.0), _v(0.05), 5.0, recipe=other_recipe),
             new, {**_run(0, 1.0, _v(0.0), _v(0.05), 5.0), "reused": "/x"}]
    demo, other = results_md.split_runs(lines)
    assert [r["seed"] for r in demo["mlm"]] == [1, 2] and demo["mlm"][0]["commit"] == "new0001"
    assert len(other) == 2  # the changed recipe and the fine-tuning-only rerun
    assert "supernet.train.steps=7" in results_md.other_table(other)


def test_a_field_added_to_the_recipe_later_counts_as_its_default():
    """A line logged before ``space.head_choices`` joined the recipe is still the demo; a line
    that set it is not, and the table says what it changed."""
    defaults = results_md.default_recipe("mlm")
    assert defaults["space.head_choices"] == []  # as a JSON line holds ()
    old = {k: v for k, v in defaults.items() if k != "space.head_choices"}
    heads4 = {**defaults, "space.head_choices": [4]}
    demo, other = results_md.split_runs([_run(0, 1.0, _v(0.0), _v(0.05), 5.0, recipe=old),
                                         _run(1, 1.0, _v(0.0), _v(0.05), 5.0, recipe=heads4)])
    assert [r["seed"] for r in demo["mlm"]] == [0] and [r["seed"] for r in other] == [1]
    assert "space.head_choices=[4]" in results_md.other_table(other)


def test_a_field_whose_default_changed_counts_as_what_older_lines_ran():
    """A line logged before ``supernet.paths_per_device`` joined the recipe ran one architecture
    per device: against a default of 4 it is not the demo, and the table says so."""
    defaults = results_md.default_recipe("mlm")
    assert defaults["supernet.paths_per_device"] == 4 and defaults["supernet.sandwich"] is True
    old = {k: v for k, v in defaults.items() if k != "supernet.paths_per_device"}
    demo, other = results_md.split_runs([_run(0, 1.0, _v(0.0), _v(0.05), 5.0, recipe=old)])
    assert not demo.get("mlm") and "supernet.paths_per_device=1" in results_md.other_table(other)
    assert results_md.changed_fields(old, {**defaults, "supernet.paths_per_device": 1}) == {}


def test_a_recipe_line_reads_against_the_run_it_departs_from():
    """The run whose work directory it reused; else the run of its seed whose recipe differs only
    in what its overrides set; else the demo of its seed."""
    defaults = results_md.default_recipe("mlm")
    base = {**_run(0, 1.0, _v(0.0), _v(0.0), 5.0, recipe={**defaults, "supernet.sandwich": False}),
            "workdir": "/w/base", "tag": "base"}
    other_seed = {**base, "seed": 1, "workdir": "/w/s1"}
    demo = {"mlm": [_run(0, 1.2, _v(0.0), _v(0.0), 5.0)]}
    reused = {**_run(0, 1.1, _v(0.0), _v(0.0), 5.0), "reused": "/w/base"}
    assert results_md.departed_from(reused, [base, other_seed], demo) is base
    full = {**_run(0, 1.1, _v(0.0), _v(0.0), 5.0), "overrides": ["supernet.sandwich=True", "finetune.seeds=1"]}
    assert results_md.departed_from(full, [base, other_seed], demo) is base
    full_s1 = {**full, "seed": 1}
    assert results_md.departed_from(full_s1, [base, other_seed], demo) is other_seed
    unrelated = {**full, "overrides": ["search.eval_batches=8"]}  # differs from base in what it did not set
    assert results_md.departed_from(unrelated, [base, other_seed], demo) is demo["mlm"][0]
    row = results_md.search_recipe_table([reused], demo, [base, other_seed]).splitlines()[-1]
    assert "base: `b0h1 - m2h1 -` +1.000" in row


def test_the_sentences_count_what_the_runs_show():
    runs = [_run(0, 1.07, _v(0.01), _v(0.05), 5.7),     # ahead of matched
            _run(1, 1.12, _v(-0.011), _v(0.058), 4.8),  # behind matched
            _run(2, 0.40, _v(0.001), _v(-0.01), 6.0)]   # inside the noise, ahead; random better
    text = "\n".join(results_md.demo_findings(runs, "mlm"))
    assert "+0.400 to +1.120 nats" in text and "bar 0.5: met on 2 of 3" in text
    assert "uniform BERT, the found model is better on 1, worse on 1 and inside the noise on 1 of the 3" in text
    matched = next(s for s in text.splitlines() if "size-matched" in s)
    assert "met on 2 of 3" in matched
    random = next(s for s in text.splitlines() if "random search" in s)
    assert "better on 2, worse on 1" in random and "met on 2 of 3" in random
    assert "4.8x to 6.0x" in text and "met on 2 of 3" in text.splitlines()[-3]
    table = results_md.demo_table(runs, "mlm")
    assert "`b0h1 - m2h1 -` 300,000" in table and "-0.011 [-0.013, -0.009] worse" in table
    assert "0.650 / 0.640 / 0.670" in table  # bag-of-words = found minus (found - BoW)


def test_archs_are_read_from_the_export(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "result.json").write_text(json.dumps(
        {"small": {"describe": "b0h1 - m2h1 -", "params": 1}, "small_random": {"describe": "- m1h4 b1h2 -"}}))
    assert student_recipe.archs_of(tmp_path) == {"small": "b0h1 - m2h1 -", "small_random": "- m1h4 b1h2 -"}
    assert student_recipe.archs_of(tmp_path / "missing") == {}


def test_the_committed_results_md_is_what_the_script_writes(tmp_path):
    out = tmp_path / "R.md"
    subprocess.run([sys.executable, os.path.join(REPO, "bench", "results_md.py"), f"--out={out}"],
                   check=True, capture_output=True)
    with open(os.path.join(REPO, "RESULTS.md")) as f:
        assert out.read_text() == f.read(), "RESULTS.md is stale: run python bench/results_md.py"


def test_a_new_student_recipe_line_rewrites_results_md(tmp_path, monkeypatch):
    """A run of bench/student_recipe.py appends its line and RESULTS.md is written from it at once
    (the pipeline itself is replaced by the line it would log); --report-only leaves it alone."""
    log, out = tmp_path / "student_recipe.jsonl", tmp_path / "RESULTS.md"
    line = {**_run(3, 1.234, _v(0.02), _v(0.05), 6.0), "cf": 5.3, "total_s": 1.0, "config": "configs/mlm.py:demo",
            "overrides": [], "date": "2026-12-07", "stages_s": {}, "supernet_curve": []}
    monkeypatch.setattr(student_recipe, "LOG", log)
    monkeypatch.setattr(student_recipe, "run_seed", lambda *a, **k: line)
    monkeypatch.setattr(student_recipe, "render", lambda records, *a: "\n### x\n")
    monkeypatch.setattr(results_md, "RESULTS", tmp_path)
    monkeypatch.setattr(results_md, "OUT", out)
    monkeypatch.setattr(sys, "argv", ["student_recipe.py", "--seeds", "3", f"--out={tmp_path / 'B.md'}"])
    student_recipe.main()
    text = out.read_text()
    assert "| 3 | abc1234 |" in text and "+1.234" in text
    assert text == results_md.render([line], [], [])
    out.unlink()
    monkeypatch.setattr(sys, "argv", ["student_recipe.py", "--report-only", f"--out={tmp_path / 'B.md'}"])
    student_recipe.main()
    assert not out.exists()


def test_a_search_recipe_reads_against_the_demo_of_its_seed():
    defaults = results_md.default_recipe("mlm")
    demo = {"mlm": [_run(2, 1.038, _v(-0.066), _v(-0.059), 6.8), _run(1, 1.12, _v(-0.011), _v(0.058), 4.8)]}
    heads4 = _run(2, 1.101, _v(0.004), _v(0.03), 6.0, recipe={**defaults, "space.head_choices": [4]})
    table = results_md.search_recipe_table([heads4], demo)
    row = [line for line in table.splitlines() if "space.head_choices=[4]" in line]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[3] == "2" and cells[6] == "+1.101"
    assert cells[7] == "+0.004 [+0.002, +0.006] better" and cells[8].endswith("better")
    assert cells[9] == "t: `b0h1 - m2h1 -` +1.038; vs matched -0.066 [-0.068, -0.064] worse"  # seed 2's demo
    older = {k: v for k, v in defaults.items() if k != "space.families"}  # a recipe before the field
    bert_only = {**_run(2, 1.1, _v(0.0), _v(0.0), 6.0, recipe=older), "overrides": ['space.families=("bert",)', "finetune.seeds=3",
                                                                   "search.random_control=True"]}
    row = results_md.search_recipe_table([bert_only], demo).splitlines()[-1]
    assert 'space.families=("bert",)' in row and "finetune" not in row and "random_control" not in row
    rerun = {**heads4, "reused": "/x/w", "stages": "retrain,finetune,evaluate"}
    assert "; only retrain,finetune,evaluate, on the earlier stages of the demo run" in results_md.search_recipe_table([rerun], demo)
    text = results_md.render(demo["mlm"], [], [], [heads4])
    assert "## What makes the found model lose?" in text and "space.head_choices=[4]" in text
    flipped = not defaults["supernet.sandwich"]
    sandwich = {**_run(0, 1.1, _v(0.0), _v(0.0), 6.0, recipe={**defaults, "supernet.sandwich": flipped}),
                "host_devices": 4}
    row = results_md.search_recipe_table([sandwich], demo).splitlines()[-1]
    assert f"supernet.sandwich={flipped}, on 4 CPU devices" in row


def test_a_run_on_split_host_devices_is_not_the_demo():
    """The demo's figures come from the machine's own devices: a line run with the host platform
    split (``--host-devices``) is a recipe, even at the default config."""
    demo, other = results_md.split_runs([{**_run(0, 1.0, _v(0.0), _v(0.0), 5.0), "host_devices": 4}])
    assert not demo.get("mlm") and len(other) == 1
    assert "on 4 CPU devices" in results_md.other_table(other)


def test_student_recipe_log_search_recipe_writes_its_own_log_and_section(tmp_path, monkeypatch):
    log = tmp_path / "student_recipe.jsonl"
    line = {**_run(2, 1.1, _v(0.004), _v(0.03), 6.0), "cf": 5.3, "total_s": 1.0, "config": "configs/mlm.py:demo",
            "overrides": ["space.head_choices=(4,)"], "date": "2026-12-07", "stages_s": {}, "supernet_curve": [],
            "search": {}, "finetune": {}}
    monkeypatch.setattr(student_recipe, "LOG", log)
    monkeypatch.setattr(student_recipe, "run_seed", lambda *a, **k: line)
    monkeypatch.setattr(results_md, "RESULTS", tmp_path)
    monkeypatch.setattr(results_md, "OUT", tmp_path / "RESULTS.md")
    out = tmp_path / "B.md"
    monkeypatch.setattr(sys, "argv", ["student_recipe.py", "--log", "search_recipe", "--seeds", "2", f"--out={out}"])
    student_recipe.main()
    assert not log.exists() and json.loads((tmp_path / "search_recipe.jsonl").read_text()) == line
    assert "### Search recipes" in out.read_text() and "### Student recipes" not in out.read_text()
    assert "--log search_recipe" in out.read_text()
    assert "## What makes the found model lose?" in (tmp_path / "RESULTS.md").read_text()


def test_the_rank_section_states_spans_ranks_and_a_constant_ranking():
    """A near-equal group of equal parameters has no parameter ranking (shown as such, not NaN);
    the architecture table's ranks are each column's own order."""
    import supernet_rank

    archs = [{"describe": f"a{i}", "params": p, "fitness": f, "retrained_loss": l, "near": n}
             for i, (p, f, l, n) in enumerate([(300, 4.31, 4.30, True), (300, 4.32, 4.25, True),
                                               (300, 4.33, 4.27, True), (200, 4.40, 4.35, False),
                                               (400, 4.35, 4.28, False)])]
    cols = lambda rows: ([a["fitness"] for a in rows], [a["retrained_loss"] for a in rows],  # noqa: E731
                         [a["params"] for a in rows])
    near = [a for a in archs if a["near"]]
    rec = {"config": "c", "source": "/x/run/w", "commit": "abc1234", "near_frac": 0.05, "archs": archs,
           "all": supernet_rank.rank_stats(*cols(archs), 50), "near": supernet_rank.rank_stats(*cols(near), 50)}
    text = results_md.rank_section([rec])
    assert "- (constant over the group)" in text and "nan" not in text
    assert "their fitness spans 0.0200 nats, their retrained loss 0.0500" in text
    assert "| `a1` | 300 | 4.3200 | 4.2500 | 2 | 1 | yes |" in text  # 2nd by fitness, 1st retrained
    assert "- (constant over the group)" in supernet_rank.render([{**rec, "overrides": [], "budget": "b",
                                                                    "process_s": 1.0, "near_params": [300, 300],
                                                                    "date": "d", "cf": 5.0}])


def test_the_retrained_loss_is_grouped_by_the_family_at_each_end():
    archs = [{"describe": d, "retrained_loss": l} for d, l in
             (("b0h4 - m2h4 -", 4.25), ("- - m0h4 b2h1", 4.32), ("m0h1 b2h1 - -", 4.33), ("b0h4 b0h4 - - ffn=128", 4.26))]
    assert results_md._families("b0h4 - m2h1 - ffn=128") == ["bert", "mobilebert"]
    assert results_md._by_end_family(archs) == ("first layer bert 4.2550 (n=2), mobilebert 4.3250 (n=2); "
                                                "last layer bert 4.3033 (n=3), mobilebert 4.2500 (n=1)")


def test_the_first_family_finding_groups_each_set_of_models_once():
    a = _run(1, 1.12, _v(-0.011), _v(0.058), 4.8)  # b0h1 - m2h1 -: bert first
    b = {**_run(2, 1.038, _v(-0.066), _v(-0.059), 6.8), "archs": {"small": "- - m0h4 b2h1"}}
    rerun = {**b, "reused": "/x"}  # the same models again: counted once
    text = results_md.first_family_finding([a, b, rerun])
    assert "bert mean -0.011 nats, range -0.011 to -0.011 (n=1)" in text
    assert "mobilebert mean -0.066 nats, range -0.066 to -0.066 (n=1)" in text
    assert results_md.first_family_finding([{**a, "archs": {}}]) is None


def test_the_rerank_rule_section_lists_each_level_and_side():
    cand = lambda d, loss, se, tied: {"arch_id": d, "describe": d, "fitness": 4.3, "short_loss": loss,  # noqa: E731
                                      "short_se": se, "tied": tied}
    side = lambda pick, run, fit, cands: {"pick": pick, "describe": pick, "run_pick": run,  # noqa: E731
                                          "same_as_run": pick == run, "fitness_best": fit, "candidates": cands}
    line = {"source": "search_recipe:rerank4", "seed": 1, "levels": {
        "0.9": {"small": {"found": side("a", "b", "a", [cand("a", 4.2401, 0.0006, True), cand("b", 4.2393, 0.0, True)])}},
        "0.0": {"small": {"found": side("b", "b", "a", [cand("a", 4.2401, 0.0006, False), cand("b", 4.2393, 0.0, True)])}}}}
    rows = [x for x in results_md.rerank_rule_section([line]).splitlines() if x.startswith("| search_recipe")]
    assert len(rows) == 2 and "| 0 |" in rows[0] and "| 0.9 |" in rows[1]  # levels in order
    assert "| `b` | yes | no |" in rows[0] and "| `a` | no | yes |" in rows[1]
    assert "`a` 4.2401 ± 0.0006*, `b` 4.2393 ± 0.0000*" in rows[1]
    assert "### The re-ranking rule at other tie levels" in results_md.render([], [], [], [], [line])
    assert "re-ranking rule" not in results_md.render([], [], [], [], [])


def test_a_rule_pick_already_retrained_by_the_demo_run_reads_its_verdict():
    demo_run = {**_run(1, 1.12, _v(-0.011), _v(0.058), 4.8), "workdir": "/w/demo"}
    rr = {**_run(1, 1.109, _v(-0.026), _v(-0.011), 4.8), "tag": "rerank4", "workdir": "/w/rr", "reused": "/w/demo",
          "archs": {"small": "b0h1 - m2h2 m0h4"}}
    rr["models"]["small"]["loss"], rr["models"]["small_random"]["loss"] = 4.2522, 4.2411
    demo_run["models"]["small"]["loss"] = 4.2419
    x = lambda pick, same: {"pick": pick, "describe": pick, "same_as_run": same, "fitness_best": "b0h1 - m2h1 -",  # noqa: E731
                            "run_pick": "b0h1 - m2h2 m0h4", "candidates": []}
    rule = {"source": "search_recipe:rerank4", "seed": 1, "workdir": "/w/rr", "levels": {
        "0.0": {"small": {"found": x("b0h1 - m2h2 m0h4", True), "random": x("r", True)}},
        "0.9": {"small": {"found": x("b0h1 - m2h1 -", False), "random": x("r", True)}}}}
    (line,) = results_md.rerank_rule_findings([rule], [rr], {"mlm": [demo_run]})
    assert "tie level 0.9" in line and "`b0h1 - m2h1 -`" in line and "the demo run of this seed" in line
    assert "-0.011 [-0.013, -0.009] worse" in line  # the demo run's own paired verdict
    assert "-0.0008 (unpaired: two runs)" in line  # 4.2411 - 4.2419
    rule["workdir"] = "/elsewhere"  # not the logged run's trainings: nothing is claimed
    assert results_md.rerank_rule_findings([rule], [rr], {"mlm": [demo_run]}) == []
