"""Config loading and validation: every bad value is caught before any compute, by field name.

``validate(config, stages)`` raises ``ConfigError`` whose message starts with the dotted field
(``config.data.seq_len: ...``) and says what is allowed.

One rule covers every float of the config, whatever stages run: :func:`check_finite` walks the
whole ``ConfigDict`` (so a field added later is covered without more code) and refuses NaN and
+-infinity as ``config.<dotted.name>: must be finite (got nan)`` before any other check, so no
range comparison (``x <= 0``, ``x > 1``, both false for NaN) is ever reached by NaN. The one
exception is ``search.budgets``, read by its own parser
(:func:`elm_jax.search.constraints.parse_budget`): there ``max_<q>=inf`` means "no upper bound"
(the same as leaving the key out), while NaN and an infinite minimum are refused.
"""

from __future__ import annotations

import math
import os
import runpy
from typing import Any, Sequence

import ml_collections
import numpy as np

from elm_jax import pretrained
from elm_jax.space import SearchSpace

TEACHER_KINDS = ("train", "hf_bert", "hf_gpt2", "checkpoint", "pretrained")


class ConfigError(ValueError):
    """An invalid config value; the message names the field."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:variant]`` the way ``--config`` does (for tests and notebooks)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    return runpy.run_path(path)["get_config"](arg or None)


def _fail(field: str, msg: str, value: Any) -> None:
    raise ConfigError(f"config.{field}: {msg} (got {value!r})")


#: Fields :func:`check_finite` does not walk: they have their own parser with its own rule for
#: infinity (see the module docstring).
OWN_PARSER_FIELDS = ("search.budgets",)


def _is_float(v: Any) -> bool:
    return isinstance(v, (float, np.floating))


def float_fields(cfg: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float setting of ``cfg`` as ``(dotted name, value)``, walking nested ConfigDicts /
    dicts (``a.b``) and lists / tuples (``a[0]``), except :data:`OWN_PARSER_FIELDS`."""
    out: list[tuple[str, float]] = []
    if hasattr(cfg, "keys"):
        items = [(f"{prefix}.{k}" if prefix else str(k), cfg[k]) for k in cfg.keys()]
    elif isinstance(cfg, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(cfg)]
    else:
        return out
    for name, v in items:
        if name in OWN_PARSER_FIELDS:
            continue
        if _is_float(v):
            out.append((name, float(v)))
        else:
            out.extend(float_fields(v, name))
    return out


def check_finite(cfg: Any) -> None:
    """THE finiteness rule: raises ``ConfigError`` ``config.<name>: must be finite (got nan)``
    for the first float setting (:func:`float_fields`) that is NaN or +-infinity."""
    for name, v in float_fields(cfg):
        if not math.isfinite(v):
            _fail(name, "must be finite", v)


def _get(cfg, field: str):
    node = cfg
    for part in field.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise ConfigError(f"config.{field}: missing field")
        node = node[part]
    return node


def _int(cfg, field: str, lo: int | None = None, hi: int | None = None) -> int:
    v = _get(cfg, field)
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(field, "must be an integer", v)
    if lo is not None and v < lo:
        _fail(field, f"must be >= {lo}", v)
    if hi is not None and v > hi:
        _fail(field, f"must be <= {hi}", v)
    return v


def _float(cfg, field: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    v = _get(cfg, field)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(field, "must be a number", v)
    if not math.isfinite(v):
        _fail(field, "must be finite", v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        _fail(field, f"must be {'>' if lo_open else '>='} {lo}", v)
    if hi is not None and (v > hi or (hi_open and v == hi)):
        _fail(field, f"must be {'<' if hi_open else '<='} {hi}", v)
    return float(v)


def _choice(cfg, field: str, choices: Sequence[str]) -> str:
    v = _get(cfg, field)
    if v not in choices:
        _fail(field, f"must be one of {list(choices)}", v)
    return v


def _str(cfg, field: str) -> str:
    v = _get(cfg, field)
    if not isinstance(v, str):
        _fail(field, "must be a string", v)
    return v


def _bool(cfg, field: str) -> bool:
    v = _get(cfg, field)
    if not isinstance(v, bool):
        _fail(field, "must be True or False", v)
    return v


class _Every:
    """``name in _Every()`` is always true: validate every section."""

    def __contains__(self, name: object) -> bool:
        return True


def validate_train(cfg, prefix: str) -> None:
    _int(cfg, f"{prefix}.steps", 1)
    _float(cfg, f"{prefix}.lr", 0.0, lo_open=True)
    _float(cfg, f"{prefix}.warmup_frac", 0.0, 1.0)
    _float(cfg, f"{prefix}.decay_start_frac", 0.0, 1.0, hi_open=True)
    _float(cfg, f"{prefix}.weight_decay", 0.0)
    _float(cfg, f"{prefix}.b1", 0.0, 1.0)
    _float(cfg, f"{prefix}.b2", 0.0, 1.0)
    _float(cfg, f"{prefix}.eps", 0.0, lo_open=True)
    _float(cfg, f"{prefix}.clip_norm", 0.0)
    _int(cfg, f"{prefix}.log_every", 1)
    _int(cfg, f"{prefix}.eval_every", 1)
    _int(cfg, f"{prefix}.checkpoint_every", 1)
    _int(cfg, f"{prefix}.keep_checkpoints", 1)
    _choice(cfg, f"{prefix}.nan_policy", ("stop", "skip"))


def validate(cfg: ml_collections.ConfigDict, stages: Sequence[str] | None = None) -> None:
    """Checks every float of the config for finiteness (:func:`check_finite`), then the fields
    the given stages use (``None``: every section); raises ConfigError naming the first bad
    field."""
    stages = _Every() if stages is None else stages
    check_finite(cfg)
    _choice(cfg, "task", ("mlm", "clm"))
    _int(cfg, "seed", 0)

    corpus = _choice(cfg, "data.corpus", ("shakespeare", "movie_reviews", "shakespeare+movie_reviews",
                                          "files", "tfds"))
    if corpus == "files" and not _str(cfg, "data.train_files").strip():
        _fail("data.train_files", "corpus=files needs training text files or globs", cfg.data.train_files)
    if corpus == "files" and not _str(cfg, "data.validation_files").strip():
        _fail("data.validation_files", "corpus=files needs held-out text files or globs",
              cfg.data.validation_files)
    if corpus == "tfds" and not _str(cfg, "data.tfds_name").strip():
        _fail("data.tfds_name", "corpus=tfds needs a dataset name such as 'wikipedia/20230601.en'",
              cfg.data.tfds_name)
    _str(cfg, "data.search_files")
    _str(cfg, "data.tfds_search_split")
    _float(cfg, "data.search_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    _float(cfg, "data.validation_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
    _str(cfg, "data.cache_dir")
    _int(cfg, "data.max_docs", 0)
    _int(cfg, "data.seq_len", 8, 8192)
    _int(cfg, "data.batch_size", 1)
    _int(cfg, "data.eval_batch_size", 1)
    _int(cfg, "data.eval_batches", 0)
    _float(cfg, "data.mask_rate", 0.0, 1.0, lo_open=True)
    _int(cfg, "data.max_predictions", -1, _get(cfg, "data.seq_len"))
    mf = _float(cfg, "data.mask_token_frac", 0.0, 1.0)
    rf = _float(cfg, "data.random_token_frac", 0.0, 1.0)
    if mf + rf > 1.0:
        _fail("data.random_token_frac", "mask_token_frac + random_token_frac must be <= 1", rf)
    kind = _choice(cfg, "data.tokenizer.kind", ("sentencepiece", "sentencepiece_model", "wordpiece"))
    if kind == "sentencepiece":
        _int(cfg, "data.tokenizer.vocab_size", 16, 1_000_000)
        _choice(cfg, "data.tokenizer.model_type", ("unigram", "bpe", "char", "word"))
        _int(cfg, "data.tokenizer.max_train_chars", 0)
    else:
        path = _str(cfg, "data.tokenizer.path")
        if not path:
            _fail("data.tokenizer.path", f"tokenizer kind {kind!r} needs the model file or the "
                  "checkpoint directory that holds it", path)
        if pretrained.is_pretrained(path):
            try:
                pretrained.resolve_path(path)
            except pretrained.PretrainedError as e:
                _fail("data.tokenizer.path", str(e), path)
        elif not os.path.exists(path):
            _fail("data.tokenizer.path", "does not exist", path)

    _int(cfg, "mesh.data", -1)
    if cfg.mesh.data == 0:
        _fail("mesh.data", "must be -1 (all devices) or a positive count", 0)
    _int(cfg, "mesh.fsdp", 1)
    _choice(cfg, "precision", ("auto", "float32", "bfloat16"))
    cache = _str(cfg, "compile_cache_dir")
    if cache not in ("", "none") and os.path.exists(cache) and not os.path.isdir(cache):
        _fail("compile_cache_dir", "is a file; give a directory, '' (the data cache) or 'none'", cache)

    if "teacher" in stages:
        source = _str(cfg, "teacher.source")
        kind, _, arg = source.partition(":")
        if kind not in TEACHER_KINDS:
            _fail("teacher.source", f"must be 'train', one of "
                  f"{[k + ':DIR' for k in TEACHER_KINDS if k not in ('train', 'pretrained')]} or "
                  f"'pretrained:NAME' (NAME: one of {sorted(pretrained.CHECKPOINTS)})", source)
        if kind == "pretrained":
            try:
                pretrained.resolve_source(source)
            except pretrained.PretrainedError as e:
                _fail("teacher.source", str(e), source)
        elif kind != "train":
            if not arg:
                _fail("teacher.source", f"'{kind}:' needs a directory after the colon", source)
            if not os.path.isdir(arg):
                _fail("teacher.source", f"teacher directory {arg} does not exist", source)
        else:
            _bool(cfg, "teacher.cache")
            m = "teacher.model"
            _choice(cfg, f"{m}.family", ("bert", "mobilebert", "gpt2"))
            _int(cfg, f"{m}.layers", 1)
            hidden = _int(cfg, f"{m}.hidden", 1)
            heads = _int(cfg, f"{m}.heads", 1)
            _int(cfg, f"{m}.ffn", 1)
            if hidden % heads:
                _fail(f"{m}.heads", f"must divide teacher.model.hidden={hidden}", heads)
            _choice(cfg, f"{m}.embedding", ("standard", "factorized"))
            _int(cfg, f"{m}.embed_size", 1)
            _float(cfg, f"{m}.dropout", 0.0, 1.0)
            validate_train(cfg, "teacher.train")
    if "supernet" in stages:
        validate_space(cfg)
        sc = "supernet"
        validate_train(cfg, f"{sc}.train")
        mode = _choice(cfg, f"{sc}.sample_per", ("step", "device"))
        if _get(cfg, f"{sc}.sandwich") and mode != "device":
            _fail(f"{sc}.sandwich", "the sandwich rule needs supernet.sample_per='device'", True)
        paths = _int(cfg, f"{sc}.paths_per_device", 1)
        if paths > 1 and mode != "device":
            _fail(f"{sc}.paths_per_device", "several paths per device need supernet.sample_per='device'", paths)
        _choice(cfg, f"{sc}.kd_loss", ("pearson", "mse"))
        _float(cfg, f"{sc}.gt_weight", 0.0)
        _int(cfg, f"{sc}.calc_every", 1)
        _int(cfg, f"{sc}.epoch_steps", 0)
        _int(cfg, f"{sc}.num_add", 0)
        _float(cfg, f"{sc}.upper_params", 0.0)
        _bool(cfg, f"{sc}.grow")
        _bool(cfg, f"{sc}.remat")


    if "search" in stages:
        validate_space(cfg)
        validate_search(cfg)
    if "search" in stages or "export" in stages:
        _bool(cfg, "latency.predict")
        _int(cfg, "latency.batch", 1)
        _int(cfg, "latency.seq_len", 0, _get(cfg, "data.seq_len"))
        _int(cfg, "latency.repeats", 1)
        _int(cfg, "latency.warmup", 0)
        _float(cfg, "latency.quantile", 0.0, 1.0)
        _float(cfg, "latency.min_time_s", 0.0)
        _str(cfg, "latency.cache_dir")
    if "export" in stages:
        _bool(cfg, "export.cka_heads")
        _float(cfg, "export.cka_threshold", 0.0, 1.0, lo_open=True)
        _bool(cfg, "export.measure_latency")
        base = _get(cfg, "export.baselines")
        if not isinstance(base, (list, tuple)) or any(f not in ("bert", "mobilebert") for f in base):
            _fail("export.baselines", "must be a list of block families from ['bert', 'mobilebert']", base)
    if "retrain" in stages:
        validate_train(cfg, "retrain.train")
        _choice(cfg, "retrain.kd_loss", ("pearson", "mse"))
        _float(cfg, "retrain.gt_weight", 0.0)
    if "finetune" in stages and cfg.task == "mlm":
        validate_train(cfg, "finetune.train")
        _int(cfg, "finetune.batch_size", 1)
        _int(cfg, "finetune.seeds", 1)
        _bool(cfg, "finetune.scratch")
        _choice(cfg, "finetune.pooling", ("cls", "mean"))
        from elm_jax.data.corpus import DataError
        from elm_jax.data.glue import parse_task

        task = _str(cfg, "finetune.task")
        try:
            parse_task(task)
        except DataError as e:
            _fail("finetune.task", str(e), task)
        _str(cfg, "finetune.tfds_data_dir")
        frac = _float(cfg, "finetune.holdout_frac", 0.0, 1.0, lo_open=True)
        if frac >= 1.0:
            _fail("finetune.holdout_frac", "must be < 1 (the rest of GLUE train is trained on)", frac)
        if _choice(cfg, "finetune.kd", ("none", "dist", "soft_ce")) != "none":
            _float(cfg, "finetune.kd_weight", 0.0)
            _float(cfg, "finetune.temperature", 0.0, lo_open=True)
            validate_train(cfg, "finetune.teacher_train")


def validate_search(cfg) -> None:
    """The ``search`` section through the search's own checkers (one parser each):
    :func:`~elm_jax.search.evolution.check_search_params` and
    :func:`~elm_jax.search.constraints.parse_budgets`; their :class:`SearchError` (message
    ``search.<field>: <reason> (got <value>)``) becomes ``config.<message>``."""
    from elm_jax.search.constraints import SearchError, parse_budgets
    from elm_jax.search.evolution import SEARCH_PARAMS, check_search_params

    search = _get(cfg, "search")
    _bool(cfg, "search.random_control")
    _int(cfg, "search.rerank_top", 0)
    _int(cfg, "search.rerank_steps", 1)
    _float(cfg, "search.rerank_tie_level", 0.0, 1.0, hi_open=True)
    try:
        check_search_params(search, SEARCH_PARAMS)
        parse_budgets(_get(cfg, "search.budgets"))
    except SearchError as e:
        raise ConfigError(f"config.{e}") from None


def validate_space(cfg) -> None:
    """The search space section, through SearchSpace's own checks (clear ArchError text)."""
    from elm_jax.arch import ArchError

    try:
        space = SearchSpace.from_config(cfg.space, vocab_size=max(cfg.data.tokenizer.vocab_size, 16),
                                        max_len=cfg.data.seq_len, task=cfg.task)
    except ArchError as e:
        raise ConfigError(f"config.space: {e}") from None
    if space.inner > space.hidden:
        _fail("space.inner", f"the MobileBERT bottleneck must not be wider than space.hidden={space.hidden}",
              space.inner)
    top = space.f0 * space.candidates
    for fam in space.families:
        cap = space.max_ffn_of(fam)
        if top > cap:
            _fail(f"space.max_ffn.{fam}", f"is below the widest initial FFN width f0 * candidates = "
                  f"{space.f0} * {space.candidates} = {top}; raise it or lower space.f0 / space.candidates",
                  cap)
