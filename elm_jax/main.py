"""Entry point: ``python -m elm_jax.main --config=configs/mlm.py[:variant] --workdir=DIR [--stages=...]``.

Thin by design: parse flags, validate the config before any compute, dispatch to the stages.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from elm_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mlm.py", "Config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory for all outputs.")
_STAGES = flags.DEFINE_string("stages", "all", "'all' or a comma list of: " + ",".join(config_lib.STAGES))


def run_stage(stage: str, cfg, workdir: str) -> None:
    if stage == "data":
        from elm_jax.data.prepare import prepare_data

        prepare_data(cfg, workdir, verbose=True)
        return
    raise config_lib.ConfigError(
        f"stage {stage!r} is not available yet in this version of elm-jax "
        f"(available: {', '.join(config_lib.IMPLEMENTED_STAGES)})"
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from elm_jax.data.corpus import DataError

    try:
        if not _WORKDIR.value:
            raise config_lib.ConfigError("--workdir is required (the directory for all outputs)")
        requested = _STAGES.value.strip()
        stages = config_lib.parse_stages(requested)
        cfg = _CONFIG.value
        config_lib.validate(cfg, stages)
        run_all = requested == "all"
        for stage in stages:
            if run_all and stage not in config_lib.IMPLEMENTED_STAGES:
                print(f"[elm-jax] stopping before stage {stage!r}: not available yet in this version "
                      f"(done: {', '.join(s for s in stages if s in config_lib.IMPLEMENTED_STAGES)})")
                break
            print(f"[elm-jax] stage {stage}")
            run_stage(stage, cfg, _WORKDIR.value)
    except (config_lib.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
