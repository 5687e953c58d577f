"""Entry point: ``python -m elm_jax.main --config=configs/mlm.py[:variant] --workdir=DIR [--stages=...]``.

Thin by design: parse the flags and call :func:`elm_jax.pipeline.run`, which checks the config,
the devices, the work directory and the data before any compute and then runs the stages (each
skips itself when its output is complete and resumes from its checkpoints when it was
interrupted); after an ``evaluate`` stage, print the report (:mod:`elm_jax.report`).

Exit codes:
  0   success.
  2   bad input: a flag, config field, data file or work directory (busy, or made with another
      config); one ``error: ...`` line on stderr names it and what to change.
  3   a non-finite loss or gradient stopped a training stage (the message names the step; the
      last good checkpoint is kept; ``train.nan_policy=skip`` skips such steps instead).
  75  preempted (SIGTERM): the current stage saved its progress; rerun the same command to
      resume (75 = ``EX_TEMPFAIL``, "try again later").

``cli(argv)`` is the whole command, ``argv`` as ``sys.argv`` (program name first), returning the
exit code. Every call parses into a fresh ``absl.flags.FlagValues``, so it can run in-process
any number of times (tests); programs and notebooks call :func:`elm_jax.pipeline.run` directly.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from elm_jax import distributed, pipeline, preemption, report
from elm_jax.pipeline import EXIT_BAD_INPUT, EXIT_OK

_ALLOW_CHANGE_HELP = (
    "When the work directory was made with a config whose changed fields invalidate finished or "
    "partial stages, delete those stages' outputs (and everything downstream) and redo them, "
    "instead of refusing.")


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


def _bad(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cli(argv: Sequence[str]) -> int:
    """``python -m elm_jax.main ARGS``: ``argv`` as ``sys.argv`` (program name first); returns
    the exit code. A bad flag, config file or override (unknown field, wrong type) is one
    ``error: ...`` line and exit code 2, not a traceback."""
    argv = list(argv)
    for arg in argv[1:]:
        if arg.startswith(("--config=", "-config=")):
            path = arg.partition("=")[2].partition(":")[0]
            if not os.path.isfile(path):
                return _bad(f"--config: cannot load {path} (no such file); give an existing file such "
                            f"as configs/mlm.py[:variant]")
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", "configs/mlm.py", "Config file[:variant].",
                                             flag_values=fv, lock_config=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", None, "Work directory for all outputs.", flag_values=fv)
    stages = flags.DEFINE_string("stages", "all", "'all' or a comma list of: " +
                                 ",".join(pipeline.STAGE_NAMES), flag_values=fv)
    allow_change = flags.DEFINE_bool("allow_config_change", False, _ALLOW_CHANGE_HELP, flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.main_module_help() or fv.get_help())
        return EXIT_OK
    try:
        rest = fv(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError) as e:
        return _bad(_flag_error(e))
    if len(rest) > 1:
        return _bad(f"unexpected arguments {list(rest[1:])}; settings are flags such as "
                    f"--config.data.seq_len=64")
    logging.set_verbosity(logging.WARNING)  # orbax/tfds chatter; stages print their own progress
    cfg = config.value
    try:
        cfg.get("task")  # config_flags defers a config file that failed to load until first use
    except OSError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        return _bad(f"--config: cannot load {fv['config'].serialize().partition('=')[2]} "
                    f"({lines[-1] if lines else e}); give an existing file such as "
                    f"configs/mlm.py[:variant]")
    names = stages.value.strip()
    rc = pipeline.run(cfg, workdir.value, names, allow_config_change=allow_change.value,
                      command=shlex.join(argv))
    if rc == EXIT_OK and "evaluate" in pipeline.parse_stages(names) and distributed.is_main_process():
        with preemption.watch():  # a notice now comes after every stage finished: write the report, exit 0
            print(report.build_report(workdir.value))
    return rc


if __name__ == "__main__":
    sys.exit(cli(sys.argv))
