"""The one way to read a config field that may be absent: ``get(node, "a.b", default)``.

Configs are ml-collections ``ConfigDict`` objects, but library functions also accept plain
mappings, dataclasses and ``SimpleNamespace`` objects (tests, benchmarks, notebooks). A field
absent from such a node takes the caller's ``default``; with no default it is an error of the
caller's type, naming the field. Defaults that matter for results live in ``configs/``, which
sets every field; a default here only serves partial configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REQUIRED: Any = object()
_MISSING: Any = object()


def _child(node: Any, part: str) -> Any:
    if node is None:
        return _MISSING
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        try:
            return node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return getattr(node, part, _MISSING)


def get(node: Any, name: str, default: Any = REQUIRED, *, none_is_default: bool = False,
        error: type[Exception] = KeyError, what: str = "config") -> Any:
    """``node.name`` (a dotted name descends), or ``default`` when a part is absent (or, with
    ``none_is_default``, set to ``None``); with no default, ``error("<what> lacks the required
    key 'name'")``."""
    for part in name.split("."):
        node = _child(node, part)
        if node is _MISSING or (node is None and none_is_default and default is not REQUIRED):
            if default is REQUIRED:
                raise error(f"{what} lacks the required key {name!r}")
            return default
    return node
