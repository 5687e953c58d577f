"""bench/make_run_cost.py writes the README's cost and results blocks from its result lines, never
from numbers typed by hand: the figures in the blocks are those of the latest line per config."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import make_run_cost  # noqa: E402


def _run(total: float, teacher_s: float, reused: bool, gain: float) -> dict:
    return {"total_s": total, "stages": {"data": 10.0, "teacher": teacher_s, "supernet": 60.0},
            "teacher_reused": reused, "teacher_gain_nats": gain,
            "teacher": {"trivial_loss": 6.0, "gain_nats": gain, "learned": True, "loss": 6.0 - gain,
                        "accuracy": 0.25, "steps": 2000},
            "evaluate": {"split": "validation", "baselines": {"context_free_loss": 6.0},
                         "models": {"found_small": {"loss": 6.4, "accuracy": 0.1, "gain_nats": -0.4,
                                                    "params": 1000}}}}


def _line(commit: str, total: float, gain: float) -> dict:
    return {"date": "2026-12-04", "commit": commit, "config": "configs/mlm.py", "machine": "cpu, 2 cores",
            "cold": _run(total, 570.0, False, gain), "cached_teacher": _run(300.0, 4.0, True, gain)}


@pytest.fixture
def files(tmp_path, monkeypatch):
    log = tmp_path / "make_run_cost.jsonl"
    log.write_text(json.dumps(_line("0ldc0mm", 999.0, 0.5)) + "\n" + json.dumps(_line("abc1234", 1200.0, 1.25)) + "\n")
    monkeypatch.setattr(make_run_cost, "LOG", log)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{make_run_cost.BEGIN}\nstale\n{make_run_cost.END}\nmiddle\n"
                      f"{make_run_cost.RESULTS_BEGIN}\n{make_run_cost.RESULTS_END}\nend\n")
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\n### Other (2026-01-01)\n\nkept\n")
    return readme, bench


def test_blocks_carry_the_latest_line_and_are_replaced_in_place(files):
    readme, bench = files
    make_run_cost.report(readme, bench)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "**20.0 min cold**" in text and "teacher trained: 9.5 min" in text  # 1200 s, 570 s
    assert "**5.0 min**" in text and "teacher stage 4 s, reused: true" in text
    assert "abc1234" in text and "0ldc0mm" not in text  # only the latest line of the config
    assert "a gain of **+1.250 nats**" in text and "`found_small` (1,000 parameters) 6.400 (-0.400)" in text
    assert "trivial answer 6.000" in text
    b = bench.read_text()
    assert "kept" in b and f"### {make_run_cost.TITLE} (2026-12-04 (abc1234))" in b
    assert "| configs/mlm.py | cold | 1200 | 10 | 570 | 60 | false | +1.250 |" in b
    make_run_cost.report(readme, bench)  # idempotent: one block each, same text
    assert readme.read_text() == text and bench.read_text() == b


def test_missing_block_is_refused(files):
    readme, bench = files
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="has no <!-- make-run-cost -->"):
        make_run_cost.report(readme, bench)
