"""The whole pipeline in one command, on the tiny test config, for MLM and CLM."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import elm_jax
from elm_jax.config import load_config
from elm_jax.data import context_free
from elm_jax.data.prepare import prepare_data
from elm_jax.models.io import flat_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300")
    return subprocess.run([sys.executable, "-m", "elm_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_all_stages_end_to_end(task, tmp_path):
    run = _main(f"--config=configs/{task}.py:test", f"--workdir={tmp_path}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    search = json.loads((tmp_path / "search" / "result.json").read_text())
    budget = next(iter(search["budgets"]))
    arch = json.loads((tmp_path / "export" / budget / "arch.json").read_text())
    assert arch["params"] == search["budgets"][budget]["params"]  # the searched architecture
    assert arch["params"] <= 16_000  # the test config's budget
    retrain = json.loads((tmp_path / "retrain" / "result.json").read_text())
    assert np.isfinite(retrain[budget]["after"]["loss"])
    model = elm_jax.load_model(tmp_path / "retrain" / budget)
    tok = elm_jax.load_tokenizer(tmp_path / "retrain" / budget)
    ids = np.asarray([[tok.special.cls, *tok.encode("To be, or not to be")]], np.int32)
    logits = np.asarray(model(ids).logits)
    assert logits.shape == (1, ids.shape[1], tok.vocab_size) and np.isfinite(logits).all()
    assert sum(v.size for v in flat_params(model).values()) == arch["params"]
    if task == "mlm":
        ft = json.loads((tmp_path / "finetune" / "result.json").read_text())
        assert 0.0 <= ft[budget]["test_accuracy"] <= 1.0
    ev = json.loads((tmp_path / "evaluate" / "result.json").read_text())
    models = ev["models"]
    assert ev["schema_version"] == 2 and budget in models and models["teacher"]["kind"] == "teacher"
    assert models[budget]["kind"] == "found"
    # each model beside the trivial answer of the same batches, recomputed here
    key = context_free.KEY[task]
    data = prepare_data(load_config(f"configs/{task}.py:test"))
    assert ev["baselines"][key] == pytest.approx(context_free.reference_loss(data, data.eval)[key], rel=1e-12)
    for m in models.values():
        assert m["gain_nats"] == pytest.approx(ev["baselines"][key] - m["loss"], rel=1e-12)
    again = _main(f"--config=configs/{task}.py:test", f"--workdir={tmp_path}")  # all complete: reused
    assert again.returncode == 0 and "complete already" in again.stdout
