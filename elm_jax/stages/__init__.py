"""The pipeline stages, each a module exposing ``run(cfg, workdir, data)``; only
:mod:`elm_jax.pipeline` (and the CLI through it) imports them (DESIGN 6)."""
