"""Non-finite settings are refused like any other bad value (issue 27).

Every float field of every variant of both configs, found by walking the loaded ConfigDict (not
listed by hand), is overridden on the command line with ``nan``, ``inf`` and ``-inf`` and run
through ``elm_jax.main.cli`` as a user runs it: each is refused with the one line
``error: config.<field>: must be finite (got <value>)``, exit code 2, and the work directory is
never created. The positive control overrides the same field with its own (valid) value and
passes the whole validation: ``pipeline.configure_compile_cache`` (the first step after
validation) is replaced by a sentinel that stops the run there.
"""

from __future__ import annotations

import math
import os
import runpy

import pytest

from elm_jax import config as config_lib
from elm_jax import main as main_lib
from elm_jax import pipeline
from elm_jax.config import ConfigError, check_finite, float_fields, load_config
from elm_jax.search.constraints import SearchError, parse_budget

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = runpy.run_path(os.path.join(REPO, "configs", "common.py"))["VARIANTS"]
SPECS = [f"configs/{task}.py:{v}" for task in ("mlm", "clm") for v in VARIANTS]
BAD = ("nan", "inf", "-inf")


class _Validated(Exception):
    """Raised in place of the first step after validation: the config passed."""


def _cli(capsys, spec: str, workdir: str, *overrides: str) -> tuple[int, list[str]]:
    rc = main_lib.cli(["elm_jax.main", f"--config={spec}", f"--workdir={workdir}", "--stages=data",
                       *overrides])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    return rc, err


def _valid_extras(spec: str, tmp_path) -> list[str]:
    """What a variant needs besides the field under test to pass the data stage's validation (the
    paper MLM variant reads a WordPiece vocabulary: any existing file passes validation)."""
    cfg = load_config(spec)
    if cfg.data.tokenizer.kind != "sentencepiece" and not cfg.data.tokenizer.path:
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("[PAD]\n")
        return [f"--config.data.tokenizer.path={vocab}"]
    return []


def test_float_fields_walks_nested_sections_and_lists():
    cfg = load_config("configs/mlm.py:demo")
    fields = dict(float_fields(cfg))
    # one from every nesting level, and none of the ints, bools or strings
    assert fields["data.mask_rate"] == cfg.data.mask_rate
    assert fields["teacher.train.lr"] == cfg.teacher.train.lr
    assert fields["finetune.teacher_train.b2"] == cfg.finetune.teacher_train.b2
    assert "data.seq_len" not in fields and "supernet.grow" not in fields and "task" not in fields
    assert all(isinstance(v, float) for v in fields.values())
    assert not any(name.startswith("search.budgets") for name in fields)
    assert dict(float_fields({"a": [1, 2.5, {"b": float("nan")}]})).keys() == {"a[1]", "a[2].b"}


@pytest.mark.parametrize("spec", SPECS)
def test_every_float_field_refuses_nonfinite_through_the_cli(spec, tmp_path, capsys, monkeypatch):
    def sentinel(cfg):
        raise _Validated

    monkeypatch.setattr(pipeline, "configure_compile_cache", sentinel)
    extras = _valid_extras(spec, tmp_path)
    fields = float_fields(load_config(spec))
    assert len(fields) >= 40, fields  # the walk found the sections (5 trainings x 7 floats alone)
    workdir = str(tmp_path / "wd")
    for name, default in fields:
        for bad in BAD:
            rc, err = _cli(capsys, spec, workdir, *extras, f"--config.{name}={bad}")
            assert (rc, err) == (2, [f"error: config.{name}: must be finite (got {float(bad)!r})"]), \
                (name, bad)
            assert not os.path.exists(workdir), (name, bad)
        # positive control: the same field with a valid value passes the whole validation
        with pytest.raises(_Validated):
            _cli(capsys, spec, workdir, *extras, f"--config.{name}={default!r}")
        assert not os.path.exists(workdir)


def test_nan_cannot_reach_a_range_check():
    """The old hole: ``nan <= 0`` and ``nan > 1`` are both false, so ``mask_rate=nan`` passed
    ``_float(lo=0, hi=1)``; the range check itself now refuses it too."""
    cfg = load_config("configs/mlm.py:test")
    for bad in (math.nan, math.inf):
        with cfg.unlocked():
            cfg.data.mask_rate = bad
        with pytest.raises(ConfigError, match=r"^config\.data\.mask_rate: must be finite"):
            config_lib._float(cfg, "data.mask_rate", 0.0, 1.0, lo_open=True)
        with pytest.raises(ConfigError, match=r"^config\.data\.mask_rate: must be finite"):
            check_finite(cfg)


def test_numpy_floats_are_checked_too():
    """A ConfigDict casts to its field's type, but plain dicts and lists inside it keep numpy
    scalars as given: those are floats too."""
    import numpy as np

    with pytest.raises(ConfigError, match=r"^config\.a\[0\]\.b: must be finite \(got nan\)$"):
        check_finite({"a": [{"b": np.float32("nan")}]})
    check_finite({"a": [{"b": np.float32(1.5)}], "c": 2})


def test_budget_infinity_rule():
    """``max_<q>=inf`` is no bound (exactly as if the key were left out); an infinite minimum,
    NaN and -inf are refused, through the config validation as a user meets them."""
    inf = float("inf")
    assert parse_budget({"name": "b", "max_params": inf, "max_flops": 1e6}) == \
        parse_budget({"name": "b", "max_flops": 1e6}) == ("b", {"max_flops": 1e6})
    for key, value, reason in (("min_params", inf, "must be finite"),
                               ("max_params", float("nan"), "must be a non-negative number"),
                               ("max_latency_ms", -inf, "must be a non-negative number"),
                               ("min_flops", float("nan"), "must be a non-negative number")):
        with pytest.raises(SearchError, match=rf"^budgets\['b'\]\.{key}: {reason}"):
            parse_budget({"name": "b", key: value})
        cfg = load_config("configs/mlm.py:test")
        with cfg.unlocked():
            cfg.search.budgets = [{"name": "b", key: value}]
        with pytest.raises(ConfigError, match=rf"^config\.search\.budgets\[0\]\.{key}: {reason}"):
            config_lib.validate(cfg, ["search"])
    cfg = load_config("configs/mlm.py:test")
    with cfg.unlocked():
        cfg.search.budgets = [{"name": "b", "max_params": inf}]
    config_lib.validate(cfg, ["search"])  # an unbounded budget is a valid budget
