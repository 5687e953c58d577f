"""The schema of ``evaluate/result.json`` (written by :mod:`elm_jax.stages.evaluate`, whose
docstring lists its fields) and its readers, which also read the files written before it (schema
1: a flat model name -> metrics map); and the readers of a fine-tuned model's entry of
``finetune/result.json`` (:mod:`elm_jax.stages.finetune`) that the evaluate stage, the report and
the finetune stage's own log share."""

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


def finetune_accuracy(entry: Mapping[str, Any]) -> float | None:
    """The test accuracy a fine-tuned model is reported with (an entry of
    ``finetune/result.json``): the mean over its seeds when several were run, else its one run's."""
    seeds = entry.get("seeds")
    if isinstance(seeds, Mapping) and seeds.get("mean_test_accuracy") is not None:
        return float(seeds["mean_test_accuracy"])
    return entry.get("test_accuracy")


#: What each of a fine-tuned entry's ``comparisons`` is (a minus b).
COMPARISONS = {"minus_bag_of_words": "minus bag-of-words",
               "pretrained_minus_scratch": "pre-trained minus from scratch"}


def comparison_lines(entry: Mapping[str, Any]) -> list[str]:
    """One line per seed summary (``seeds``, ``scratch``) and paired bootstrap comparison
    (``comparisons``) of a fine-tuned model's entry (:mod:`elm_jax.stages.finetune`)."""
    lines = []
    for key, what in (("seeds", "pre-trained"), ("scratch", "from scratch")):
        r = entry.get(key)
        if r:
            sd = "" if r["sd_test_accuracy"] is None else f" (sd {r['sd_test_accuracy']:.4f})"
            accs = ", ".join(f"{a:.4f}" for a in r["test_accuracy"])
            lines.append(f"{what}, seeds {r['seeds']}: test accuracy {accs}; mean "
                         f"{r['mean_test_accuracy']:.4f}{sd}")
    for key, c in (entry.get("comparisons") or {}).items():
        lines.append(f"{COMPARISONS.get(key, key)}: {c['diff']:+.4f} accuracy, {round(c['level'] * 100)}% "
                     f"paired bootstrap [{c['lo']:+.4f}, {c['hi']:+.4f}] over {c['examples']} test "
                     f"examples x {c['runs_a']} / {c['runs_b']} runs: {c['verdict']}")
    return lines


def versus_line(name: str, baseline: str, v: Mapping[str, Any]) -> str:
    """One found-vs-baseline comparison of ``evaluate/result.json`` (``versus``) in words."""
    what = {"lower": "the found model is better", "higher": "the baseline is better"}.get(
        v["verdict"], "a difference inside the noise")
    return (f"{name} vs {baseline}: {baseline}'s loss minus {name}'s {v['gain']:+.4f} nats, "
            f"{round(v['level'] * 100)}% paired interval [{v['lo']:+.4f}, {v['hi']:+.4f}]: {what}")
