"""bench/teacher_recipe.py: a logged line is read from the run's own files (gain = the data stage's
context-free answer minus the teacher's validation loss) and its recipe is the resolved config."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import teacher_recipe  # noqa: E402


def test_a_finished_work_directory_logs_its_own_figures(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "teacher").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps(
        {"task": "mlm", "baselines": {"validation": {"context_free_loss": 5.25, "weight_sum": 10.0}}}))
    (tmp_path / "teacher" / "result.json").write_text(json.dumps(
        {"eval": {"loss": 4.75, "correct": 0.2}, "train": {"steps": 30, "wall_time_s": 12.5}}))
    (tmp_path / "teacher" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "train/loss": 6.0}, {"step": 20, "eval/loss": 5.5, "eval/correct": 0.1},
        {"step": 30, "eval/loss": 4.75, "eval/correct": 0.2})) + "\n")
    rec = teacher_recipe.record_of(tmp_path, "configs/mlm.py:demo", 0, ["data.corpus=movie_reviews"],
                                   "t", None, 12.5, None)
    assert rec["gain"] == pytest.approx(0.5) and rec["cf"] == 5.25 and rec["loss"] == 4.75
    assert rec["curve"] == [[20, 5.5, 0.1], [30, 4.75, 0.2]] and rec["steps"] == 30
    assert rec["recipe"]["data.corpus"] == "movie_reviews" and rec["recipe"]["task"] == "mlm"
    assert rec["recipe"]["teacher.train.steps"] == 2000  # the demo's, resolved from the config
    assert rec["reused"] is False


def test_overrides_take_the_type_of_the_field_they_replace():
    """A tuple field reads its value as a Python literal, as ``--config.space.head_choices=(4,)``
    does on the command line; bools, ints and floats as before."""
    rec = teacher_recipe.resolved_recipe(
        "configs/mlm.py:demo", ["space.head_choices=(4,)", "supernet.sandwich=True", "search.eval_batches=8",
                                "data.mask_rate=0.25"],
        fields=("space.head_choices", "supernet.sandwich", "search.eval_batches", "data.mask_rate"))
    assert rec == {"space.head_choices": (4,), "supernet.sandwich": True, "search.eval_batches": 8,
                   "data.mask_rate": 0.25}
    assert teacher_recipe.resolved_recipe("configs/mlm.py:demo", [], fields=("space.head_choices",)) == \
        {"space.head_choices": ()}
