"""The ELM search space (DESIGN §1.1, §1.6): the menu of the elastic supernet and the moves
of the search.

:class:`SearchSpace` (frozen, hashable) holds ``L`` layers over residual width ``H``, block
families ('bert', 'mobilebert'), ``T`` candidates per (layer, family) with independent weights,
the allowed head counts and an optional skip bit per layer (elastic depth). It validates
architectures and widths states, samples, mutates and crosses over architectures, finds the
extreme architectures (least / most of an additive per-block cost), converts an architecture
to the :class:`~elm_jax.arch.ArchArrays` that enter compiled code, and round-trips through a
JSON-safe dict (``to_dict`` / ``from_dict``).

FFN widths are not part of an architecture: candidate ``j`` of a family at layer ``l`` has the
current width ``widths[l, FAMILY_INDEX[family], j]`` (``int32 [L, 2, T]``, grown by the dynamic
dimension module, DESIGN §1.2); functions that need a width take it as an argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from elm_jax.accounting import block_params
from elm_jax.arch import (
    FAMILY_INDEX,
    NUM_FAMILIES,
    SEARCH_FAMILIES,
    TASKS,
    Arch,
    ArchArrays,
    ArchError,
    LayerChoice,
    _as_bool,
    _as_int,
)
from elm_jax.fields import REQUIRED
from elm_jax.fields import get as get_field


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The ELM search space (DESIGN §1.1), frozen and hashable.

    Fields:
      layers (L), hidden (H, residual width), inner (I, MobileBERT bottleneck width),
      embed_size (E, factorised token embedding), candidates (T per layer and family),
      f0 (width increment; candidate j starts at ``f0 * (j + 1)``), max_ffn (width cap per
      family; a mapping or ``((family, cap), ...)``, stored as a tuple of pairs in
      FAMILY_INDEX order; a known family missing from it gets the cap ``f0 * T``, allowed
      only for families not on the menu), base_heads (head count of the supernet's
      attention; merged heads group base heads), head_choices (allowed head counts, each a
      divisor of base_heads; () = all divisors), families (the menu; order matters only
      for display), elastic_depth (layers may be skipped), min_layers (fewest active
      layers), vocab_size, max_len, task ('mlm' | 'clm'), type_vocab_size (segment
      embeddings; 0 = none).
    """

    layers: int
    hidden: int
    inner: int
    embed_size: int
    candidates: int
    f0: int
    max_ffn: Any
    base_heads: int
    families: tuple[str, ...]
    elastic_depth: bool
    min_layers: int
    vocab_size: int
    max_len: int
    task: str
    head_choices: tuple[int, ...] = ()
    type_vocab_size: int = 0

    # ------------------------------------------------------------------ construction

    def __post_init__(self):
        for name in ("layers", "hidden", "inner", "embed_size", "candidates", "f0",
                     "base_heads", "min_layers", "vocab_size", "max_len",
                     "type_vocab_size"):
            object.__setattr__(self, name, _as_int(f"space.{name}", getattr(self, name)))
        object.__setattr__(self, "elastic_depth",
                           _as_bool("space.elastic_depth", self.elastic_depth))
        for name in ("layers", "hidden", "inner", "embed_size", "base_heads",
                     "vocab_size", "max_len"):
            if getattr(self, name) <= 0:
                raise ArchError(f"space.{name} must be positive, got {getattr(self, name)}")
        if self.candidates < 1:
            raise ArchError(f"space.candidates (T) must be >= 1, got {self.candidates}")
        if self.f0 <= 0:
            raise ArchError(f"space.f0 (FFN width increment) must be > 0, got {self.f0}")
        if self.type_vocab_size < 0:
            raise ArchError(f"space.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.task not in TASKS:
            raise ArchError(f"space.task must be one of {TASKS}, got {self.task!r}")
        if self.hidden % self.base_heads:
            raise ArchError(
                f"space.hidden={self.hidden} is not divisible by space.base_heads="
                f"{self.base_heads}; BERT heads need an integral head size: choose "
                f"base_heads dividing hidden")
        if self.inner % self.base_heads:
            raise ArchError(
                f"space.inner={self.inner} is not divisible by space.base_heads="
                f"{self.base_heads}; MobileBERT heads need an integral head size: choose "
                f"base_heads dividing inner")

        # families
        fams = self.families
        if isinstance(fams, str):
            fams = (fams,)
        fams = tuple(fams)
        if not fams:
            raise ArchError(f"space.families is empty; choose a subset of {SEARCH_FAMILIES}")
        for f in fams:
            if f not in FAMILY_INDEX:
                raise ArchError(
                    f"space.families: unknown family {f!r}; choose from {SEARCH_FAMILIES}")
        if len(set(fams)) != len(fams):
            raise ArchError(f"space.families lists a family twice: {fams}")
        object.__setattr__(self, "families", fams)

        # head choices
        hc = self.head_choices
        hc = _divisors(self.base_heads) if not hc else tuple(
            _as_int("space.head_choices", h) for h in hc)
        for h in hc:
            if h <= 0 or self.base_heads % h:
                raise ArchError(
                    f"space.head_choices: {h} does not divide base_heads={self.base_heads}; "
                    f"allowed: {_divisors(self.base_heads)}")
        if len(set(hc)) != len(hc):
            raise ArchError(f"space.head_choices lists a head count twice: {hc}")
        object.__setattr__(self, "head_choices", tuple(sorted(hc)))

        # width caps
        mf = self.max_ffn
        items = mf.items() if hasattr(mf, "items") else mf
        try:
            caps = {str(k): v for k, v in items}
        except (TypeError, ValueError) as e:
            raise ArchError(
                f"space.max_ffn must be a mapping family -> cap, got {mf!r}") from e
        for k in caps:
            if k not in FAMILY_INDEX:
                raise ArchError(
                    f"space.max_ffn: unknown family {k!r}; keys must be in {SEARCH_FAMILIES}")
        for f in fams:
            if f not in caps:
                raise ArchError(f"space.max_ffn has no cap for family {f!r} on the menu; add "
                                f"max_ffn.{f} (>= f0={self.f0})")
        norm = []
        for f in SEARCH_FAMILIES:
            cap = _as_int(f"space.max_ffn.{f}", caps.get(f, self.f0 * self.candidates))
            if cap < self.f0:
                raise ArchError(f"space.max_ffn.{f}={cap} is below f0={self.f0}; the cap must "
                                f"be at least one width increment")
            norm.append((f, cap))
        object.__setattr__(self, "max_ffn", tuple(norm))

        if not 1 <= self.min_layers <= self.layers:
            raise ArchError(f"space.min_layers={self.min_layers} must be in [1, layers="
                            f"{self.layers}]")

    @classmethod
    def from_config(cls, space_cfg: Any, *, vocab_size: int, max_len: int, task: str,
                    type_vocab_size: int | None = None) -> "SearchSpace":
        """Builds the space from the ``cfg.space`` ConfigDict (configs/common.py).

        Optional keys of ``space_cfg``: ``head_choices`` (default: all divisors of
        base_heads) and ``type_vocab_size`` (default 0); the keyword argument
        ``type_vocab_size`` overrides the latter (the data decides whether segments
        exist)."""
        def get(key: str, default: Any = REQUIRED) -> Any:
            return get_field(space_cfg, key, default, error=ArchError, what="space config")

        mf = get("max_ffn")
        mf = mf.to_dict() if hasattr(mf, "to_dict") else dict(mf)
        tv = type_vocab_size if type_vocab_size is not None else get("type_vocab_size", 0)
        return cls(
            layers=get("layers"), hidden=get("hidden"), inner=get("inner"),
            embed_size=get("embed_size"), candidates=get("candidates"), f0=get("f0"),
            max_ffn=mf, base_heads=get("base_heads"), families=tuple(get("families")),
            elastic_depth=get("elastic_depth"), min_layers=get("min_layers"),
            vocab_size=vocab_size, max_len=max_len, task=task,
            head_choices=tuple(get("head_choices", ())), type_vocab_size=tv,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-safe values (what a supernet directory's ``widths.json`` holds)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSpace":
        """The inverse of :meth:`to_dict` (JSON lists back to the tuples the fields hold)."""
        def tup(v: Any) -> Any:
            return tuple(tup(x) for x in v) if isinstance(v, list) else v
        return cls(**{k: tup(v) for k, v in d.items()})

    # ------------------------------------------------------------------ widths

    def max_ffn_of(self, family: str) -> int:
        """The FFN width cap of ``family`` (known families only)."""
        for f, cap in self.max_ffn:
            if f == family:
                return cap
        raise ArchError(f"unknown family {family!r}; choose from {SEARCH_FAMILIES}")

    def initial_widths(self) -> np.ndarray:
        """``int32 [L, 2, T]``: candidate ``j`` of family ``f`` starts at
        ``min(f0 * (j + 1), max_ffn[f])`` (families off the menu get entries too, so the
        state's shape is the same for every menu)."""
        w = np.zeros((self.layers, NUM_FAMILIES, self.candidates), np.int32)
        for f, i in FAMILY_INDEX.items():
            w[:, i, :] = np.minimum(self.f0 * np.arange(1, self.candidates + 1),
                                    self.max_ffn_of(f))
        return w

    def max_widths(self) -> np.ndarray:
        """``int32 [L, 2, T]`` with every candidate at its family's cap (the largest
        widths state the dynamic dimension module can reach)."""
        w = np.zeros((self.layers, NUM_FAMILIES, self.candidates), np.int32)
        for f, i in FAMILY_INDEX.items():
            w[:, i, :] = self.max_ffn_of(f)
        return w

    def validate_widths(self, widths: Any) -> np.ndarray:
        """Checks a widths state and returns it as an int32 numpy array.

        Valid: shape ``[L, 2, T]``, integer, every width positive, at most its family's
        cap, and a multiple of ``f0`` or exactly the cap."""
        w = np.asarray(widths)
        want = (self.layers, NUM_FAMILIES, self.candidates)
        if w.shape != want:
            raise ArchError(f"widths has shape {w.shape}, expected [L, 2, T] = {want}")
        if not np.issubdtype(w.dtype, np.integer):
            raise ArchError(f"widths must be integers, got dtype {w.dtype}")
        caps = np.array([cap for _, cap in self.max_ffn], np.int64)[None, :, None]
        w64 = w.astype(np.int64)
        checks = (
            (w64 <= 0, "must be positive"),
            (w64 > caps, "exceeds the family's max_ffn cap"),
            ((w64 % self.f0 != 0) & (w64 != caps),
             f"is neither a multiple of f0={self.f0} nor the family's max_ffn cap"),
        )
        for bad, what in checks:
            if bad.any():
                l, i, j = (int(x) for x in np.argwhere(bad)[0])
                f = SEARCH_FAMILIES[i]
                raise ArchError(f"widths[layer {l}, {f}, candidate {j}] = {int(w[l, i, j])} "
                                f"{what} (max_ffn.{f}={self.max_ffn_of(f)})")
        return w.astype(np.int32)

    # ------------------------------------------------------------------ validation

    def validate(self, arch: Arch) -> Arch:
        """Raises :class:`ArchError` naming the layer and value if ``arch`` is not in this
        space; returns ``arch`` otherwise."""
        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        if arch.num_layers != self.layers:
            raise ArchError(f"arch has {arch.num_layers} layers, the space has {self.layers}")
        for l, lc in enumerate(arch.layers):
            if lc.family not in self.families:
                raise ArchError(f"layer {l}: family {lc.family!r} is not on the menu "
                                f"{self.families}")
            if not 0 <= lc.candidate < self.candidates:
                raise ArchError(f"layer {l}: candidate {lc.candidate} out of range "
                                f"[0, {self.candidates})")
            if lc.heads not in self.head_choices:
                raise ArchError(f"layer {l}: heads {lc.heads} not in head_choices "
                                f"{self.head_choices}")
            if not lc.active and not self.elastic_depth:
                raise ArchError(f"layer {l}: inactive, but the space has no elastic depth "
                                f"(elastic_depth=False); every layer must be active")
        if arch.num_active < self.min_layers:
            raise ArchError(f"arch has {arch.num_active} active layers, fewer than "
                            f"min_layers={self.min_layers}")
        return arch

    def canonical(self, arch: Arch) -> Arch:
        """``arch`` with the genes of inactive layers reset (first menu family, candidate
        0, fewest heads): architectures that extract to the same model share an id."""
        self.validate(arch)
        rest = LayerChoice(self.families[0], 0, self.head_choices[0], False)
        return Arch(tuple(lc if lc.active else rest for lc in arch.layers))

    # ------------------------------------------------------------------ sampling

    def _sample_active(self, rng: np.random.Generator) -> list[bool]:
        """Uniform over the active masks with at least ``min_layers`` active layers (the
        distribution of 'each bit with probability 1/2, redrawn until valid', drawn
        without rejection): pick the count ``k`` with weight ``C(L, k)``, then a uniform
        subset of size ``k``."""
        if not self.elastic_depth:
            return [True] * self.layers
        ks = np.arange(self.min_layers, self.layers + 1)
        weights = np.array([math.comb(self.layers, int(k)) for k in ks], np.float64)
        k = int(rng.choice(ks, p=weights / weights.sum()))
        on = rng.choice(self.layers, size=k, replace=False)
        active = [False] * self.layers
        for i in on:
            active[int(i)] = True
        return active

    def _repair(self, layers: list[LayerChoice], rng: np.random.Generator) -> Arch:
        """Makes an arch valid with the fewest changes: without elastic depth every layer
        is switched on; otherwise randomly chosen inactive layers are switched on until
        ``min_layers`` are active."""
        if not self.elastic_depth:
            layers = [dataclasses.replace(lc, active=True) for lc in layers]
        else:
            off = [i for i, lc in enumerate(layers) if not lc.active]
            need = self.min_layers - (len(layers) - len(off))
            if need > 0:
                for i in rng.choice(off, size=need, replace=False):
                    layers[int(i)] = dataclasses.replace(layers[int(i)], active=True)
        return self.validate(Arch(tuple(layers)))

    def sample(self, rng: np.random.Generator) -> Arch:
        """A uniformly random architecture: each layer independently draws its family
        (uniform over the menu), candidate (uniform over ``T``) and heads (uniform over
        head_choices); the active mask is uniform over the masks with at least
        ``min_layers`` active layers (all active without elastic depth)."""
        active = self._sample_active(rng)
        layers = []
        for l in range(self.layers):
            fam = self.families[int(rng.integers(len(self.families)))]
            cand = int(rng.integers(self.candidates))
            heads = self.head_choices[int(rng.integers(len(self.head_choices)))]
            layers.append(LayerChoice(fam, cand, heads, active[l]))
        return Arch(tuple(layers))

    @staticmethod
    def _resample_other(values: Sequence[Any], current: Any, rng: np.random.Generator) -> Any:
        """A uniformly drawn value of ``values`` other than ``current`` (``current`` if it
        is the only one)."""
        others = [v for v in values if v != current]
        return others[int(rng.integers(len(others)))] if others else current

    def mutate(self, arch: Arch, p: float, rng: np.random.Generator) -> Arch:
        """Each gene (family, candidate, heads and -- with elastic depth -- active, per
        layer) mutates independently with probability ``p``. A mutated gene takes a
        uniformly drawn *different* allowed value, so ``p`` is exactly the probability that
        a gene with more than one choice changes (``p=0``: the same arch; ``p=1``: every
        such gene changes, up to the active-bit repair). If fewer than ``min_layers``
        layers end up active, random inactive layers are switched back on."""
        self.validate(arch)
        if not 0.0 <= p <= 1.0:
            raise ArchError(f"mutation probability p={p} must be in [0, 1]")
        layers = []
        for lc in arch.layers:
            fam, cand, heads, act = lc.family, lc.candidate, lc.heads, lc.active
            if rng.random() < p:
                fam = self._resample_other(self.families, fam, rng)
            if rng.random() < p:
                cand = self._resample_other(range(self.candidates), cand, rng)
            if rng.random() < p:
                heads = self._resample_other(self.head_choices, heads, rng)
            if self.elastic_depth and rng.random() < p:
                act = not act
            layers.append(LayerChoice(fam, cand, heads, act))
        return self._repair(layers, rng)

    def crossover(self, a: Arch, b: Arch, rng: np.random.Generator) -> Arch:
        """Uniform crossover: each layer's whole :class:`LayerChoice` comes from ``a`` or
        ``b`` with probability 1/2; then the same active-bit repair as :meth:`mutate`."""
        self.validate(a)
        self.validate(b)
        pick = rng.random(self.layers) < 0.5
        layers = [x if k else y for x, y, k in zip(a.layers, b.layers, pick)]
        return self._repair(layers, rng)

    # ------------------------------------------------------------------ extremes

    def extreme(self, widths: Any, block_cost: Callable[[str, int], float], largest: bool) -> Arch:
        """The architecture of most (``largest``) or least total ``block_cost(family, ffn)`` under
        ``widths``: per layer the (family, candidate) of most (least) cost (ties: the later
        (earlier) candidate, then the earlier menu family); the maximum has every layer active
        and the most heads; the minimum the fewest heads and, with elastic depth, only the
        ``min_layers`` layers of least cost active (ties: the earlier layers). Costs are
        positive and additive over active blocks (parameters, FLOPs), so this is exact."""
        w = self.validate_widths(widths)
        best = []
        for l in range(self.layers):
            opts = [(block_cost(f, int(w[l, FAMILY_INDEX[f], j])), j, f, pos)
                    for pos, f in enumerate(self.families) for j in range(self.candidates)]
            if largest:
                c, j, f, _ = max(opts, key=lambda o: (o[0], o[1], -o[3]))
            else:
                c, j, f, _ = min(opts, key=lambda o: (o[0], o[1], o[3]))
            best.append((c, f, j))
        if largest or not self.elastic_depth:
            on = set(range(self.layers))
        else:
            on = set(sorted(range(self.layers), key=lambda l: (best[l][0], l))[: self.min_layers])
        heads = self.head_choices[-1] if largest else self.head_choices[0]
        return self.validate(Arch(tuple(LayerChoice(f, j, heads, l in on)
                                        for l, (_, f, j) in enumerate(best))))

    def largest(self, widths: Any | None = None) -> Arch:
        """The architecture with the most parameters (the sandwich rule's upper end), by
        :meth:`extreme`: every layer active, the most heads (which do not change the parameter
        count). ``widths=None`` means every candidate at its cap (:meth:`max_widths`)."""
        w = self.max_widths() if widths is None else widths
        return self.extreme(w, lambda f, ffn: block_params(self, f, ffn), largest=True)

    def smallest(self, widths: Any | None = None) -> Arch:
        """The architecture with the fewest parameters (the sandwich rule's lower end), by
        :meth:`extreme`: the fewest heads, and with elastic depth the ``min_layers`` smallest
        layers active (the first ones when all layers have equal widths). ``widths=None`` means
        every candidate at its cap."""
        w = self.max_widths() if widths is None else widths
        return self.extreme(w, lambda f, ffn: block_params(self, f, ffn), largest=False)

    # ------------------------------------------------------------------ conversion

    def to_arrays(self, arch: Arch, widths: Any) -> ArchArrays:
        """The pytree form of ``arch`` (numpy, ``[L]`` each), with ``width`` read from
        the widths state."""
        self.validate(arch)
        w = self.validate_widths(widths)
        fam = np.array([FAMILY_INDEX[lc.family] for lc in arch.layers], np.int32)
        cand = np.array([lc.candidate for lc in arch.layers], np.int32)
        return ArchArrays(
            family=fam,
            candidate=cand,
            width=w[np.arange(self.layers), fam, cand].astype(np.int32),
            heads=np.array([lc.heads for lc in arch.layers], np.int32),
            active=np.array([lc.active for lc in arch.layers], bool),
        )

    def from_arrays(self, arrays: ArchArrays) -> Arch:
        """Inverse of :meth:`to_arrays` for one architecture (``[L]`` fields; the width
        is state, not a gene, and is ignored)."""
        names = {i: f for f, i in FAMILY_INDEX.items()}
        fam = np.asarray(arrays.family)
        if fam.shape != (self.layers,):
            raise ArchError(f"ArchArrays.family has shape {fam.shape}, expected ({self.layers},)")
        cand, heads = np.asarray(arrays.candidate), np.asarray(arrays.heads)
        act = np.asarray(arrays.active)
        layers = []
        for l in range(self.layers):
            if int(fam[l]) not in names:
                raise ArchError(f"layer {l}: family index {int(fam[l])} unknown")
            layers.append(LayerChoice(names[int(fam[l])], int(cand[l]), int(heads[l]),
                                      bool(act[l])))
        return self.validate(Arch(tuple(layers)))
