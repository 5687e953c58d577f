"""The teacher cache: a teacher trained here is trained once per corpus, tokenizer, config, seed
and code, and reused (copied, bit for bit) by every work directory with the same key."""

import json
import shutil
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from elm_jax import engine, report, teacher_cache
from elm_jax.config import ConfigError, load_config, validate
from elm_jax.data.prepare import prepare_data
from elm_jax.models.io import CONFIG_FILE, PARAMS_FILE
from elm_jax.pipeline import BY_NAME
from elm_jax.stages import teacher as teacher_stage
from elm_jax.workdir import stage_fields


@pytest.fixture(scope="module")
def cfg():
    c = load_config("configs/mlm.py:test")
    c.teacher.cache = True
    return c


@pytest.fixture(scope="module")
def data(cfg):
    return prepare_data(cfg)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A private cache root for the teacher entries (the corpus cache stays the shared one)."""
    root = tmp_path / "cache"
    monkeypatch.setattr(teacher_stage, "cache_dir_of", lambda data_cfg: root)
    return root


class TrainingCalled(Exception):
    pass


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise TrainingCalled
    monkeypatch.setattr(engine, "fit", refuse)


def _with(cfg, field: str, value) -> ConfigDict:
    """A copy of ``cfg`` with the dotted ``field`` set to ``value``."""
    out = ConfigDict(cfg.to_dict())
    *path, name = field.split(".")
    node = out
    for part in path:
        node = node[part]
    node[name] = value
    return out


def _key(cfg, data) -> str:
    return teacher_cache.key_of(teacher_cache.key_parts(cfg, data))


def test_trained_once_then_reused_bit_for_bit(cfg, data, cache_root, tmp_path, monkeypatch, capsys):
    first = teacher_stage.run(cfg, tmp_path / "w1", data)
    out = capsys.readouterr().out
    key = _key(cfg, data)
    assert first["cache"] == {"key": key, "reused": False}
    assert "stored in the teacher cache" in out and "training" in out
    entry = teacher_cache.lookup(cache_root, key)
    assert entry == teacher_cache.entry_dir(cache_root, key)
    assert json.loads((entry / teacher_cache.KEY_FILE).read_text())["key"] == key

    _no_training(monkeypatch)  # the second work directory must not train
    second = teacher_stage.run(cfg, tmp_path / "w2", data)
    out = capsys.readouterr().out
    assert "[teacher] reused the teacher trained for the same corpus" in out and str(entry) in out
    assert second["cache"] == {"key": key, "reused": True}
    strip = lambda s: {k: v for k, v in s.items() if k != "cache"}  # noqa: E731
    assert strip(second) == strip(json.loads(json.dumps(first)))
    for f in (CONFIG_FILE, PARAMS_FILE):
        a = (tmp_path / "w1" / "teacher" / "model" / f).read_bytes()
        assert (tmp_path / "w2" / "teacher" / "model" / f).read_bytes() == a
    assert json.loads((tmp_path / "w2" / "teacher" / "result.json").read_text()) == second
    # the training curve comes along, and the report says where the teacher came from
    log = (tmp_path / "w1" / "teacher" / "metrics.jsonl").read_bytes()
    assert log and (tmp_path / "w2" / "teacher" / "metrics.jsonl").read_bytes() == log
    assert report.main([f"--workdir={tmp_path / 'w2'}"]) == 0
    assert f"Reused from the teacher cache (key {key})" in capsys.readouterr().out
    assert report.main([f"--workdir={tmp_path / 'w1'}"]) == 0
    assert "Reused from the teacher cache" not in capsys.readouterr().out
    # the reused teacher still says it learnt nothing (the tiny test teacher does not)
    assert second["learned"] is False and "warning: no gain over the trivial answer" in out


def test_changed_key_or_cache_off_trains_anew(cfg, data, cache_root, tmp_path, monkeypatch):
    teacher_stage.run(cfg, tmp_path / "w1", data)
    _no_training(monkeypatch)
    with pytest.raises(TrainingCalled):
        teacher_stage.run(_with(cfg, "teacher.train.lr", 2e-3), tmp_path / "w2", data)
    with pytest.raises(TrainingCalled):
        teacher_stage.run(_with(cfg, "teacher.cache", False), tmp_path / "w3", data)
    # the same key reuses (the positive control of this test)
    assert teacher_stage.run(cfg, tmp_path / "w4", data)["cache"]["reused"] is True


@pytest.mark.parametrize("field, value", [
    ("seed", 1), ("teacher.train.lr", 2e-3), ("teacher.train.steps", 21), ("teacher.model.hidden", 48),
    ("data.mask_rate", 0.2), ("data.seq_len", 48), ("precision", "bfloat16"),
])
def test_key_changes_with_every_result_field(cfg, data, field, value):
    assert _key(_with(cfg, field, value), data) != _key(cfg, data)


@pytest.mark.parametrize("field, value", [
    ("teacher.train.eval_every", 5), ("teacher.train.checkpoint_every", 5), ("teacher.cache", False),
    ("data.cache_dir", "/elsewhere"), ("mesh.data", 2), ("supernet.train.steps", 3),
])
def test_key_ignores_fields_that_do_not_change_the_teacher(cfg, data, field, value):
    assert _key(_with(cfg, field, value), data) == _key(cfg, data)


def test_key_changes_with_corpus_and_tokenizer(cfg, data):
    parts = teacher_cache.key_parts(cfg, data)
    assert parts["corpus"] == data.stats["documents_key"]
    fewer = _with(cfg, "data.max_docs", 3)  # other documents (the config part changes too)
    assert teacher_cache.key_parts(fewer, prepare_data(fewer))["corpus"] != parts["corpus"]
    tok = parts["tokenizer"]
    assert tok["vocab_size"] == data.tokenizer.vocab_size and len(tok["sha256"]) == 64
    other_vocab = _with(cfg, "data.tokenizer.vocab_size", 300)
    assert teacher_cache.key_parts(other_vocab, prepare_data(other_vocab))["tokenizer"]["sha256"] != tok["sha256"]


def test_code_version_follows_every_source_file(tmp_path):
    pkg = Path(teacher_cache.__file__).parent
    for rel in teacher_cache.CODE_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pkg / rel, tmp_path / rel)
    base = teacher_cache.code_version(tmp_path)
    assert base == teacher_cache.code_version()
    for rel in ("models/dense.py", "engine/trainer.py", "data/pipeline.py"):
        original = (tmp_path / rel).read_bytes()
        (tmp_path / rel).write_bytes(original + b"\n# an edit\n")
        assert teacher_cache.code_version(tmp_path) != base, rel
        (tmp_path / rel).write_bytes(original)
    assert teacher_cache.code_version(tmp_path) == base


def test_incomplete_entry_is_a_miss_and_store_keeps_the_first(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / CONFIG_FILE).write_text("{}")
    (src / PARAMS_FILE).write_bytes(b"x")
    entry = teacher_cache.store(tmp_path / "c", "k", {"code": "1"}, tmp_path, {"eval": {"loss": 1.0}})
    assert teacher_cache.lookup(tmp_path / "c", "k") == entry
    again = teacher_cache.store(tmp_path / "c", "k", {"code": "1"}, tmp_path, {"eval": {"loss": 2.0}})
    assert again == entry and json.loads((entry / "result.json").read_text())["eval"]["loss"] == 1.0
    (entry / teacher_cache.KEY_FILE).unlink()  # e.g. damaged by hand: no longer complete
    assert teacher_cache.lookup(tmp_path / "c", "k") is None


def test_cache_field_is_not_a_config_change_and_must_be_a_bool(cfg):
    off = _with(cfg, "teacher.cache", False)
    assert stage_fields(off, BY_NAME["teacher"]) == stage_fields(cfg, BY_NAME["teacher"])
    bad = ConfigDict(cfg.to_dict(), type_safe=False)  # e.g. built in Python, not from flags
    bad.teacher.cache = "yes"
    with pytest.raises(ConfigError, match="teacher.cache: must be True or False"):
        validate(bad, ["teacher"])


def test_unwritable_cache_is_a_warning_not_a_lost_teacher(cfg, data, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(teacher_stage, "cache_dir_of", lambda data_cfg: blocker / "cache")
    summary = teacher_stage.run(cfg, tmp_path / "w", data)
    out = capsys.readouterr().out
    assert "warning: could not store the teacher in the teacher cache" in out
    assert "cache" not in summary and (tmp_path / "w" / "teacher" / "result.json").is_file()
    assert summary["train"]["final_step"] == cfg.teacher.train.steps
