"""Teacher stage: training here, pretrained sources, saved model directories."""

import collections
import hashlib
import json

import numpy as np
import pytest
from ml_collections import ConfigDict
from safetensors.numpy import load_file
from test_hf_loaders import assert_close_real, forward, minilm_dir

from elm_jax.config import ConfigError, load_config
from elm_jax.data.prepare import prepare_data
from elm_jax.data.tokenizer import WordPieceTokenizer
from elm_jax.engine import sharding
from elm_jax.lm import dense_config_from, evaluate_lm, load_teacher
from elm_jax.models.dense import init_dense
from elm_jax.models.io import PARAMS_FILE, flat_params, load_model, save_model
from elm_jax.stages.teacher import run as run_teacher_stage


@pytest.fixture(scope="module")
def mlm_cfg():
    return load_config("configs/mlm.py:test")


@pytest.fixture(scope="module")
def mlm_data(mlm_cfg):
    return prepare_data(mlm_cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlm_cfg, mlm_data):
    wd = tmp_path_factory.mktemp("teacher_wd")
    return wd, run_teacher_stage(mlm_cfg, wd, mlm_data)


def _eval(model, cfg, data):
    return evaluate_lm(model, data.eval, sharding.make_mesh(cfg.mesh))


def test_trained_teacher_beats_its_initialisation(trained, mlm_cfg, mlm_data):
    wd, summary = trained
    untrained = init_dense(dense_config_from(mlm_cfg, mlm_data.tokenizer.vocab_size), seed=0)
    before = _eval(untrained, mlm_cfg, mlm_data)["loss"]
    after = summary["eval"]["loss"]
    assert after < before - 0.2, (before, after)
    assert abs(summary["eval"]["perplexity"] - np.exp(after)) < 1e-6 * np.exp(after)
    assert summary["train"]["final_step"] == mlm_cfg.teacher.train.steps
    # the saved model reproduces the reported validation loss
    again = _eval(load_teacher(wd), mlm_cfg, mlm_data)["loss"]
    assert abs(again - after) < 1e-5


def test_complete_stage_is_reused(trained, mlm_cfg, mlm_data):
    wd, summary = trained
    mtime = (wd / "teacher" / "model" / PARAMS_FILE).stat().st_mtime_ns
    again = run_teacher_stage(mlm_cfg, wd, mlm_data)
    assert again == json.loads(json.dumps(summary))
    assert (wd / "teacher" / "model" / PARAMS_FILE).stat().st_mtime_ns == mtime


def test_checkpoint_source_loads_a_saved_teacher(trained, mlm_cfg, mlm_data, tmp_path):
    wd, summary = trained
    cfg = ConfigDict(mlm_cfg.to_dict())
    cfg.teacher.source = f"checkpoint:{wd / 'teacher' / 'model'}"
    got = run_teacher_stage(cfg, tmp_path, mlm_data)
    assert abs(got["eval"]["loss"] - summary["eval"]["loss"]) < 1e-5


def test_model_dir_round_trip_is_exact(trained, tmp_path):
    wd, _ = trained
    model = load_teacher(wd)
    save_model(tmp_path / "m", model, {"x": 1})
    back, meta = load_model(tmp_path / "m")
    ids = np.arange(2 * 16).reshape(2, 16) % model.cfg.vocab_size
    a, b = model(ids).logits, back(ids).logits
    assert meta == {"x": 1} and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="not an elm-jax model directory"):
        load_model(tmp_path)


def test_vocabulary_mismatch_is_a_clear_error(mlm_data, tmp_path):
    cfg = load_config("configs/clm.py:test")
    cfg.teacher.source = "hf_gpt2:tests/fixtures/tiny_gpt2"
    with pytest.raises(ConfigError, match="teacher's vocabulary has 512 entries but the tokenizer has 256"):
        run_teacher_stage(cfg, tmp_path, prepare_data(cfg))


def test_wordpiece_tokenizer_matches_transformers():
    ref = np.load("tests/fixtures/minilm_ref.npz")
    tok = WordPieceTokenizer(minilm_dir())
    assert tok.vocab_size == 30522 and tok.special.cls == 101 and tok.special.mask == 103
    for row, text in zip(ref["input_ids"], ["The cat sat on the mat.", "JAX compiles numerical programs."]):
        want = row[row > 0]
        assert [tok.special.cls, *tok.encode(text), tok.special.sep] == want.tolist()


def _digest(a) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


def test_pretrained_bert_as_feature_teacher(tmp_path):
    """``hf_bert:DIR`` makes the real all-MiniLM-L6-v2 checkpoint the teacher, saved untrained and
    unchanged: every tensor of the checkpoint (but the pooler, which the encoder does not use) is
    one of the saved model's parameters bit for bit (Linear weights as their transpose), and the
    saved model, read back, reproduces transformers' hidden states (tests/fixtures/minilm_ref.npz,
    with padding and segment-1 tokens). The loader's own fidelity is tests/test_hf_loaders.py's;
    this is the stage's: what it wrote is the pretrained model."""
    cfg = load_config("configs/mlm.py:test")
    d = minilm_dir()
    cfg.teacher.source = f"hf_bert:{d}"
    cfg.data.tokenizer.update(kind="wordpiece", path=str(d))
    data = prepare_data(cfg)
    summary = run_teacher_stage(cfg, tmp_path, data)
    assert summary["eval"] == {} and summary["dense_config"]["head"] == "none"
    teacher = load_teacher(tmp_path)
    saved = collections.Counter(_digest(v) for v in flat_params(teacher).values())
    raw = load_file(str(d / "model.safetensors"))
    want = collections.Counter()
    for k, v in raw.items():
        if k.startswith("pooler.") or k.endswith("position_ids"):
            continue
        want[_digest(v) if _digest(v) in saved else _digest(v.T)] += 1
    assert saved == want
    ref = np.load("tests/fixtures/minilm_ref.npz")
    mask = ref["attention_mask"]
    out = forward(teacher, ref["input_ids"], mask, ref["token_type_ids"])
    assert len(out.block_outs) == len(ref["hidden_states"]) - 1
    assert_close_real(out.block_outs[-1], ref["hidden_states"][-1], mask, "saved teacher, last layer")
