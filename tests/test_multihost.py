"""Two processes x 2 CPU devices over jax.distributed on loopback == one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import toy_train as T
from elm_jax.engine import metrics as metrics_lib
from elm_jax.engine import sharding as shd
from elm_jax import engine as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "toy_train.py")
STEPS = 6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    workdir = tmp_path / "mh"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "--process_id",
                str(i),
                "--num_processes",
                "2",
                "--port",
                str(port),
                "--workdir",
                str(workdir),
                "--out",
                str(tmp_path / f"out{i}.json"),
                "--steps",
                str(STEPS),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]

    # Meanwhile, the single-process reference with the same config, on one device.
    mesh1 = shd.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), devices=jax.devices()[:1])
    tc = T.make_tc(steps=STEPS, checkpoint_every=3, log_every=1)
    trainer = train.Trainer(T.make_model(), T.loss_fn, T.eval_fn, tc, mesh1)
    ref_state, ref_summary = train.fit(
        trainer, T.ToySource(), T.ToyEvalSource(), tmp_path / "single", name="mh"
    )

    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=150)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"worker {i} failed:\n{logs[i][-4000:]}"

    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [o["process_index"] for o in outs] == [0, 1]
    assert all(o["process_count"] == 2 and o["num_devices"] == 4 for o in outs)
    assert all(o["final_step"] == STEPS for o in outs)

    def curve(path):
        return [(r["step"], r["train/loss"]) for r in metrics_lib.read_metrics(path) if "train/loss" in r]

    multi = curve(workdir / "mh" / "metrics.jsonl")  # written by process 0 only
    single = curve(tmp_path / "single" / "mh" / "metrics.jsonl")
    assert [s for s, _ in multi] == [s for s, _ in single] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([l for _, l in multi], [l for _, l in single], rtol=1e-5, atol=1e-5)
    for o in outs:
        assert o["eval"]["loss"] == pytest.approx(ref_summary["eval"]["loss"], abs=1e-5)
        np.testing.assert_allclose(
            np.asarray(o["embedding"]),
            np.asarray(ref_state.params["embed"]["embedding"].get_value()),
            atol=1e-5,
        )
    # checkpoints were written collectively: the final one is there
    assert sorted(os.listdir(workdir / "mh" / "checkpoints")) == ["3", "6"]
    assert json.loads((workdir / "mh" / "summary.json").read_text())["process_count"] == 2
