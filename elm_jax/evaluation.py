"""The schema of ``evaluate/result.json`` (written by :mod:`elm_jax.stages.evaluate`, whose
docstring lists its fields) and its readers, which also read the files written before it (schema
1: a flat model name -> metrics map)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elm_jax.data.context_free import KEY

SCHEMA_VERSION = 2


def model_results(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Model name -> its entry, from an ``evaluate/result.json`` of any schema (``{}`` for none)."""
    if "schema_version" in result:
        return dict(result.get("models", {}))
    return {k: v for k, v in result.items() if isinstance(v, Mapping)}


def baseline_loss(result: Mapping[str, Any]) -> float | None:
    """The trivial answer's loss of an ``evaluate/result.json`` (``None`` before schema 2)."""
    b = result.get("baselines", {}) if "schema_version" in result else {}
    return next((b[k] for k in KEY.values() if b.get(k) is not None), None)
