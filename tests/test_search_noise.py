"""bench/search_noise.py: the copy holds what the search reads and nothing after it, the logged
figures are the search stage's own, and the BENCHMARKS section is written from the lines."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import search_noise  # noqa: E402


def _finished(root):
    for rel in ("data/stats.json", "teacher/result.json", "supernet/result.json", "supernet/final/w.bin",
                "search/result.json", "export/result.json", "retrain/result.json", "fingerprints.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")


def test_copy_upstream_keeps_the_supernet_and_drops_the_search_and_after(tmp_path):
    src = tmp_path / "src"
    _finished(src)
    dest = tmp_path / "dest"
    search_noise.copy_upstream(src, dest)
    assert (dest / "supernet/final/w.bin").is_file() and (dest / "fingerprints.json").is_file()
    assert (dest / "data/stats.json").is_file() and (dest / "teacher/result.json").is_file()
    assert not any((dest / s).exists() for s in ("search", "export", "retrain"))
    (src / "supernet/result.json").unlink()
    with pytest.raises(SystemExit, match="no trained supernet"):
        search_noise.copy_upstream(src, tmp_path / "dest2")


def test_noise_is_read_from_the_search_result_and_rendered(tmp_path):
    noise = {"candidates": 49, "paired_se": 0.0015, "range": 0.0238, "ratio": 4.3, "rows": 512,
             "se": 0.0225, "spread": 0.00645}
    (tmp_path / "search").mkdir()
    (tmp_path / "search/result.json").write_text(json.dumps({
        "eval_batches": 16, "budgets": {"small": {"noise": noise, "describe": "b0h2 - - b2h4",
                                                  "score": 4.3036, "params": 1}}}))
    got = search_noise.noise_of(tmp_path)
    assert got["eval_batches"] == 16
    assert got["budgets"]["small"] == {**noise, "describe": "b0h2 - - b2h4", "score": 4.3036}
    rec = {"date": "2026-12-07", "commit": "abc1234", "config": "configs/mlm.py:demo",
           "source": "/tmp/x/run_a/w", "process_s": 57.2, **got}
    text = search_noise.render([rec])
    row = [line for line in text.splitlines() if line.startswith("| configs/mlm.py:demo")]
    assert row == ["| configs/mlm.py:demo | run_a | small | 16 | 512 | 49 | 0.0065 | 0.0238 | 0.0015 | 4.3x "
                   "| `b0h2 - - b2h4` 4.3036 | 57 | abc1234 |"]
