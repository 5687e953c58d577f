"""Sweep: search budgets x distillation loss, masked LM (``configs/mlm.py`` and its variants).

Run every point in its own work directory under ROOT, then collect the results into one table::

    python -m elm_jax.sweep run --config=configs/sweep_budgets_kd.py[:demo|test|paper] --root=ROOT \\
        [--stages=all] [--jobs=1] [--dry_run]
    python -m elm_jax.sweep collect --root=ROOT       # -> ROOT/sweep.md, ROOT/sweep.csv

``get_config(arg)`` is the base config (the variant's ``configs/mlm.py`` config, unchanged);
``get_sweep(arg)`` lists the points, each a ``{dotted field: value}`` dict of overrides applied
to it (big_vision style: the sweep lives in the config file). Values may be any Python literal,
lists of budget dicts included (they do not fit a ``--config.x=y`` flag, so each run gets a
generated ``ROOT/<run>/config.py``; see :mod:`elm_jax.sweep`).

The distillation loss is swept in both places it is used, supernet pre-training and retraining
(``pearson``: ELM's relational loss; ``mse``: the plain feature-matching baseline). A budget list
of one entry per point keeps each run to one searched model (a single run can also search several
budgets at once: ``search.budgets`` is a list).
"""

import os
import runpy

_mlm = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlm.py"))

# Per variant: the budgets swept, each a one-budget list for search.budgets.
BUDGETS = {
    "demo": [{"name": "small", "max_params": 450_000}, {"name": "medium", "max_params": 600_000}],
    "test": [{"name": "small", "max_params": 16_000}, {"name": "tiny", "max_params": 14_000}],
    "paper": [{"name": "small", "max_params": 15_700_000}, {"name": "tiny", "max_params": 10_000_000}],
}
KD_LOSSES = ("pearson", "mse")


def get_config(arg=None):
    return _mlm["get_config"](arg)


def get_sweep(arg=None):
    variant = arg or "demo"
    if variant not in BUDGETS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(BUDGETS)}")
    return [{"search.budgets": [budget], "supernet.kd_loss": kd, "retrain.kd_loss": kd}
            for budget in BUDGETS[variant] for kd in KD_LOSSES]
