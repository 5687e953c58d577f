"""Checks that need the devices, the tokenizer or the work directory, run before any stage
computes (``config.validate`` covers what the config alone can tell).

Each failure is a :class:`~elm_jax.config.ConfigError` (or ``DataError``) whose one-line message
names the field or file and what to change, so a mistake surfaces in seconds instead of after
hours of training: a batch the devices cannot split, a budget no architecture can meet, a
teacher whose vocabulary or length does not fit the tokenizer, fine-tuning data that cannot be
read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elm_jax import pretrained
from elm_jax.config import ConfigError
from elm_jax.space import SearchSpace


def check_devices(cfg: Any, stages: Sequence[str]) -> int:
    """The mesh fits the devices and every global batch splits evenly over them (the batch is
    sharded over both mesh axes). Returns the device count."""
    from elm_jax.engine import sharding

    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError(f"config.{e}" if str(e).startswith("mesh.") else f"config.mesh: {e}") from None
    n = int(mesh.devices.size)
    fields = ["data.batch_size", "data.eval_batch_size"]
    if "finetune" in stages and cfg.task == "mlm":
        fields.append("finetune.batch_size")
    for field in fields:
        node = cfg
        for part in field.split("."):
            node = node[part]
        if int(node) % n:
            up = -(-int(node) // n) * n
            raise ConfigError(
                f"config.{field}: must be divisible by the {n} devices the batch is split over "
                f"(mesh {dict(mesh.shape)}); use a multiple of {n}, e.g. {up} (got {int(node)})")
    sc = cfg.supernet
    paths = int(sc.get("paths_per_device", 1) or 1) if sc.get("sample_per") == "device" else 1
    rows = int(cfg.data.batch_size) // n
    if "supernet" in stages and rows % paths:
        raise ConfigError(
            f"config.supernet.paths_per_device: each of the {n} devices gets {rows} rows of "
            f"data.batch_size={int(cfg.data.batch_size)}, which do not split evenly over {paths} "
            f"architectures; use a data.batch_size that is a multiple of {n * paths} or fewer paths "
            f"(got {paths})")
    return n


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def check_data_inputs(cfg: Any) -> None:
    """Input files the data stage reads, probed before it runs: a given tokenizer file must load,
    and a tfds corpus must open and yield its first and last record in each split (a truncated or
    overwritten record file fails there), so damage is reported as one line naming the file."""
    from elm_jax.data.corpus import DataError

    tok = cfg.data.tokenizer
    if tok.kind in ("sentencepiece_model", "wordpiece"):
        from elm_jax.data.tokenizer import SentencePieceTokenizer, WordPieceTokenizer

        path = pretrained.resolve_path(tok.path)
        try:
            if tok.kind == "sentencepiece_model":
                SentencePieceTokenizer(path)
            else:
                WordPieceTokenizer(path, lowercase=tok.get("lowercase", True))
        except DataError as e:
            raise ConfigError(f"config.data.tokenizer.path: {e}") from None
        except Exception as e:  # noqa: BLE001  (the tokenizer libraries raise several types)
            raise ConfigError(f"config.data.tokenizer.path: {tok.path} is not a readable {tok.kind} "
                              f"tokenizer ({_first_line(e)}); point it at a valid file (got {tok.path!r})") from None
    if cfg.data.corpus == "tfds":
        import tensorflow_datasets as tfds

        d = cfg.data
        for split in (d.tfds_train_split, d.tfds_validation_split):
            where = f"tfds dataset {d.tfds_name!r} split {split!r} in {d.tfds_data_dir or 'the tfds data dir'}"
            try:
                source = tfds.data_source(d.tfds_name, split=split, data_dir=d.tfds_data_dir or None,
                                          download=False, try_gcs=False)
                n = len(source)
                if n:
                    source[0], source[n - 1]
            except Exception as e:  # noqa: BLE001  (tfds / array_record raise several types)
                raise DataError(f"{where} cannot be read ({_first_line(e)}); rebuild it with `tfds build "
                                f"{d.tfds_name.split('/')[0]} --file_format=array_record` or fix "
                                f"config.data.tfds_data_dir") from None


def _teacher_vocab(source: str) -> tuple[str, int, int | None, bool | None]:
    """``(config file, vocab size, max positions, causal)`` of a pretrained teacher directory,
    read from its config.json alone (weights are read by the teacher stage)."""
    kind, _, path = source.partition(":")
    d = Path(path)
    cfg_file = d / "config.json"
    weights = d / "model.safetensors"
    if not cfg_file.is_file():
        raise ConfigError(f"config.teacher.source: {cfg_file} is missing; a teacher directory needs "
                          f"config.json and model.safetensors (got {source!r})")
    if not (weights.is_file() or (d / "model.safetensors.index.json").is_file()):
        raise ConfigError(f"config.teacher.source: {weights} is missing; a teacher directory needs "
                          f"config.json and model.safetensors (got {source!r})")
    try:
        info = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.teacher.source: cannot parse {cfg_file} ({e})") from None
    if kind == "checkpoint":
        dc = info.get("dense_config", {})
        return str(cfg_file), int(dc.get("vocab_size", -1)), dc.get("max_len"), dc.get("causal")
    max_len = info.get("max_position_embeddings", info.get("n_positions"))
    return str(cfg_file), int(info.get("vocab_size", -1)), max_len, kind == "hf_gpt2"


def check_teacher(cfg: Any, workdir: str | os.PathLike, stages: Sequence[str], vocab_size: int) -> None:
    """A pretrained teacher (``teacher.source``) or the work directory's trained teacher must
    have the tokenizer's vocabulary and room for ``data.seq_len`` tokens."""
    source = pretrained.resolve_source(str(cfg.teacher.source))
    where = None
    if "teacher" in stages and not source.startswith("train"):
        where, vocab, max_len, causal = _teacher_vocab(source)
        fix = (f"use the teacher's own tokenizer (e.g. --config.data.tokenizer.kind=wordpiece "
               f"--config.data.tokenizer.path={source.partition(':')[2]})")
        if causal is False and cfg.task == "clm":
            raise ConfigError(f"config.teacher.source: {where} is a bidirectional (MLM) model; a "
                              f"clm run needs a causal teacher (got {source!r})")
        if max_len is not None and int(max_len) < int(cfg.data.seq_len):
            raise ConfigError(f"config.data.seq_len: the teacher ({where}) has {max_len} positions; "
                              f"use data.seq_len <= {max_len} (got {cfg.data.seq_len})")
    elif any(s in stages for s in ("supernet", "retrain")) and "teacher" not in stages:
        cfg_file = Path(workdir) / "teacher" / "model" / "config.json"
        if not cfg_file.is_file():
            return  # workdir.check_inputs reports the missing teacher
        where = str(cfg_file)
        vocab = int(json.loads(cfg_file.read_text())["dense_config"]["vocab_size"])
        fix = "the teacher was trained with another tokenizer: use a new --workdir"
    if where is not None and vocab != vocab_size:
        raise ConfigError(f"config.data.tokenizer: the teacher's vocabulary ({where}) has {vocab} "
                          f"entries but the tokenizer has {vocab_size}; {fix}")


def check_budgets(cfg: Any, vocab_size: int) -> None:
    """Every search budget is reachable by some architecture at SOME widths the supernet can
    grow to: widths only grow, so the smallest model is the smallest architecture at the
    initial widths and the largest the largest architecture at the maximum widths. The budgets
    are read by :func:`~elm_jax.search.constraints.parse_budgets` and tested by
    :func:`~elm_jax.search.constraints.check_reachable` (the search's own test)."""
    from elm_jax.accounting import reachable_ranges
    from elm_jax.search.constraints import SearchError, check_reachable, parse_budgets

    space = SearchSpace.from_config(cfg.space, vocab_size=vocab_size, max_len=cfg.data.seq_len,
                                    task=cfg.task)
    seq = int(cfg.data.seq_len)
    lo = reachable_ranges(space, space.initial_widths(), seq)
    hi = reachable_ranges(space, space.max_widths(), seq)
    try:
        for i, (name, bounds) in enumerate(parse_budgets(cfg.search.budgets)):
            check_reachable(name, bounds, lo, hi, field=f"search.budgets[{i}]")
    except SearchError as e:
        raise ConfigError(f"config.{e}") from None


def check_finetune_data(cfg: Any) -> None:
    """Reads the fine-tuning task's data now (polarity archive, or GLUE from tfds), so a missing,
    corrupted or malformed file stops the run before training instead of at the end."""
    from elm_jax.data import glue
    from elm_jax.data.corpus import DataError, load_polarity
    from elm_jax.data.prepare import cache_dir_of

    fc = cfg.finetune
    task = glue.parse_task(fc.task)
    if task is None:
        load_polarity(cache_dir_of(cfg.data), seed=cfg.seed)
        return
    try:
        glue.load_glue(task, fc.tfds_data_dir or None, cfg.seed, fc.holdout_frac)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (tfds / array_record raise several types for damaged files)
        raise DataError(f"config.finetune.task: {fc.task} in {fc.tfds_data_dir or glue.default_data_dir()} "
                        f"cannot be read ({_first_line(e)}); rebuild it with `tfds build {fc.task} "
                        f"--file_format=array_record`") from None


def run_checks(cfg: Any, workdir: str | os.PathLike, stages: Sequence[str], vocab_size: int) -> None:
    """The checks that need the tokenizer (after the data stage, before any other stage)."""
    check_teacher(cfg, workdir, stages, vocab_size)
    if "search" in stages and not (Path(workdir) / "search" / "result.json").is_file():
        check_budgets(cfg, vocab_size)
    if "finetune" in stages and cfg.task == "mlm" and not (Path(workdir) / "finetune" / "result.json").is_file():
        check_finetune_data(cfg)


