"""Configs: every variant loads, validation names the bad field, the CLI fails clearly."""

import os
import re
import subprocess
import sys

import pytest

from elm_jax import config as config_lib
from elm_jax.config import ConfigError, load_config
from elm_jax.pipeline import STAGE_NAMES as STAGES, parse_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("task", ["mlm", "clm"])
@pytest.mark.parametrize("variant", ["", ":demo", ":test"])
def test_cpu_variants_validate(task, variant):
    cfg = load_config(f"configs/{task}.py{variant}")
    config_lib.validate(cfg)
    assert cfg.task == task and cfg.variant == (variant[1:] or "demo")


def test_paper_variants_need_the_teacher_checkpoint():
    mlm = load_config("configs/mlm.py:paper")
    assert (mlm.space.hidden, mlm.space.layers, mlm.data.seq_len, mlm.data.batch_size) == (528, 12, 128, 256)
    assert mlm.teacher.train.lr == 1e-4 and mlm.data.tokenizer.vocab_size == 30522
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer\.path"):
        config_lib.validate(mlm)
    clm = load_config("configs/clm.py:paper")
    config_lib.validate(clm, ["data"])
    with pytest.raises(ConfigError, match=r"config\.teacher\.source.*needs a directory"):
        config_lib.validate(clm, ["teacher"])


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        load_config("configs/mlm.py:huge")
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        load_config("configs/mlm.py:demo,huge")


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_variants_combine_later_ones_winning(task):
    demo, test = load_config(f"configs/{task}.py:demo"), load_config(f"configs/{task}.py:test")
    both = load_config(f"configs/{task}.py:demo,test")
    config_lib.validate(both)
    assert both.variant == "demo,test"
    # Fields both set come from the later variant, in the shared and the task file's parts alike.
    assert both.teacher.train.to_dict() == test.teacher.train.to_dict() != demo.teacher.train.to_dict()
    assert both.space.to_dict() == test.space.to_dict() != demo.space.to_dict()
    assert both.data.tokenizer.vocab_size == test.data.tokenizer.vocab_size
    # The test's 8 rows carry one architecture per step, after the demo's sandwich rule too.
    assert demo.supernet.sandwich and both.supernet.to_dict() == test.supernet.to_dict()
    reverse = load_config(f"configs/{task}.py:test,demo")
    assert reverse.teacher.train.to_dict() == demo.teacher.train.to_dict()
    assert reverse.space.to_dict() == test.space.to_dict()  # the demo sets no space field
    if task == "mlm":  # a field only the earlier variant sets survives: the demo's 40% masking
        assert both.data.mask_rate == 0.4 != test.data.mask_rate


BAD = [
    ("task", "seq2seq", "task"),
    ("seed", -1, "seed"),
    ("seed", "0", "seed"),
    ("data.corpus", "web", "data.corpus"),
    ("data.seq_len", 4, "data.seq_len"),
    ("data.seq_len", 32.5, "data.seq_len"),
    ("data.batch_size", 0, "data.batch_size"),
    ("data.mask_rate", 0.0, "data.mask_rate"),
    ("data.mask_rate", 1.5, "data.mask_rate"),
    ("data.search_fraction", 0.0, "data.search_fraction"),
    ("data.search_fraction", 1.0, "data.search_fraction"),
    ("data.search_fraction", "x", "data.search_fraction"),
    ("data.validation_fraction", 0.0, "data.validation_fraction"),
    ("data.validation_fraction", 1.0, "data.validation_fraction"),
    ("data.random_token_frac", 0.5, "data.random_token_frac"),
    ("data.tokenizer.kind", "bpe", "data.tokenizer.kind"),
    ("data.tokenizer.vocab_size", 3, "data.tokenizer.vocab_size"),
    ("mesh.data", 0, "mesh.data"),
    ("mesh.fsdp", 0, "mesh.fsdp"),
    ("teacher.source", "hub:bert-base", "teacher.source"),
    ("teacher.source", "hf_bert:/no/such/dir", "teacher.source"),
    ("teacher.model.heads", 5, "teacher.model.heads"),
    ("teacher.model.family", "lstm", "teacher.model.family"),
    ("teacher.train.steps", 0, "teacher.train.steps"),
    ("teacher.train.lr", -1e-3, "teacher.train.lr"),
    ("teacher.train.warmup_frac", 2.0, "teacher.train.warmup_frac"),
    ("teacher.train.nan_policy", "ignore", "teacher.train.nan_policy"),
    ("search.population", 5, "search.population"),
    ("search.mutation_prob", 1.5, "search.mutation_prob"),
    ("search.budgets", [], "search.budgets"),
    ("search.random_control", 1, "search.random_control"),
    ("supernet.kd_loss", "kl", "supernet.kd_loss"),
    ("supernet.sandwich", True, "supernet.sandwich"),
    ("space.base_heads", 5, "space"),
    ("precision", "fp16", "precision"),
    ("supernet.remat", 1, "supernet.remat"),
    ("compile_cache_dir", 5, "compile_cache_dir"),
    ("space.max_ffn.bert", 16, "space.max_ffn.bert"),
    ("latency.seq_len", 999, "latency.seq_len"),
]


@pytest.mark.parametrize("field,value,named", BAD)
def test_bad_value_names_the_field(field, value, named):
    cfg = load_config("configs/mlm.py:test")
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError, match="^" + re.escape(f"config.{named}:")):
        config_lib.validate(cfg)


def test_files_corpus_needs_files():
    cfg = load_config("configs/mlm.py:test")
    cfg.data.corpus = "files"
    with pytest.raises(ConfigError, match=r"config\.data\.train_files"):
        config_lib.validate(cfg)


def test_parse_stages():
    assert parse_stages("all") == list(STAGES)
    assert parse_stages("search,data") == ["data", "search"]
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['trian'\]"):
        parse_stages("data,trian")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "elm_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_data_stage_and_clear_errors(tmp_path):
    ok = _cli("--config=configs/mlm.py:test", f"--workdir={tmp_path}", "--stages=data")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "train" in ok.stdout and "validation" in ok.stdout and "chars/tok" in ok.stdout
    assert (tmp_path / "data" / "stats.json").is_file()

    bad = _cli("--config=configs/mlm.py:test", f"--workdir={tmp_path}", "--stages=data",
               "--config.data.seq_len=3")
    assert bad.returncode == 2 and "config.data.seq_len: must be >= 8" in bad.stderr
    assert "Traceback" not in bad.stderr

    unknown = _cli("--config=configs/mlm.py:test", f"--workdir={tmp_path}", "--stages=bogus")
    assert unknown.returncode == 2 and "unknown stage" in unknown.stderr

    combo = _cli("--config=configs/mlm.py:test,huge", f"--workdir={tmp_path}", "--stages=data")
    assert combo.returncode == 2 and "unknown config variant 'huge'" in combo.stderr
    assert "Traceback" not in combo.stderr

    nowork = _cli("--config=configs/mlm.py:test", "--stages=data")
    assert nowork.returncode == 2 and "--workdir is required" in nowork.stderr

    locked = _cli("--config=configs/mlm.py:test", f"--workdir={tmp_path}", "--config.data.no_such_field=1")
    assert locked.returncode != 0 and "no_such_field" in locked.stderr


def test_budget_min_above_max_is_refused_by_the_config():
    """The config reads budgets with the search's parser, so a minimum above its maximum is
    refused before any compute (it was a preflight check after the data stage)."""
    cfg = load_config("configs/mlm.py:test")
    cfg.search.budgets = [{"name": "a", "min_params": 2000, "max_params": 1000, "max_flops": None}]
    with pytest.raises(ConfigError) as e:
        config_lib.validate(cfg)
    assert str(e.value) == "config.search.budgets[0].min_params: exceeds max_params=1,000 (got 2,000)"
