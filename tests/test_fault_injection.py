"""Crash and preemption safety of the whole pipeline, checkpoint integrity, NaN handling.

The fault-injection harness runs the MLM ``test`` pipeline once uninterrupted (the reference),
then runs the same command again and again in a second work directory, killing it twice inside
every stage, ``data`` and ``evaluate`` included: once with SIGKILL (a crash) and once with SIGTERM
(a preemption notice, which must save and exit with code 75 and a message), in an order drawn
from a fixed seed. After the last kill the command runs to the end, and every stage's outputs
must equal the reference: the same data statistics and tokenizer, bitwise the same parameters
(teacher, supernet, exported orbax + safetensors, retrained), the same search result and Pareto
sets, the same fine-tuning and evaluation results (measured latencies may differ).

Where each kill landed is read off the killed process's own output: the last stage marker
(``[elm-jax] stage NAME``) it printed. After a SIGKILL nothing more is printed, so that marker is
the stage it died in; a SIGTERM is counted for a stage only when the harness had already seen that
stage's marker when it sent the signal and the process printed no later one. The test fails
unless a kill landed inside every stage. The per-stage summary is printed (``pytest -s``).

A second, smaller harness kills a supernet run with architectures sampled per device under the
sandwich rule (8 CPU devices) with SIGKILL and then SIGTERM, and checks the resumed supernet
equals an uninterrupted run bitwise.
"""

from __future__ import annotations

import concurrent.futures
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

from elm_jax.pipeline import EXIT_NONFINITE, STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
STAGES = STAGE_NAMES  # every stage is killed: data, teacher, ..., evaluate
SEED = 20261129
ATTEMPT_TIMEOUT_S = 900
# A kill point is a record of the stage followed, in the reference run, by at least MIN_GAP_S of
# that stage's work; the signal follows it after a random delay of at most a third of that gap
# (and at most MAX_DELAY_S), so it lands before the stage can end even in a faster rerun.
MIN_GAP_S = 0.5
MAX_DELAY_S = 0.5
_MARKER = re.compile(r"\[elm-jax\] stage (\w+)")
_REPORT = "# elm-jax report"  # printed by the CLI after the evaluate stage
_PROGRESS = re.compile(r"(?P<bar>.+?):\s+\d+%\|[^|]*\|\s*(?P<step>\d+)/\d+")  # a tqdm record


def _cmd(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "elm_jax.main", "--config=configs/mlm.py:test", f"--workdir={workdir}",
            "--config.export.baselines=('mobilebert',)", *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300", PYTHONUNBUFFERED="1")


def _stage_of(record: str, current: str) -> str:
    """The stage running once ``record`` was printed (``report``: the CLI's report after it)."""
    m = _MARKER.match(record)
    if m:
        return m.group(1)
    return "report" if record.startswith(_REPORT) else current


@dataclasses.dataclass(frozen=True)
class Kill:
    """Send ``sig`` ``delay`` seconds after the first record of ``stage`` that is ``line`` (a
    prefix) or, with ``step`` set, a progress record of bar ``line`` at step ``step`` or later."""

    stage: str
    line: str
    delay: float
    sig: signal.Signals
    step: int | None = None

    def matches(self, stage: str, record: str) -> bool:
        if stage != self.stage:
            return False
        if self.step is None:
            return record.startswith(self.line)
        m = _PROGRESS.match(record)
        return bool(m) and m.group("bar") == self.line and int(m.group("step")) >= self.step

    def describe(self) -> str:
        at = f"{self.line} step >= {self.step}" if self.step is not None else repr(self.line[:40])
        return f"{self.stage}: {at} + {self.delay:.2f} s"


@dataclasses.dataclass
class Attempt:
    """One run of the command: its output records and, when a signal was sent, where."""

    records: list[tuple[float, str, str]]  # (seconds since start, current stage, text)
    returncode: int
    output: str
    kill: Kill | None = None
    sent_in: str | None = None  # the stage the harness had seen last when it sent the signal

    @property
    def signal(self) -> str | None:
        return self.kill.sig.name if self.kill is not None and self.sent_in is not None else None

    @property
    def last_stage(self) -> str:
        return self.records[-1][1] if self.records else "startup"

    @property
    def landed(self) -> str | None:
        """The stage the signal surely landed inside (None: not sent, or not sure where).

        The process was at least in ``sent_in`` and at most in ``last_stage`` when the signal
        came. A SIGKILL process prints nothing afterwards, so it died in ``last_stage``; a SIGTERM
        one goes on to a safe point, so only ``sent_in == last_stage`` pins it down."""
        if self.sent_in is None:
            return None
        where = self.last_stage if self.kill.sig == signal.SIGKILL else (
            self.sent_in if self.sent_in == self.last_stage else None)
        return where if where in STAGES else None


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


def run_attempt(workdir: Path, kill: Kill | None = None, extra: tuple[str, ...] = (),
                env: dict[str, str] | None = None) -> Attempt:
    """Runs the pipeline; with ``kill``, sends its signal after its trigger record (if the process
    prints it and is still running by then)."""
    proc = subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    reader = _Reader(proc.stdout)
    reader.start()
    t0, stage, fire_at, sent_in = time.monotonic(), "startup", None, None
    records: list[tuple[float, str, str]] = []
    deadline = t0 + ATTEMPT_TIMEOUT_S
    done = False
    while not done:
        now = time.monotonic()
        if now > deadline:
            proc.kill()
            raise AssertionError(f"attempt timed out after {ATTEMPT_TIMEOUT_S} s:\n" + "".join(reader.chunks)[-3000:])
        if fire_at is not None and now >= fire_at and sent_in is None and proc.poll() is None:
            sent_in = stage
            proc.send_signal(kill.sig)
        try:
            rec = reader.q.get(timeout=0.02)
        except queue.Empty:
            continue
        if rec is None:
            done = True
            continue
        stage = _stage_of(rec, stage)
        records.append((time.monotonic() - t0, stage, rec))
        if kill is not None and fire_at is None and kill.matches(stage, rec):
            fire_at = time.monotonic() + kill.delay
    rc = proc.wait(timeout=ATTEMPT_TIMEOUT_S)
    reader.join(timeout=10)
    return Attempt(records, rc, "".join(reader.chunks), kill, sent_in)


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
    if stage == "data":
        assert _json(ref / "data/stats.json") == _json(got / "data/stats.json")
        models = sorted(p.name for p in (ref / "data").glob("*.model"))
        assert models and models == sorted(p.name for p in (got / "data").glob("*.model"))
        assert all((ref / "data" / m).read_bytes() == (got / "data" / m).read_bytes() for m in models)
    elif stage == "teacher":
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


def _trigger(record: str) -> tuple[str, int | None] | None:
    """How a record is recognised in another run of its stage: ``(prefix, None)`` for the
    package's own lines, ``(bar, step)`` for a progress bar; None for anything else (download
    and library messages, which a rerun need not print)."""
    m = _PROGRESS.match(record)
    if m:
        return m.group("bar"), int(m.group("step"))
    return (record[:32], None) if record.startswith("[") else None


def kill_plan(reference_attempt: Attempt) -> list[Kill]:
    """Two kills per stage from a fixed seed, a SIGKILL and a SIGTERM in random order.

    The first comes in a fresh run of the stage, which prints what the reference printed: after a
    random one of the stage's records (its marker, its own ``[stage]`` lines, the first two records
    of each progress bar, whose steps do not depend on tqdm's timing) that the reference printed at
    least ``MIN_GAP_S`` before the stage ended, plus a random delay of at most a quarter of that
    gap. The second comes in the rerun, which resumes (or, for data and evaluate, redoes) the
    stage: after its marker, plus a random delay of at most a quarter of the reference's stage
    time. Both are capped at ``MAX_DELAY_S``. The marker is always a candidate, so no stage is left
    out."""
    rng = np.random.default_rng(SEED)
    recs = reference_attempt.records
    plan: list[Kill] = []
    for stage in STAGES:
        idx = [i for i, (_, st, _) in enumerate(recs) if st == stage]
        assert idx and _MARKER.match(recs[idx[0]][2]), f"the reference run has no {stage!r} stage"
        end = recs[idx[-1] + 1][0] if idx[-1] + 1 < len(recs) else recs[idx[-1]][0]
        points, bars = [], {}
        for n, i in enumerate(idx):
            t, _, rec = recs[i]
            trig = _trigger(rec)
            if trig is not None and trig[1] is not None:
                bars[trig[0]] = bars.get(trig[0], 0) + 1
                if bars[trig[0]] > 2:
                    continue
            if trig is not None and (n == 0 or end - t >= MIN_GAP_S):
                points.append((trig, end - t))
        (line, step), gap = points[int(rng.integers(len(points)))]
        sigs = [signal.SIGKILL, signal.SIGTERM]
        if rng.random() < 0.5:
            sigs.reverse()
        plan.append(Kill(stage, line, float(rng.uniform(0.0, min(MAX_DELAY_S, gap / 4))), sigs[0], step))
        plan.append(Kill(stage, recs[idx[0]][2], float(rng.uniform(0.0, min(MAX_DELAY_S, (end - recs[idx[0]][0]) / 4))),
                         sigs[1]))
    return plan


def uncovered(attempts: list[Attempt]) -> list[str]:
    """The stages no kill surely landed inside."""
    return [s for s in STAGES if not any(a.landed == s for a in attempts)]


def check_outcome(att: Attempt) -> None:
    """What a killed (or, when its trigger never came, unkilled) run must have done."""
    if att.sent_in is None:
        assert att.returncode == 0, att.output[-4000:]  # finished before the signal
    elif att.kill.sig == signal.SIGKILL:
        assert att.returncode == -signal.SIGKILL, att.output[-4000:]
    else:  # a preemption notice: save, say so, exit 75 (or finish, when it came at the end)
        assert att.returncode in (75, 0), att.output[-4000:]
        if att.returncode == 75:
            assert "preempted" in att.output and "rerun the same command to resume" in att.output
            assert "Traceback" not in att.output, att.output[-4000:]


def summary(rows: list[Attempt], identical: dict[str, bool]) -> str:
    lines = [f"{'stage':<10}{'kills':>6}{'SIGKILL':>9}{'SIGTERM':>9}{'identical':>11}"]
    for stage in STAGES:
        ks = [a for a in rows if a.landed == stage]
        lines.append(f"{stage:<10}{len(ks):>6}{sum(a.signal == 'SIGKILL' for a in ks):>9}"
                     f"{sum(a.signal == 'SIGTERM' for a in ks):>9}{identical.get(stage, 'n/a')!s:>11}")
    lines.append(f"{sum(a.landed is not None for a in rows)} kills landed inside a stage in {len(rows) + 1} "
                 f"runs of the same command:")
    for a in rows:
        said = next((ln for ln in a.output.splitlines() if ln.startswith("preempted:")), "")
        where = a.landed or (f"? (sent in {a.sent_in}, last printed {a.last_stage})" if a.sent_in else "not sent")
        lines.append(f"  {a.kill.sig.name:<7} at {a.kill.describe()} -> in {where}, exit {a.returncode}"
                     f"{'  ' + said[:150] if said else ''}")
    return "\n".join(lines)


@pytest.mark.fidelity
def test_killed_and_preempted_runs_resume_to_identical_results(reference, tmp_path, request):
    ref_dir, ref_attempt = reference
    _start_device_chain_if_selected(request)
    wd = tmp_path / "chained"
    rows = []
    for kill in kill_plan(ref_attempt):
        rows.append(run_attempt(wd, kill))
        check_outcome(rows[-1])
    final = run_attempt(wd)
    assert final.returncode == 0, final.output[-4000:]
    assert "Traceback" not in final.output

    identical = {}
    for stage in STAGES:
        compare_stage(stage, ref_dir, wd)  # raises on the first difference
        identical[stage] = True
    text = summary(rows, identical)
    print("\n[fault injection]\n" + text)
    missing = uncovered(rows)
    assert not missing, f"no kill landed inside stage(s) {missing}:\n{text}"


# ---------------------------------------------------------------------------------------------
# Per-device sampling under the sandwich rule, killed and resumed

# Supernet only (data and teacher copied from the reference), 6 steps, widths growing at step 3,
# checkpoints at steps 2, 4 and 6, a progress record every step.
DEVICE_RUN = ("--stages=supernet", "--config.supernet.sample_per=device", "--config.supernet.sandwich=True",
              "--config.supernet.train.steps=6", "--config.supernet.epoch_steps=3",
              "--config.supernet.calc_every=3", "--config.supernet.train.log_every=1",
              "--config.supernet.train.checkpoint_every=2", "--config.supernet.train.eval_every=6")


def _device_env() -> dict[str, str]:
    """The test session's own environment: conftest's XLA_FLAGS (8 CPU devices)."""
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _with_upstream(ref_dir: Path, wd: Path) -> Path:
    """A work directory holding the reference's data and teacher stages."""
    wd.mkdir(parents=True)
    for stage in ("data", "teacher"):
        shutil.copytree(ref_dir / stage, wd / stage)
    shutil.copy2(ref_dir / "fingerprints.json", wd / "fingerprints.json")
    return wd


def _steps(att: Attempt) -> list[int]:
    """The supernet steps of the progress records ``att`` printed, in order."""
    return [int(m.group("step")) for _, _, r in att.records if (m := _PROGRESS.match(r)) and m.group("bar") == "supernet"]


def _device_chain(ref_dir: Path, root: Path) -> dict[str, Attempt]:
    """The uninterrupted per-device run, then in a second directory: a run SIGKILLed 0.1 s after
    it reports step 3, a rerun SIGTERMed as soon as it reports its first (resumed) step, and a
    final rerun. Asserts nothing (it may run in a background thread)."""
    env = _device_env()
    out = {"plain": run_attempt(_with_upstream(ref_dir, root / "uninterrupted"), extra=DEVICE_RUN, env=env)}
    wd = _with_upstream(ref_dir, root / "chained")
    out["crash"] = run_attempt(wd, Kill("supernet", "supernet", 0.1, signal.SIGKILL, step=3), DEVICE_RUN, env)
    out["preempt"] = run_attempt(wd, Kill("supernet", "supernet", 0.0, signal.SIGTERM, step=0), DEVICE_RUN, env)
    out["final"] = run_attempt(wd, extra=DEVICE_RUN, env=env)
    return out


@pytest.fixture(scope="module")
def device_chain(reference, tmp_path_factory):
    """:func:`_device_chain` started in a background thread. The first harness asks for it when
    the per-device test is selected too, so the two (each about one core busy) overlap."""
    root = tmp_path_factory.mktemp("per_device")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield root, pool.submit(_device_chain, reference[0], root)


def _start_device_chain_if_selected(request) -> None:
    if any(item.name == DEVICE_TEST for item in request.session.items):
        request.getfixturevalue("device_chain")


DEVICE_TEST = "test_per_device_sandwich_supernet_killed_and_preempted_resumes_bitwise"


@pytest.mark.fidelity
def test_per_device_sandwich_supernet_killed_and_preempted_resumes_bitwise(device_chain):
    """``supernet.sample_per='device'`` with the sandwich rule on 8 devices (the largest and the
    smallest architecture under the current widths and 6 random ones per step), SIGKILLed once it
    reports step 3 or later (past the width growth at step 3; the rerun must resume from a
    checkpoint), then SIGTERMed as soon as the rerun reports its first step: the final supernet
    weights, widths, growth history and validation metrics equal an uninterrupted run's bitwise.
    (Checked to fail when a resumed run's batch sources keep the initial widths.)"""
    assert "--xla_force_host_platform_device_count=8" in _device_env().get("XLA_FLAGS", "")
    root, future = device_chain
    runs = future.result(timeout=4 * ATTEMPT_TIMEOUT_S)
    plain, crash, preempt, final = (runs[k] for k in ("plain", "crash", "preempt", "final"))
    assert plain.returncode == 0, plain.output[-4000:]
    assert "architectures per device (sandwich)" in plain.output, plain.output[-4000:]
    assert crash.returncode == -signal.SIGKILL and crash.landed == "supernet", crash.output[-4000:]
    assert preempt.returncode == 75 and preempt.landed == "supernet", preempt.output[-4000:]
    assert "Traceback" not in preempt.output, preempt.output[-4000:]
    resumed = _steps(preempt)[0]
    assert resumed > 0, f"the rerun after the SIGKILL started from scratch:\n{preempt.output[-4000:]}"
    m = re.search(r"supernet: preempted \(SIGTERM\) after step (\d+)/6", preempt.output)
    assert m and resumed < int(m.group(1)) < 6, preempt.output[-4000:]
    saved = int(m.group(1))
    assert final.returncode == 0 and _steps(final)[0] == saved, final.output[-4000:]
    wd = root / "chained"
    assert _json(wd / "supernet" / "summary.json")["resumed_from"] == saved
    compare_stage("supernet", root / "uninterrupted", wd)
    print(f"\n[fault injection, per-device sandwich] SIGKILL after step {_steps(crash)[-1]} -> rerun "
          f"resumed at step {resumed}; SIGTERM -> saved at step {saved}; final run from step {saved}: "
          f"bitwise equal to the uninterrupted run")


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
    from elm_jax import main as main_lib
    from elm_jax.engine import checkpoint as ckpt_lib

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
    from elm_jax.accounting import reachable_ranges
    from elm_jax.config import load_config
    from elm_jax.search.constraints import Constraints
    from elm_jax.search.evolution import evolutionary_search
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


_NOTICE_DURING_REPORT = """
import os, signal, sys
from elm_jax import main, pipeline, report
pipeline.run = lambda *a, **k: 0  # every stage complete
def build(workdir):
    os.kill(os.getpid(), signal.SIGTERM)  # the notice arrives while the report is written
    return "report of " + workdir
report.build_report = build
sys.exit(main.cli(["elm_jax.main", "--config=configs/mlm.py:test", "--workdir=" + sys.argv[1]]))
"""


def test_preemption_notice_while_the_report_is_written_finishes_the_run(tmp_path):
    """Every stage has finished when the report is written: a SIGTERM then is a notice like any
    other (never the default handler's kill, exit -15); the run prints its report and exits 0."""
    proc = subprocess.run([sys.executable, "-c", _NOTICE_DURING_REPORT, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert f"report of {tmp_path}" in proc.stdout
