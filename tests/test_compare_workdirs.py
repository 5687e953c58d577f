"""scripts/compare_workdirs.py on tiny fake work directories (no JAX pipeline, seconds)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_workdirs.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("compare_workdirs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cw = _load_script()

TENSORS = {"embed.word": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
           "head.bias": np.linspace(-1, 1, 5, dtype=np.float32)}


def make_workdir(root: Path) -> Path:
    """A miniature work directory: JSON with nested floats and the work-dir path, JSONL,
    safetensors, a binary file, a report and files the comparison ignores."""
    (root / "teacher" / "model").mkdir(parents=True)
    (root / "export").mkdir()
    (root / "data").mkdir()
    (root / "teacher" / "tb").mkdir()
    summary = {"name": "teacher", "eval": {"loss": 5.171321681288422, "perplexity": float("nan")},
               "train": {"loss": 5.2, "grad_norm": 1.3}, "train_time_s": 8.45, "wall_time_s": 8.88,
               "tokens_per_s": 605.6}
    (root / "teacher" / "summary.json").write_text(json.dumps(summary))
    (root / "export" / "result.json").write_text(json.dumps(
        {"small": {"params": 14064, "measured_latency_ms": 0.505, "predicted_latency_ms": None,
                   "path": str(root / "export" / "small")}}))
    lines = [{"step": 5, "train/loss": 5.51}, {"step": 10, "eval/loss": 5.29}]
    (root / "teacher" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    save_file(TENSORS, str(root / "teacher" / "model" / "model.safetensors"))
    (root / "data" / "spm.model").write_bytes(bytes(range(256)) * 4)
    (root / "report.md").write_text(
        f"# elm-jax report: {root}\n\n"
        "| model | params | meas. latency ms | val loss |\n|---|---|---|---|\n"
        "| small | 14,064 | 0.5052 | 5.526 |\n")
    (root / ".lock").write_text(json.dumps({"pid": 123, "host": "vm", "started": "now"}))
    (root / "teacher" / "tb" / "events.out.tfevents.1796189191.vm").write_bytes(b"\x00\x01")
    return root


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    return make_workdir(tmp_path / "run_a"), make_workdir(tmp_path / "run_b")


def run(a: Path, b: Path, capsys) -> tuple[int, str]:
    rc = cw.main([str(a), str(b)])
    return rc, capsys.readouterr().out


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_identical_trees_are_equal(trees, capsys):
    rc, out = run(*trees, capsys)
    assert rc == 0, out
    assert "0 differences" in out.splitlines()[-1]
    assert "files compared" in out.splitlines()[-1]


def test_one_ulp_in_a_tensor_is_reported_with_its_name(trees, capsys):
    a, b = trees
    t = {k: v.copy() for k, v in TENSORS.items()}
    t["head.bias"][2] = np.nextafter(t["head.bias"][2], np.float32(np.inf))
    save_file(t, str(b / "teacher" / "model" / "model.safetensors"))
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "head.bias" in out and "embed.word" not in out
    assert "1 of 5 elements differ" in out
    assert out.splitlines()[-1].endswith("1 differences")


def test_ignored_timing_fields_may_differ(trees, capsys):
    a, b = trees
    edit_json(b / "export" / "result.json", lambda d: d["small"].update(measured_latency_ms=0.9))
    edit_json(b / "teacher" / "summary.json", lambda d: d.update(wall_time_s=99.0, train_time_s=1.0))
    report = (b / "report.md").read_text().replace("0.5052", "0.9000")
    (b / "report.md").write_text(report)
    rc, out = run(a, b, capsys)
    assert rc == 0, out
    assert "measured_latency_ms" in out  # listed among the ignored fields met


def test_changed_result_float_is_reported(trees, capsys):
    a, b = trees
    edit_json(b / "teacher" / "summary.json",
              lambda d: d["eval"].update(loss=np.nextafter(d["eval"]["loss"], 10.0)))
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "teacher/summary.json: eval.loss" in out


def test_changed_jsonl_record_and_report_cell(trees, capsys):
    a, b = trees
    (b / "teacher" / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "train/loss": 5.51}) + "\n"
        + json.dumps({"step": 10, "eval/loss": 5.3}) + "\n")
    (b / "report.md").write_text((b / "report.md").read_text().replace("5.526", "5.527"))
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "metrics.jsonl: line 2.eval/loss" in out
    assert "report.md: line 5" in out


def test_int_is_not_float_and_binary_bytes_compared(trees, capsys):
    a, b = trees
    edit_json(b / "export" / "result.json", lambda d: d["small"].update(params=14064.0))
    blob = bytearray(bytes(range(256)) * 4)
    blob[700] ^= 1
    (b / "data" / "spm.model").write_bytes(bytes(blob))
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "small.params" in out
    assert "data/spm.model: bytes differ (sizes A=1024 B=1024, first difference at byte 700)" in out


def test_file_in_one_tree_only(trees, capsys):
    a, b = trees
    (b / "teacher" / "extra.json").write_text("{}")
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "teacher/extra.json: file only in B" in out


def test_directory_in_one_tree_only_is_one_difference(trees, capsys):
    a, b = trees
    shutil.rmtree(b / "teacher" / "model")
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "teacher/model/: directory with 1 file only in A" in out


def test_temporary_files_are_ignored(trees, capsys):
    a, b = trees
    (b / "export" / ".result.json.abc123.tmp").write_text("partial")
    (b / "export" / ".small.tmpdir-xyz").mkdir()
    (b / "export" / ".small.tmpdir-xyz" / "config.json").write_text("{}")
    (b / "report").mkdir()
    (b / "report" / "pareto.png").write_bytes(b"\x89PNG")
    rc, out = run(a, b, capsys)
    assert rc == 0, out


def test_bad_usage_exits_2(tmp_path, capsys):
    assert cw.main([str(tmp_path)]) == 2
    assert cw.main([str(tmp_path), str(tmp_path / "missing")]) == 2
    assert cw.main([str(tmp_path), str(tmp_path)]) == 2


def test_command_line(trees):
    a, b = trees
    ok = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (b / "data" / "spm.model").write_bytes(b"other")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True,
                        check=False)
    assert bad.returncode == 1 and "data/spm.model" in bad.stdout


def _write_ocdbt(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An OCDBT zarr store like orbax's (tensorstore names its data files at random)."""
    ts = pytest.importorskip("tensorstore")
    path.mkdir(parents=True)
    for name, value in arrays.items():
        base = {"driver": "file", "path": str(path)}
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": name},
                "metadata": {"shape": list(value.shape), "chunks": list(value.shape),
                             "dtype": value.dtype.str}}
        arr = ts.open(spec, create=True).result()
        arr.write(value).result()
    (path / "_METADATA").write_text(json.dumps({"tree_metadata": sorted(arrays), "use_ocdbt": True}))


def test_orbax_ocdbt_store_compared_by_content(trees, capsys):
    a, b = trees
    arrays = {"params.w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(20, np.int32)}
    _write_ocdbt(a / "teacher" / "checkpoints" / "20" / "state", arrays)
    _write_ocdbt(b / "teacher" / "checkpoints" / "20" / "state", arrays)
    rc, out = run(a, b, capsys)
    assert rc == 0, out  # the same arrays, although the data files have other (random) names
    shutil.rmtree(b / "teacher" / "checkpoints")
    changed = dict(arrays, **{"params.w": arrays["params.w"] + np.float32(1e-6)})
    _write_ocdbt(b / "teacher" / "checkpoints" / "20" / "state", changed)
    rc, out = run(a, b, capsys)
    assert rc == 1, out
    assert "teacher/checkpoints/20/state/ [ocdbt]: params.w: max abs diff" in out
    assert "[ocdbt]: step" not in out
