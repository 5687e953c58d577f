"""Entry point: ``python -m elm_jax.main --config=configs/mlm.py[:variant] --workdir=DIR [--stages=...]``.

Thin by design: parse flags, check the config, the devices, the work directory and the data
before any compute, then dispatch to the stages (each skips itself when its output is complete
and resumes from its checkpoints when it was interrupted).

Exit codes:
  0   success.
  2   bad input: a flag, config field, data file or work directory (busy, or made with another
      config); one ``error: ...`` line on stderr names it and what to change.
  3   a non-finite loss or gradient stopped a training stage (the message names the step; the
      last good checkpoint is kept; ``train.nan_policy=skip`` skips such steps instead).
  75  preempted (SIGTERM): the current stage saved its progress; rerun the same command to
      resume (75 = ``EX_TEMPFAIL``, "try again later").

``cli(argv)`` runs the same in-process (tests, notebooks) and returns the exit code.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from elm_jax import config as config_lib
from elm_jax import preemption

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75

# Compiled programs faster to build than this are not written to the persistent cache.
CACHE_MIN_COMPILE_SECS = 0.1

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mlm.py", "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for all outputs.")
_STAGES = flags.DEFINE_string("stages", "all", "'all' or a comma list of: " + ",".join(config_lib.STAGES))
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "When the work directory was made with a config whose changed fields invalidate finished or "
    "partial stages, delete those stages' outputs (and everything downstream) and redo them, "
    "instead of refusing.")


class _Run:
    """One invocation: the config, the work directory, and the data shared by its stages."""

    def __init__(self, cfg, workdir: str):
        self.cfg, self.workdir, self._data = cfg, workdir, None

    @property
    def data(self):
        if self._data is None:
            import jax

            from elm_jax.data.prepare import prepare_data

            main_process = jax.process_index() == 0  # only process 0 writes and prints
            self._data = prepare_data(self.cfg, self.workdir if main_process else None,
                                      verbose=main_process)
        return self._data

    def stage(self, name: str) -> None:
        if name == "data":
            self.data  # noqa: B018  (prepares and prints the statistics)
        elif name == "teacher":
            from elm_jax.teacher import run_teacher_stage

            run_teacher_stage(self.cfg, self.workdir, self.data)
        elif name == "supernet":
            from elm_jax.supernet import run_supernet_stage

            run_supernet_stage(self.cfg, self.workdir, self.data)
        elif name == "search":
            from elm_jax.search import run_search_stage

            run_search_stage(self.cfg, self.workdir, self.data)
        elif name == "export":
            from elm_jax.export import run_export_stage

            run_export_stage(self.cfg, self.workdir, self.data)
        elif name == "retrain":
            from elm_jax.retrain import run_retrain_stage

            run_retrain_stage(self.cfg, self.workdir, self.data)
        elif name == "finetune":
            from elm_jax.finetune import run_finetune_stage

            if self.cfg.task == "mlm":
                run_finetune_stage(self.cfg, self.workdir, self.data)
            else:
                print("[finetune] skipped: sentence classification needs an MLM encoder (CLM: see evaluate)")
        elif name == "evaluate":
            from elm_jax.finetune import run_evaluate_stage

            run_evaluate_stage(self.cfg, self.workdir, self.data)
        else:
            raise config_lib.ConfigError(f"stage {name!r} is not available in this version of elm-jax")


def configure_compile_cache(cfg) -> str | None:
    """Turns on JAX's persistent compilation cache (``compile_cache_dir``: '' = the data cache
    directory's ``jax_compile``, 'none' = off); returns the directory used."""
    import jax

    spec = cfg.compile_cache_dir
    if spec == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if not spec:
        from elm_jax.data.prepare import cache_dir_of

        spec = os.fspath(cache_dir_of(cfg.data) / "jax_compile")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", spec)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    return spec


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from elm_jax.arch import ArchError
    from elm_jax.data.corpus import DataError
    from elm_jax.models.hf import TeacherLoadError
    from elm_jax.search import SearchError
    from elm_jax.workdir import WorkdirError

    return (config_lib.ConfigError, DataError, TeacherLoadError, SearchError, ArchError, WorkdirError,
            FileNotFoundError)


@contextlib.contextmanager
def _workdir_guard(cfg, workdir: str, stages: Sequence[str], allow_change: bool, command: str):
    """Process 0 holds the work-directory lock and checks inputs and config fingerprints; with
    several processes every one learns whether that succeeded (so none hangs in a collective)."""
    import jax

    from elm_jax import workdir as workdir_lib

    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(workdir_lib.locked(workdir, command))
                workdir_lib.check_inputs(workdir, stages)
                removed = workdir_lib.check_config(cfg, workdir, stages, allow_change=allow_change)
                if removed:
                    print(f"[elm-jax] config changed (--allow_config_change): removed the outputs of "
                          f"{', '.join(removed)} in {workdir}; they are redone")
            except workdir_lib.WorkdirError as e:
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            ok = multihost_utils.broadcast_one_to_all(np.asarray(error is None, np.int32))
            if not int(ok) and error is None:
                error = workdir_lib.WorkdirError(f"--workdir={workdir}: process 0 refused the work "
                                                 f"directory (see its error message)")
        if error is not None:
            raise error
        yield


def run(cfg, workdir: str | None, stages_spec: str = "all", *, allow_config_change: bool = False,
        command: str = "") -> int:
    """Runs the requested stages of the pipeline for ``cfg`` in ``workdir``; returns the exit
    code (module docstring) after printing any error as one line on stderr."""
    from elm_jax import train as train_lib

    with contextlib.ExitStack() as stack:
        try:
            if not workdir:
                raise config_lib.ConfigError("--workdir is required (the directory for all outputs)")
            stages = config_lib.parse_stages(stages_spec)
            config_lib.validate(cfg, stages)
            configure_compile_cache(cfg)
            from elm_jax import preflight
            from elm_jax.distributed import maybe_initialize

            maybe_initialize(cfg.distributed)
            stack.enter_context(preemption.watch())  # after initialize: see elm_jax.preemption
            preflight.check_devices(cfg, stages)
            preflight.check_data_inputs(cfg)
            with _workdir_guard(cfg, workdir, stages, allow_config_change, command):
                pipeline = _Run(cfg, workdir)
                if "data" in stages:
                    print("[elm-jax] stage data")
                data = pipeline.data  # every stage needs it (cached; builds in seconds when warm)
                preflight.run_checks(cfg, workdir, stages, data.tokenizer.vocab_size)
                for stage in stages:
                    if preemption.agreed():
                        raise preemption.Preempted(0, f"preempted (SIGTERM) before stage {stage!r}; "
                                                      f"rerun the same command to resume")
                    if stage != "data":
                        print(f"[elm-jax] stage {stage}")
                        pipeline.stage(stage)
        except _bad_input_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except train_lib.NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        except preemption.Preempted as e:
            print(f"preempted: {e}", file=sys.stderr)
            return EXIT_PREEMPTED
    return EXIT_OK


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {list(argv[1:])}; settings are flags such as "
              f"--config.data.seq_len=64", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.set_verbosity(logging.WARNING)  # orbax/tfds chatter; stages print their own progress
    cfg = _CONFIG.value
    try:
        cfg.get("task")  # config_flags defers a config file that failed to load until first use
    except OSError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        print(f"error: --config: cannot load {flags.FLAGS['config'].serialize().partition('=')[2]} "
              f"({lines[-1] if lines else e}); give an existing file such as configs/mlm.py[:variant]",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return run(cfg, _WORKDIR.value, _STAGES.value.strip(),
               allow_config_change=_ALLOW_CHANGE.value, command=shlex.join(sys.argv))


def _flag_error(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().strip('"').splitlines() if x.strip()]
    text = lines[0] if lines else type(e).__name__
    if "Error whilst parsing config file" in text and len(lines) > 1:
        # config_flags appends the traceback of the config file's own error: keep its last line
        text = f"{text.split(': Error whilst')[0]}: {lines[-1]}"
    if isinstance(e, (AttributeError, KeyError)):  # an override of a field the config lacks
        return (f"{text}: no such config field; check the spelling against the config file "
                f"(the config is locked: overrides cannot add fields)")
    return text


def parse_flags(argv: Sequence[str]) -> list[str]:
    """The absl flags parser of ``main``: a bad flag, config file or override (unknown field,
    wrong type) is one ``error: ...`` line and exit code 2, not a traceback."""
    for arg in argv[1:]:
        if arg.startswith(("--config=", "-config=")):
            path = arg.partition("=")[2].partition(":")[0]
            if not os.path.isfile(path):
                print(f"error: --config: cannot load {path} (no such file); give an existing file such "
                      f"as configs/mlm.py[:variant]", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
    try:
        return flags.FLAGS(list(argv))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError) as e:
        print(f"error: {_flag_error(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def cli(argv: Sequence[str]) -> int:
    """``python -m elm_jax.main ARGS`` in-process: ``argv`` as ``sys.argv`` (program name first);
    returns the exit code. Flags from an earlier call are reset first."""
    fv = flags.FLAGS
    fv.unparse_flags()
    for name in [n for n in fv if n.startswith("config.")]:  # overrides defined by an earlier parse
        delattr(fv, name)
    saved = sys.argv
    sys.argv = list(argv)  # config_flags reads the overrides from sys.argv
    try:
        try:
            rest = parse_flags(argv)
        except SystemExit as e:
            return int(e.code or 0)
        return main(rest)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
