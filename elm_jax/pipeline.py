"""The pipeline: the one stage registry and the run loop over it.

:data:`STAGES` lists every stage in pipeline order with what the rest of the package needs to
know about it: the function that runs it (``run(cfg, workdir, data)`` of its module in
:mod:`elm_jax.stages`), the files that mark it complete (``outputs``, the last one written
last), the config fields its results depend on (``config_fields``: the work-directory
fingerprints of :mod:`elm_jax.workdir`) and the stages whose outputs it reads (``needs``).
``main`` (the CLI), :mod:`elm_jax.workdir` and :mod:`elm_jax.report` all read this table.

:func:`run` is what the CLI, tests and notebooks call: it validates the config, sets up the
compile cache, the distributed runtime and the preemption watch, checks devices, inputs and the
work directory before any compute, then runs the requested stages in order and maps failures to
exit codes (see :mod:`elm_jax.main`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from elm_jax import config as config_lib
from elm_jax import distributed, preemption, preflight
from elm_jax import workdir as workdir_lib
from elm_jax.arch import ArchError
from elm_jax.data.corpus import DataError
from elm_jax.data.prepare import DataBundle, cache_dir_of, prepare_data
from elm_jax.engine.trainer import NonFiniteError
from elm_jax.models.hf import TeacherLoadError
from elm_jax.search.constraints import SearchError
from elm_jax.stages import evaluate, export, finetune, retrain, search, supernet, teacher

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75

# Compiled programs faster to build than this are not written to the persistent cache.
CACHE_MIN_COMPILE_SECS = 0.1

# What a user can get wrong: printed as one ``error:`` line, exit code 2.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    config_lib.ConfigError, DataError, TeacherLoadError, SearchError, ArchError,
    workdir_lib.WorkdirError, FileNotFoundError)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module docstring)."""

    name: str
    run: Callable[[Any, str | os.PathLike, DataBundle], Any] | None
    outputs: tuple[str, ...]
    config_fields: tuple[str, ...] | None = None  # None: not fingerprinted (reads only upstream)
    needs: tuple[tuple[str, ...], ...] = ()  # per entry: any one of these stages' outputs

    def complete(self, workdir: str | os.PathLike) -> bool:
        """Whether every output file of the stage exists in ``workdir``."""
        return all(os.path.isfile(os.path.join(workdir, f)) for f in self.outputs)


def _finetune(cfg: Any, workdir: str | os.PathLike, data: DataBundle) -> Any:
    if cfg.task != "mlm":
        print("[finetune] skipped: sentence classification needs an MLM encoder (CLM: see evaluate)")
        return None
    return finetune.run(cfg, workdir, data)


STAGES: tuple[Stage, ...] = (
    Stage("data", None, ("data/stats.json",), ("task", "seed", "data")),
    Stage("teacher", teacher.run, ("teacher/model/config.json", "teacher/result.json"),
          ("teacher", "precision")),
    Stage("supernet", supernet.run, ("supernet/final/widths.json", "supernet/result.json"),
          ("supernet", "space", "precision"), needs=(("teacher",),)),
    Stage("search", search.run, ("search/result.json",),
          ("search", "latency.predict", "latency.batch", "latency.seq_len"), needs=(("supernet",),)),
    Stage("export", export.run, ("export/result.json",), ("export", "latency.batch", "latency.seq_len"),
          needs=(("search",), ("supernet",))),
    Stage("retrain", retrain.run, ("retrain/result.json",), ("retrain", "precision"),
          needs=(("export",), ("teacher",))),
    Stage("finetune", _finetune, ("finetune/result.json",), ("finetune", "precision"),
          needs=(("retrain", "export"),)),
    Stage("evaluate", evaluate.run, ("evaluate/result.json",), needs=(("retrain", "export"),)),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def parse_stages(stages: str | Sequence[str]) -> list[str]:
    """``'all'`` or a comma list of known stages, in pipeline order, without repeats."""
    items = [s.strip() for s in stages.split(",")] if isinstance(stages, str) else list(stages)
    items = [s for s in items if s]
    if not items:
        raise config_lib.ConfigError("--stages is empty; give 'all' or some of " + ",".join(STAGE_NAMES))
    if items == ["all"]:
        return list(STAGE_NAMES)
    unknown = [s for s in items if s not in STAGE_NAMES]
    if unknown:
        raise config_lib.ConfigError(f"--stages: unknown stage(s) {unknown}; known: all, "
                                     f"{', '.join(STAGE_NAMES)}")
    return [s for s in STAGE_NAMES if s in items]


def configure_compile_cache(cfg: Any) -> str | None:
    """Turns on JAX's persistent compilation cache (``compile_cache_dir``: '' = the data cache
    directory's ``jax_compile``, 'none' = off); returns the directory used."""
    import jax

    spec = cfg.compile_cache_dir
    if spec == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not spec:
        spec = os.fspath(cache_dir_of(cfg.data) / "jax_compile")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", spec)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    return spec


@contextlib.contextmanager
def _workdir_guard(cfg: Any, workdir: str, stages: Sequence[str], allow_change: bool, command: str):
    """Process 0 holds the work-directory lock and checks inputs and config fingerprints; with
    several processes every one learns whether that succeeded (so none hangs in a collective)."""
    with contextlib.ExitStack() as stack:
        error = None
        if distributed.is_main_process():
            try:
                stack.enter_context(workdir_lib.locked(workdir, command))
                workdir_lib.check_inputs(workdir, stages, STAGES)
                removed = workdir_lib.check_config(cfg, workdir, stages, STAGES, allow_change=allow_change)
                if removed:
                    print(f"[elm-jax] config changed (--allow_config_change): removed the outputs of "
                          f"{', '.join(removed)} in {workdir}; they are redone")
            except workdir_lib.WorkdirError as e:
                error = e
        if not distributed.agreed(error is None) and error is None:
            error = workdir_lib.WorkdirError(f"--workdir={workdir}: process 0 refused the work "
                                             f"directory (see its error message)")
        if error is not None:
            raise error
        yield


def run(cfg: Any, workdir: str | os.PathLike | None, stages: str | Sequence[str] = "all", *,
        allow_config_change: bool = False, command: str = "") -> int:
    """Runs the requested stages of the pipeline for ``cfg`` in ``workdir``; returns the exit
    code (:mod:`elm_jax.main`) after printing any error as one ``error:`` line on stderr."""
    with contextlib.ExitStack() as stack:
        try:
            if not workdir:
                raise config_lib.ConfigError("--workdir is required (the directory for all outputs)")
            workdir = os.fspath(workdir)
            names = parse_stages(stages)
            config_lib.validate(cfg, names)
            configure_compile_cache(cfg)
            distributed.maybe_initialize(cfg.distributed)
            stack.enter_context(preemption.watch())  # after initialize: see elm_jax.preemption
            preflight.check_devices(cfg, names)
            preflight.check_data_inputs(cfg)
            with _workdir_guard(cfg, workdir, names, allow_config_change, command):
                if "data" in names:
                    print("[elm-jax] stage data")
                main = distributed.is_main_process()  # only process 0 writes and prints
                # every stage needs the data (cached; builds in seconds when warm)
                data = prepare_data(cfg, workdir if main else None, verbose=main)
                preflight.run_checks(cfg, workdir, names, data.tokenizer.vocab_size)
                for name in names:
                    stage = BY_NAME[name]
                    if stage.run is None:  # the data stage: done above
                        continue
                    if preemption.agreed():
                        raise preemption.Preempted(0, f"preempted (SIGTERM) before stage {name!r}; "
                                                      f"rerun the same command to resume")
                    print(f"[elm-jax] stage {name}")
                    stage.run(cfg, workdir, data)
        except BAD_INPUT_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        except preemption.Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            return EXIT_PREEMPTED
    return EXIT_OK
