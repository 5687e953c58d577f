"""Architectures as values (DESIGN §3): what one sampled sub-network of the supernet is.

- :class:`Arch` (frozen): one architecture, per layer a :class:`LayerChoice` (family,
  candidate index, head count, active bit). It has a canonical JSON form and a stable id
  (the hash of that JSON), so results can be cached and resumed across runs and machines.
- :class:`ArchArrays` (a pytree of ``[L]`` int32/bool arrays): the only form of an
  architecture that enters compiled code. Its shapes depend on the space only, so one
  compiled step serves every architecture.

The menu these are drawn from is :mod:`elm_jax.space`; their exact sizes are
:mod:`elm_jax.accounting`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Families a search space may put on its menu. The index is fixed (it is the second axis
# of the widths state and the value in ArchArrays.family), whatever the menu holds.
FAMILY_INDEX: dict[str, int] = {"bert": 0, "mobilebert": 1}
SEARCH_FAMILIES: tuple[str, ...] = tuple(FAMILY_INDEX)
NUM_FAMILIES = len(FAMILY_INDEX)
TASKS = ("mlm", "clm")


class ArchError(ValueError):
    """An invalid architecture, widths state or search space. The message names the
    offending field or layer and says how to fix it."""


# ----------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------

def _as_int(name: str, value: Any) -> int:
    """``value`` as a Python int; rejects bools, floats and other non-integers so that a
    JSON typo cannot silently become a different architecture."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArchError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArchError(f"{name} must be a bool (true/false), got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """The genes of one layer: block ``family``, ``candidate`` index (which of the ``T``
    independently weighted blocks of that family), attention ``heads`` and whether the
    layer is ``active`` (an inactive layer is skipped: identity)."""

    family: str
    candidate: int
    heads: int
    active: bool = True

    def __post_init__(self):
        if not isinstance(self.family, str):
            raise ArchError(f"family must be a string, got {self.family!r}")
        # Normalise numpy scalars to Python types so the JSON form is canonical.
        object.__setattr__(self, "candidate", _as_int("candidate", self.candidate))
        object.__setattr__(self, "heads", _as_int("heads", self.heads))
        object.__setattr__(self, "active", _as_bool("active", self.active))

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "candidate": self.candidate, "heads": self.heads,
                "active": self.active}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerChoice":
        if not isinstance(d, Mapping):
            raise ArchError(f"a layer must be a mapping, got {d!r}")
        keys = {"family", "candidate", "heads", "active"}
        if set(d) != keys:
            raise ArchError(
                f"a layer needs exactly the keys {sorted(keys)}, got {sorted(d)}")
        return cls(family=d["family"], candidate=d["candidate"], heads=d["heads"],
                   active=d["active"])


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture of a search space: a :class:`LayerChoice` per layer.

    The canonical JSON (:meth:`to_json`: sorted keys, no spaces) identifies it; ``arch_id``
    is the first 16 hex digits of its sha256. Two architectures that differ only in the
    genes of inactive layers extract to the same model but have different ids; use
    :meth:`SearchSpace.canonical` to merge them.
    """

    layers: tuple[LayerChoice, ...]

    def __post_init__(self):
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
            raise ArchError(f"Arch.layers must be a sequence of LayerChoice, got {self.layers!r}")
        layers = tuple(
            lc if isinstance(lc, LayerChoice) else LayerChoice.from_dict(lc)
            for lc in self.layers
        )
        object.__setattr__(self, "layers", layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_active(self) -> int:
        return sum(lc.active for lc in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [lc.to_dict() for lc in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Arch":
        if not isinstance(d, Mapping) or set(d) != {"layers"}:
            raise ArchError(f"an Arch dict has exactly one key 'layers', got {d!r}")
        if not isinstance(d["layers"], (list, tuple)):
            raise ArchError(f"Arch 'layers' must be a list, got {d['layers']!r}")
        return cls(layers=tuple(LayerChoice.from_dict(x) for x in d["layers"]))

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace (the input of ``arch_id``)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "Arch":
        try:
            d = json.loads(s)
        except (TypeError, json.JSONDecodeError) as e:
            raise ArchError(f"not a valid Arch JSON string: {e}") from e
        return cls.from_dict(d)

    @property
    def arch_id(self) -> str:
        """First 16 hex characters of sha256(canonical JSON): stable across runs,
        processes and machines (no Python ``hash``)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:16]

    def describe(self) -> str:
        """Compact human-readable form for logs, e.g. ``b2h4 m0h2 - b1h4`` (family
        initial, candidate, heads; ``-`` for a skipped layer)."""
        return " ".join(
            f"{lc.family[0]}{lc.candidate}h{lc.heads}" if lc.active else "-"
            for lc in self.layers
        )


@struct.dataclass
class ArchArrays:
    """An architecture as a pytree of fixed-shape arrays (``[L]``, or ``[P, L]`` after
    :func:`stack_arrays`), the form that enters compiled code as a traced argument.

    family     int32  FAMILY_INDEX of the chosen family
    candidate  int32  candidate index in ``[0, T)``
    width      int32  current FFN width of that candidate (from the widths state)
    heads      int32  attention head count
    active     bool   False = the layer is skipped (identity)
    """

    family: Any
    candidate: Any
    width: Any
    heads: Any
    active: Any


def family_branch(families: Sequence[str], family: Any, active: Any) -> jax.Array:
    """The ``lax.switch`` branch of each layer when branches are built for ``families`` (in
    that order) followed by one identity/zero branch: the family's position among
    ``families``, or ``len(families)`` for an inactive layer or a family not built."""
    table = np.full(len(FAMILY_INDEX), len(families), np.int32)
    for pos, f in enumerate(families):
        table[FAMILY_INDEX[f]] = pos
    return jnp.where(jnp.asarray(active, bool), jnp.asarray(table)[family], len(families))


def stack_arrays(arrays: Sequence[ArchArrays]) -> ArchArrays:
    """Stacks architectures along a new leading population axis (``[P, L]`` fields).

    numpy inputs give numpy outputs (host-side, no device transfer); any jax input gives
    jax arrays."""
    arrays = list(arrays)
    if not arrays:
        raise ArchError("stack_arrays needs at least one ArchArrays")
    use_np = all(isinstance(x, np.ndarray) for a in arrays for x in jax.tree.leaves(a))
    stack = np.stack if use_np else jnp.stack
    return jax.tree.map(lambda *xs: stack(xs), *arrays)
