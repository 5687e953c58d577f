"""Crash and preemption safety of the whole pipeline, checkpoint integrity, NaN handling.

The fault-injection harness runs the MLM ``test`` pipeline once uninterrupted (the reference),
then runs the same command again and again in a second work directory, killing it at points
drawn from a fixed seed in every stage: half with SIGKILL (a crash), half with SIGTERM (a
preemption notice, which must save and exit with code 75 and a message). After the last kill
the command runs to the end, and every stage's outputs must equal the reference: bitwise the
same parameters (teacher, supernet, exported orbax + safetensors, retrained), the same search
result and Pareto sets, the same fine-tuning and evaluation results (measured latencies may
differ). The per-stage summary is printed (``pytest -s``) for the issue note.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from elm_jax.pipeline import EXIT_NONFINITE

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "teacher", "supernet", "search", "export", "retrain", "finetune", "evaluate")
KILLED_STAGES = ("teacher", "supernet", "search", "export", "retrain", "finetune")
SEED = 20261129
ATTEMPT_TIMEOUT_S = 900


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "elm_jax.main", "--config=configs/mlm.py:test", f"--workdir={workdir}",
            "--config.export.baselines=('mobilebert',)", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300", PYTHONUNBUFFERED="1")


@dataclasses.dataclass
class Attempt:
    """One run of the command: its output records and, when killed, where."""

    records: list[tuple[float, str, str]]  # (seconds since start, current stage, text)
    returncode: int
    output: str
    target: str | None = None
    signal: str | None = None
    killed_in: str | None = None  # the stage running when the signal was sent


class _Reader(threading.Thread):
    """Splits a process's merged output into records at newlines and carriage returns (tqdm)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.q, self.chunks = stream, queue.Queue(), []

    def run(self) -> None:
        buf = ""
        while True:
            data = os.read(self.stream.fileno(), 65536)
            if not data:
                break
            text = data.decode("utf-8", "replace")
            self.chunks.append(text)
            buf += text
            parts = re.split(r"[\r\n]", buf)
            buf = parts.pop()
            for p in parts:
                if p.strip():
                    self.q.put(p)
        if buf.strip():
            self.q.put(buf)
        self.q.put(None)


def run_attempt(workdir: Path, target: str | None = None, k: int = 0, delay: float = 0.0,
                sig: signal.Signals = signal.SIGKILL, extra: tuple[str, ...] = ()) -> Attempt:
    """Runs the pipeline; with ``target``, sends ``sig`` ``delay`` seconds after the ``k``-th
    output record of stage ``target`` (or after the next stage starts, if it ends sooner)."""
    proc = subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    reader = _Reader(proc.stdout)
    reader.start()
    t0, stage, seen, fire_at, killed_in = time.monotonic(), "startup", None, None, None
    records: list[tuple[float, str, str]] = []
    deadline = t0 + ATTEMPT_TIMEOUT_S
    done = False
    while not done:
        now = time.monotonic()
        if now > deadline:
            proc.kill()
            raise AssertionError(f"attempt timed out after {ATTEMPT_TIMEOUT_S} s:\n" + "".join(reader.chunks)[-3000:])
        if fire_at is not None and now >= fire_at and killed_in is None and proc.poll() is None:
            killed_in = stage
            proc.send_signal(sig)
        try:
            rec = reader.q.get(timeout=0.05)
        except queue.Empty:
            continue
        if rec is None:
            done = True
            continue
        m = re.match(r"\[elm-jax\] stage (\w+)", rec)
        if m:
            stage = m.group(1)
        records.append((time.monotonic() - t0, stage, rec))
        if target is not None and fire_at is None:
            if stage == target:
                seen = 0 if seen is None else seen + 1
                if seen >= k:
                    fire_at = time.monotonic() + delay
            elif seen is not None or STAGES.index(stage if stage in STAGES else "data") > STAGES.index(target):
                fire_at = time.monotonic() + delay  # the target stage ended (or was complete) first
    rc = proc.wait(timeout=ATTEMPT_TIMEOUT_S)
    reader.join(timeout=10)
    return Attempt(records, rc, "".join(reader.chunks), target, sig.name if target else None, killed_in)


# ---------------------------------------------------------------------------------------------
# Comparing two work directories


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.fspath(path))


def _assert_bitwise(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb), (a, b)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, (a, k)
        assert ta[k].tobytes() == tb[k].tobytes(), f"{a}: {k} differs"


def _orbax(path: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        return {k: np.asarray(v) for k, v in ck.restore(os.fspath(path.resolve())).items()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def compare_stage(stage: str, ref: Path, got: Path) -> None:
    """Asserts that ``stage``'s final outputs in ``got`` equal those in ``ref``."""
    if stage == "teacher":
        _assert_bitwise(ref / "teacher/model/model.safetensors", got / "teacher/model/model.safetensors")
        assert _json(ref / "teacher/result.json")["eval"] == _json(got / "teacher/result.json")["eval"]
    elif stage == "supernet":
        _assert_bitwise(ref / "supernet/final/supernet.safetensors", got / "supernet/final/supernet.safetensors")
        assert _json(ref / "supernet/final/widths.json") == _json(got / "supernet/final/widths.json")
        r, g = _json(ref / "supernet/result.json"), _json(got / "supernet/result.json")
        for key in ("widths", "growth", "eval_largest", "block_cka"):
            assert r[key] == g[key], key
    elif stage == "search":
        r, g = _json(ref / "search/result.json"), _json(got / "search/result.json")
        assert _without(r, "scorer") == _without(g, "scorer")  # scorer: this run's call counts
        assert r["pareto"] == g["pareto"] and r["budgets"] == g["budgets"]
    elif stage == "export":
        r, g = _json(ref / "export/result.json"), _json(got / "export/result.json")
        assert sorted(r) == sorted(g)
        for name in r:
            assert _without(r[name], "measured_latency_ms", "path") == _without(g[name], "measured_latency_ms", "path")
            _assert_bitwise(ref / "export" / name / "model.safetensors", got / "export" / name / "model.safetensors")
            ro, go = _orbax(ref / "export" / name / "orbax"), _orbax(got / "export" / name / "orbax")
            assert sorted(ro) == sorted(go) and all(ro[k].tobytes() == go[k].tobytes() for k in ro), name
            ra, ga = _json(ref / "export" / name / "arch.json"), _json(got / "export" / name / "arch.json")
            assert _without(ra, "measured_latency_ms", "config") == _without(ga, "measured_latency_ms", "config")
    elif stage == "retrain":
        r, g = _json(ref / "retrain/result.json"), _json(got / "retrain/result.json")
        assert {k: _without(v, "path") for k, v in r.items()} == {k: _without(v, "path") for k, v in g.items()}
        for name in r:
            _assert_bitwise(ref / "retrain" / name / "model.safetensors", got / "retrain" / name / "model.safetensors")
    elif stage == "finetune":
        r, g = _json(ref / "finetune/result.json"), _json(got / "finetune/result.json")
        strip = lambda d: {k: _without(v, "path") if isinstance(v, dict) else v for k, v in d.items()}
        assert strip(r) == strip(g)
    elif stage == "evaluate":
        assert _json(ref / "evaluate/result.json") == _json(got / "evaluate/result.json")


# ---------------------------------------------------------------------------------------------
# The harness


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Attempt]:
    wd = tmp_path_factory.mktemp("reference")
    att = run_attempt(wd)
    assert att.returncode == 0, att.output[-4000:]
    return wd, att


def kill_plan(reference_attempt: Attempt) -> list[tuple[str, int, float, signal.Signals]]:
    """Two kill points per stage from a fixed seed, a SIGKILL and a SIGTERM in random order:
    each after a random output record of the stage (any but its last two, as the reference run
    printed them; the earlier record first, so that the resumed stage is hit again) plus a
    random delay of up to 0.6 s."""
    rng = np.random.default_rng(SEED)
    counts = {s: sum(1 for _, st, _ in reference_attempt.records if st == s) for s in KILLED_STAGES}
    plan = []
    for stage in KILLED_STAGES:
        ks = sorted(int(k) for k in rng.integers(0, max(counts[stage] - 2, 1), size=2))
        sigs = [signal.SIGKILL, signal.SIGTERM]
        if rng.random() < 0.5:
            sigs.reverse()
        for k, sig in zip(ks, sigs):
            plan.append((stage, k, float(rng.uniform(0.0, 0.6)), sig))
    return plan


def test_killed_and_preempted_runs_resume_to_identical_results(reference, tmp_path):
    ref_dir, ref_attempt = reference
    wd = tmp_path / "chained"
    rows = []
    for stage, k, delay, sig in kill_plan(ref_attempt):
        att = run_attempt(wd, stage, k, delay, sig)
        rows.append(att)
        if att.killed_in is None:
            assert att.returncode == 0, att.output[-4000:]  # finished before the signal
            continue
        if sig == signal.SIGKILL:
            assert att.returncode == -signal.SIGKILL, att.output[-4000:]
        else:  # a preemption notice: save, say so, exit 75 (or finish, when it came at the end)
            assert att.returncode in (75, 0), att.output[-4000:]
            if att.returncode == 75:
                assert "preempted" in att.output and "rerun the same command to resume" in att.output
                assert "Traceback" not in att.output, att.output[-4000:]
    final = run_attempt(wd)
    assert final.returncode == 0, final.output[-4000:]
    assert "Traceback" not in final.output

    identical = {}
    for stage in (*KILLED_STAGES, "evaluate"):
        compare_stage(stage, ref_dir, wd)  # raises on the first difference
        identical[stage] = True
    killed = [a for a in rows if a.killed_in is not None]
    assert len(killed) >= 10, [(a.target, a.killed_in, a.returncode) for a in rows]
    lines = [f"{'stage':<10}{'kills':>6}{'SIGKILL':>9}{'SIGTERM':>9}{'identical':>11}"]
    for stage in STAGES:
        ks = [a for a in killed if a.killed_in == stage]
        if not ks and stage not in KILLED_STAGES:
            continue
        lines.append(f"{stage:<10}{len(ks):>6}{sum(a.signal == 'SIGKILL' for a in ks):>9}"
                     f"{sum(a.signal == 'SIGTERM' for a in ks):>9}{identical.get(stage, 'n/a')!s:>11}")
    lines.append(f"{len(killed)} kill points in {len(rows) + 1} runs of the same command:")
    for (s, k, d, _), a in zip(kill_plan(ref_attempt), rows):
        said = next((ln for ln in a.output.splitlines() if ln.startswith("preempted:")), "")
        lines.append(f"  {a.signal:<7} planned {s} (record {k} + {d:.2f} s) -> in {a.killed_in or '-'}, "
                     f"exit {a.returncode}{'  ' + said[:150] if said else ''}")
    print("\n[fault injection]\n" + "\n".join(lines))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    """A killed teacher run whose newest checkpoint was then damaged: the rerun warns naming the
    bad step, resumes from the previous checkpoint and ends bitwise equal to the reference."""
    ref_dir, _ = reference
    wd = tmp_path / "w"
    shutil.copytree(ref_dir / "teacher" / "checkpoints", wd / "teacher" / "checkpoints")
    steps = sorted(int(p.name) for p in (wd / "teacher" / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2, steps
    for f in (wd / "teacher" / "checkpoints" / str(steps[-1]) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            _flip_byte(f)
    proc = subprocess.run(_cmd(wd, "--stages=teacher"), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=ATTEMPT_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint step {steps[-1]}" in proc.stderr and "falling back" in proc.stderr, proc.stderr[-3000:]
    assert _json(wd / "teacher" / "summary.json")["resumed_from"] == steps[-2]
    compare_stage("teacher", ref_dir, wd)


def test_silently_changed_checkpoint_is_detected_by_its_checksums(tmp_path, caplog):
    """Files that still decode but hold other values (a copy from another run, a flipped bit in
    uncompressed data) fail the content checksums saved with the step: fall back, warn."""
    import logging

    import jax
    import jax.numpy as jnp

    from elm_jax.engine import checkpoint as ckpt_lib

    good = {"w": jnp.arange(12.0).reshape(3, 4), "n": jnp.int32(1)}
    other = {"w": jnp.arange(12.0).reshape(3, 4) + 1.0, "n": jnp.int32(2)}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in good.items()}
    with ckpt_lib.Checkpointer(tmp_path / "a", keep=3, save_every=1) as ck:
        ck.save(1, good, {"step": 1})
        ck.save(2, good, {"step": 2})
        ck.wait()
    with ckpt_lib.Checkpointer(tmp_path / "b", keep=3, save_every=1) as ck:
        ck.save(2, other, {"step": 2})
        ck.wait()
    # step 2's array files replaced by a complete, readable checkpoint of other values
    shutil.rmtree(tmp_path / "a" / "2" / "state")
    shutil.copytree(tmp_path / "b" / "2" / "state", tmp_path / "a" / "2" / "state")
    with (ckpt_lib.Checkpointer(tmp_path / "a", keep=3, save_every=1) as ck,
          caplog.at_level(logging.WARNING, logger="elm_jax.checkpoint")):
        state, meta, step = ck.restore_latest(abstract)
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(good["w"]))
    assert any("step 2" in r.getMessage() and "checksum mismatch" in r.getMessage() for r in caplog.records)


def test_nan_stops_within_one_step_and_skip_recovers(capsys, tmp_path):
    """A learning rate that overflows the teacher: the stage stops at most one step after the
    first bad step, names it, keeps the last good checkpoint (never a non-finite one) and exits
    with code 3; rerun with ``nan_policy=skip`` (not a config-change refusal) it finishes with
    those steps skipped and finite weights."""
    from elm_jax.engine import checkpoint as ckpt_lib
    from elm_jax import main as main_lib

    base = ["elm_jax.main", "--config=configs/mlm.py:test", f"--workdir={tmp_path}", "--stages=teacher",
            "--config.compile_cache_dir=none", "--config.teacher.train.lr=1e30",
            "--config.teacher.train.steps=6", "--config.teacher.train.checkpoint_every=1",
            "--config.teacher.train.log_every=100"]
    rc = main_lib.cli(base)
    out, err = capsys.readouterr()
    assert rc == EXIT_NONFINITE, out[-2000:] + err[-2000:]
    m = re.search(r"non-finite loss or gradient norm at step (\d+) \(nan_policy='stop'; stopped at step (\d+)\)",
                  err)
    assert m and "Traceback" not in err, err[-2000:]
    bad, stopped = int(m.group(1)), int(m.group(2))
    assert 0 <= stopped - bad <= 1, (bad, stopped)
    ck = ckpt_lib.Checkpointer(tmp_path / "teacher" / "checkpoints", 3, 1)
    saved = ck.all_steps()
    ck.close()
    assert saved and max(saved) <= bad, (saved, bad)  # nothing after the bad step was saved
    assert f"last good checkpoint: step {max(saved)}" in err
    rc = main_lib.cli([*base, "--config.teacher.train.nan_policy=skip"])
    out, err = capsys.readouterr()
    assert rc == 0, out[-2000:] + err[-2000:]
    summary = _json(tmp_path / "teacher" / "summary.json")
    assert summary["skipped_steps"] >= 1 and summary["final_step"] == 6
    assert summary["resumed_from"] == max(saved)
    for v in _tensors(tmp_path / "teacher" / "model" / "model.safetensors").values():
        assert np.isfinite(v).all()


def test_damaged_search_state_redoes_that_budget_with_a_warning(tmp_path):
    """A search state file damaged on disk (the search writes it atomically) is not a crash:
    the budget's search starts over with a warning and, being seeded, ends the same."""
    from elm_jax.config import load_config
    from elm_jax.search.constraints import Constraints
    from elm_jax.search.evolution import evolutionary_search
    from elm_jax.accounting import reachable_ranges
    from elm_jax.stages.supernet import space_of

    cfg = load_config("configs/mlm.py:test")
    space = space_of(cfg, 256)
    widths = space.initial_widths()

    class Scorer:  # deterministic stand-in for the supernet: a hash of the architecture
        def scores(self, archs):
            return np.asarray([int(a.arch_id[:8], 16) / 2**32 for a in archs])

    lo, hi = reachable_ranges(space, widths, cfg.data.seq_len)["params"]
    budget = Constraints.from_budget({"name": "half", "max_params": lo + 0.5 * (hi - lo)}, space, widths,
                                     cfg.data.seq_len)
    path = tmp_path / "state_half.json"
    ref = evolutionary_search(space, widths, Scorer(), budget, cfg.search, 3, path, progress=False)
    path.write_text(path.read_text()[:100])  # truncated
    with pytest.warns(UserWarning, match=r"state_half\.json is unreadable.*starts over"):
        again = evolutionary_search(space, widths, Scorer(), budget, cfg.search, 3, path, progress=False)
    assert again.best == ref.best and again.score == ref.score and again.history == ref.history
    assert json.loads(path.read_text())["generation"] == cfg.search.generations - 1
