"""The whole pipeline in one command, on the tiny test config, for MLM and CLM."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import elm_jax
from elm_jax.config import load_config
from elm_jax.data import context_free
from elm_jax.data.prepare import prepare_data
from elm_jax.data.tasks import load_task
from elm_jax.engine.checkpoint import Checkpointer
from elm_jax.models.classifier import Classifier, encoder_of
from elm_jax.models.io import flat_params
from elm_jax.precision import compute_dtype
from elm_jax.stages.finetune import SELECTION_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300")
    return subprocess.run([sys.executable, "-m", "elm_jax.main", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


def _selected_test_confusion(wd, budget, entry):
    """The fine-tune stage's test confusion counts ``[true][predicted]`` recomputed here: the
    selected step's classifier restored from its run's store (onto one device) and its
    predictions on the test split."""
    cfg = load_config("configs/mlm.py:test")
    model_dir = wd / "retrain" / budget
    task = load_task(cfg, elm_jax.load_tokenizer(model_dir))
    encoder = encoder_of(elm_jax.load_model(model_dir), compute_dtype(cfg))
    graphdef, params, other = nnx.split(Classifier(encoder, task.num_classes, cfg.seed), nnx.Param, ...)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            {"params": params, "other": other})
    with Checkpointer(wd / "finetune" / f"{budget}_polarity_run" / SELECTION_DIR, keep=0, save_every=1) as ck:
        tree, _ = ck.restore(entry["selected_step"], abstract)
    model = nnx.merge(graphdef, tree["params"], tree["other"])
    test = task.tests["test"]
    logits = nnx.jit(lambda m, *a: m(*a))(model, test["inputs"], test["mask"], test["segment_ids"])
    cm = np.zeros((task.num_classes,) * 2, int)
    np.add.at(cm, (test["labels"], np.asarray(logits).argmax(-1)), 1)
    return cm


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_all_stages_end_to_end(task, tmp_path):
    # CLM also runs the random-search control: its best is exported, retrained and evaluated
    control = ["--config.search.random_control=True"] if task == "clm" else []
    run = _main(f"--config=configs/{task}.py:test", f"--workdir={tmp_path}", *control)
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
        entry = ft[budget]
        # the test config evaluates the holdout only after the last step: the final model is selected
        assert entry["selected_step"] == entry["steps"] == entry["final"]["step"]
        cm = _selected_test_confusion(tmp_path, budget, entry)
        assert entry["test_confusion"] == cm.tolist()
        assert entry["test_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        bow = json.loads((tmp_path / "finetune" / "bag_of_words.json").read_text())
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
        # its standard error, paired over the same rows with the trivial answer
        g = m["gain_noise"]
        assert g["gain"] == pytest.approx(m["gain_nats"], rel=1e-9, abs=1e-12) and g["se"] > 0
        assert g["lo"] < g["gain"] < g["hi"] and g["level"] == 0.9
    found = models[budget]
    assert found["versus"] and set(found["versus"]) == {n for n, m in models.items()
                                                       if m["kind"] not in ("found", "teacher")}
    if control:  # the random search's best, beside the found model like a baseline
        rnd = search["budgets"][budget]["random"]
        assert rnd["sampled"] == search["budgets"][budget]["evaluated"]
        if rnd["arch_id"] != search["budgets"][budget]["arch_id"]:
            assert models[f"{budget}_random"]["kind"] == "random_best"
            assert f"{budget}_random" in found["versus"]
            assert "random_best" in (tmp_path / "report.md").read_text()
    for b, v in found["versus"].items():  # the baseline's loss minus the found model's
        assert v["gain"] == pytest.approx(models[b]["loss"] - found["loss"], rel=1e-9, abs=1e-12)
    if task == "mlm":  # the fine-tuning floor and each model's accuracy beside it
        assert ev["baselines"]["bag_of_words_test_accuracy"] == bow["test_accuracy"]
        assert models[budget]["finetune_test_accuracy"] == entry["test_accuracy"]
    again = _main(f"--config=configs/{task}.py:test", f"--workdir={tmp_path}", *control)  # all complete: reused
    assert again.returncode == 0 and "complete already" in again.stdout
