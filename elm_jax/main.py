"""Entry point: ``python -m elm_jax.main --config=configs/mlm.py[:variant] --workdir=DIR [--stages=...]``.

Thin by design: parse flags, validate the config before any compute, dispatch to the stages.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from elm_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mlm.py", "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for all outputs.")
_STAGES = flags.DEFINE_string("stages", "all", "'all' or a comma list of: " + ",".join(config_lib.STAGES))


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
                print("[finetune] skipped: sentence polarity needs an MLM encoder (CLM: see evaluate)")
        elif name == "evaluate":
            from elm_jax.finetune import run_evaluate_stage

            run_evaluate_stage(self.cfg, self.workdir, self.data)
        else:
            raise config_lib.ConfigError(
                f"stage {name!r} is not available yet in this version of elm-jax "
                f"(available: {', '.join(config_lib.IMPLEMENTED_STAGES)})")


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from elm_jax.data.corpus import DataError
    from elm_jax.arch import ArchError
    from elm_jax.models.hf import TeacherLoadError
    from elm_jax.search import SearchError

    logging.set_verbosity(logging.WARNING)  # orbax/tfds chatter; stages print their own progress
    try:
        if not _WORKDIR.value:
            raise config_lib.ConfigError("--workdir is required (the directory for all outputs)")
        requested = _STAGES.value.strip()
        stages = config_lib.parse_stages(requested)
        cfg = _CONFIG.value
        config_lib.validate(cfg, stages)
        from elm_jax.distributed import maybe_initialize

        maybe_initialize(cfg.distributed)
        run = _Run(cfg, _WORKDIR.value)
        run_all = requested == "all"
        for stage in stages:
            if run_all and stage not in config_lib.IMPLEMENTED_STAGES:
                print(f"[elm-jax] stopping before stage {stage!r}: not available yet in this version "
                      f"(done: {', '.join(s for s in stages if s in config_lib.IMPLEMENTED_STAGES)})")
                break
            print(f"[elm-jax] stage {stage}")
            run.stage(stage)
    except (config_lib.ConfigError, DataError, TeacherLoadError, SearchError, ArchError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
