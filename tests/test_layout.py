"""House rules of the package layout, checked on the module graph of ``elm_jax/``.

The graph is built with :mod:`ast` from every import statement in the source (top level, inside
functions, methods, ``try``/``if`` blocks, ``if TYPE_CHECKING:``), so nothing is imported and JAX is
never loaded. Edge semantics (see :func:`import_graph`):

* ``import a.b.c`` is an edge to ``a.b.c``;
* ``from m import y`` is an edge to ``m.y`` when that is a module of the package (``y`` a submodule),
  and to ``m`` otherwise (``y`` an attribute of ``m``);
* relative imports (``from . import d``, ``from ..x import y``) are resolved against the importing
  module's package first;
* the ancestor packages that Python runs implicitly on the way (``a``, ``a.b`` for ``import a.b.c``) are
  *not* edges: a submodule reaching its parent ``__init__`` only makes a cycle when it names the parent
  explicitly (``import elm_jax``, ``from elm_jax import load_model``) and the ``__init__`` imports it
  back, lazily or not. A package ``__init__`` is otherwise a module like any other.

Imports of names outside the package are dropped; ``importlib.import_module`` strings are not seen.
"""

from __future__ import annotations

import ast
import textwrap
from collections import defaultdict, deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "elm_jax"

MAX_LINES = 550

# Modules the new layout must have; the names in EXPECTED_PACKAGES must be packages (a directory with
# an ``__init__.py``), the others may be either.
EXPECTED_MODULES = (
    "elm_jax.pipeline",
    "elm_jax.space",
    "elm_jax.accounting",
    "elm_jax.models.io",
    "elm_jax.models.extract",
    "elm_jax.models.classifier",
    "elm_jax.lm",
    "elm_jax.timing",
    "elm_jax.search",
    "elm_jax.search.scoring",
    "elm_jax.search.constraints",
    "elm_jax.search.evolution",
    "elm_jax.search.pareto",
    "elm_jax.engine",
    "elm_jax.engine.optim",
    "elm_jax.engine.trainer",
    "elm_jax.engine.loop",
    "elm_jax.stages.teacher",
    "elm_jax.stages.supernet",
    "elm_jax.stages.search",
    "elm_jax.stages.export",
    "elm_jax.stages.retrain",
    "elm_jax.stages.finetune",
    "elm_jax.data.arch_batches",
)
EXPECTED_PACKAGES = ("elm_jax.stages", "elm_jax.search", "elm_jax.engine")

# Rule 2: the only importers of elm_jax.stages[.*] (besides the modules inside elm_jax.stages).
STAGE_IMPORTERS = ("elm_jax.main", "elm_jax.pipeline")
# Rule 3: what elm_jax.models[.*] may import from elm_jax (each name and, if a package, its submodules).
MODELS_MAY_IMPORT = (
    "elm_jax.models",
    "elm_jax.arch",
    "elm_jax.space",
    "elm_jax.accounting",
    "elm_jax.fileio",
    "elm_jax.precision",
)
# Rule 4: the modules that must not import elm_jax.models[.*].
MODEL_FREE = ("elm_jax.arch", "elm_jax.space", "elm_jax.accounting")


# --------------------------------------------------------------------------------------------------
# The graph builder.


def within(name: str, prefix: str) -> bool:
    """``name`` is the module ``prefix`` or inside it (``prefix.*``)."""
    return name == prefix or name.startswith(prefix + ".")


def discover_modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> source file for every ``*.py`` under ``root/package``.

    A package's ``__init__.py`` is the package's own name. Where a module ``x.py`` and a package
    ``x/__init__.py`` both exist, the package wins (as in Python); see :func:`shadowed_modules`.
    """
    pkg_dir = root / package
    modules: dict[str, Path] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name in modules and modules[name].name == "__init__.py":
            continue
        modules[name] = path
    return modules


def shadowed_modules(root: Path, package: str) -> list[str]:
    """``x.py`` files that a package ``x/__init__.py`` next to them shadows (dead code)."""
    return sorted(
        str(p.relative_to(root))
        for p in (root / package).rglob("*.py")
        if "__pycache__" not in p.parts and (p.with_suffix("") / "__init__.py").is_file()
    )


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    base = module.split(".")
    if not is_package:  # a plain module's relative imports start at its package
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    if not base:
        raise ValueError(f"relative import beyond the top-level package in {module}")
    return ".".join(base + ([target] if target else []))


def import_graph(root: Path, package: str) -> tuple[dict[str, Path], dict[str, dict[str, list[str]]]]:
    """``(modules, edges)`` of the package ``root/package``.

    ``edges[src][dst]`` lists the ``path:line`` of each import statement of ``src`` that imports
    ``dst``. ``dst`` is the fully qualified name inside the package, and is kept even when no such
    module exists (an import that would fail), so name-based rules still see it; :func:`cycles`
    ignores those. Self-imports are dropped. See the module docstring for the edge semantics.
    """
    modules = discover_modules(root, package)
    edges: dict[str, dict[str, list[str]]] = {m: defaultdict(list) for m in modules}
    for src, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (
                    _resolve_relative(src, is_package, node.level, node.module)
                    if node.level
                    else node.module or ""
                )
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if alias.name != "*" and sub in modules else base)
            for dst in dict.fromkeys(targets):  # once per statement
                if within(dst, package) and dst != src:
                    edges[src][dst].append(f"{path.relative_to(root)}:{node.lineno}")

    def by_line(loc: str) -> tuple[str, int]:
        file, _, line = loc.rpartition(":")
        return file, int(line)

    return modules, {src: {d: sorted(w, key=by_line) for d, w in dsts.items()} for src, dsts in edges.items()}


def strongly_connected(nodes: list[str], succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph (each sorted)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def cycles(modules: dict[str, Path], edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The import cycles: each strongly connected component of more than one module, sorted."""
    succ = {src: sorted(d for d in dsts if d in modules) for src, dsts in edges.items()}
    return sorted(c for c in strongly_connected(list(modules), succ) if len(c) > 1)


def _shortest_cycle(start: str, members: set[str], edges: dict[str, dict[str, list[str]]]) -> list[str]:
    """A shortest cycle through ``start`` inside one component (BFS), as ``[start, ..., start]``."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, {})):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start] + path[::-1][1:] + [start]
            if w not in seen:
                seen.add(w)
                parent[w] = v
                queue.append(w)
    return [start]


def unresolved(
    modules: dict[str, Path], edges: dict[str, dict[str, list[str]]]
) -> list[tuple[str, str, list[str]]]:
    """The imports of package modules that do not exist, as ``(src, dst, locations)``."""
    return [
        (src, dst, where)
        for src, dsts in sorted(edges.items())
        for dst, where in sorted(dsts.items())
        if dst not in modules
    ]


def describe_cycles(comps: list[list[str]], edges: dict[str, dict[str, list[str]]]) -> str:
    lines = [f"{len(comps)} import cycle(s) among {PACKAGE} modules (strongly connected components):"]
    for k, comp in enumerate(comps, 1):
        members = set(comp)
        lines.append(f"  cycle {k}: {{{', '.join(comp)}}}")
        lines.append(f"    e.g. {' -> '.join(_shortest_cycle(comp[0], members, edges))}")
        for src in comp:
            for dst in sorted(d for d in edges[src] if d in members):
                lines.append(f"    {src} -> {dst}  ({', '.join(edges[src][dst])})")
    return "\n".join(lines)


def describe_edges(bad: list[tuple[str, str, list[str]]]) -> str:
    return "\n".join(f"  {src} -> {dst}  ({', '.join(where)})" for src, dst, where in bad)


def _graph():
    return import_graph(REPO, PACKAGE)


# --------------------------------------------------------------------------------------------------
# The graph builder on a synthetic package.


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text), encoding="utf-8")


def test_graph_builder_on_a_synthetic_package(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": """
                VERSION = "1"

                def lazy():
                    from pkg.e import f  # noqa: F401   (an edge: pkg -> pkg.e.f)
            """,
            "pkg/a.py": """
                import os
                from pkg import b
            """,
            "pkg/b.py": """
                import numpy as np

                def later():
                    from pkg import a
                    return a, np
            """,
            "pkg/c.py": """
                from . import d
                import pkg.e.f

                class K:
                    def m(self):
                        try:
                            from .e import helper, other  # attributes of pkg.e: one edge to pkg.e
                        except ImportError:
                            pass
            """,
            "pkg/d.py": """
                from pkg import VERSION  # the parent __init__, which never imports d back
            """,
            "pkg/e/__init__.py": """
                helper = None
            """,
            "pkg/e/f.py": """
                from .. import g
                from ..missing import thing
                from . import *
            """,
            "pkg/g.py": "from . import g\n",  # a self-import: no edge
        },
    )
    modules, edges = import_graph(tmp_path, "pkg")
    assert sorted(modules) == ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.e.f", "pkg.g"]
    assert {src: sorted(dsts) for src, dsts in edges.items()} == {
        "pkg": ["pkg.e.f"],
        "pkg.a": ["pkg.b"],
        "pkg.b": ["pkg.a"],
        "pkg.c": ["pkg.d", "pkg.e", "pkg.e.f"],
        "pkg.d": ["pkg"],
        "pkg.e": [],
        "pkg.e.f": ["pkg.e", "pkg.g", "pkg.missing"],
        "pkg.g": [],
    }
    assert edges["pkg.b"]["pkg.a"] == ["pkg/b.py:5"]
    assert edges["pkg.c"]["pkg.e.f"] == ["pkg/c.py:3"]
    assert edges["pkg.c"]["pkg.e"] == ["pkg/c.py:8"]
    assert unresolved(modules, edges) == [("pkg.e.f", "pkg.missing", ["pkg/e/f.py:3"])]
    # only a <-> b: d -> pkg is no cycle since pkg never reaches d; the missing module is no node
    assert cycles(modules, edges) == [["pkg.a", "pkg.b"]]
    msg = describe_cycles(cycles(modules, edges), edges)
    assert "pkg.a -> pkg.b -> pkg.a" in msg and "pkg.b -> pkg.a  (pkg/b.py:5)" in msg

    # once the __init__ imports d back (even lazily, inside a function), d <-> pkg is a cycle too
    _write(tmp_path, {"pkg/__init__.py": "def lazy():\n    from pkg import d\n"})
    modules, edges = import_graph(tmp_path, "pkg")
    assert cycles(modules, edges) == [["pkg", "pkg.d"], ["pkg.a", "pkg.b"]]


def test_graph_builder_prefers_a_package_over_a_same_named_module(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/s.py": "", "pkg/s/__init__.py": "", "pkg/s/t.py": ""})
    modules, _ = import_graph(tmp_path, "pkg")
    assert modules["pkg.s"] == tmp_path / "pkg/s/__init__.py"
    assert shadowed_modules(tmp_path, "pkg") == ["pkg/s.py"]


# --------------------------------------------------------------------------------------------------
# The house rules.


def test_rule1_no_import_cycles():
    modules, edges = _graph()
    comps = cycles(modules, edges)
    assert not comps, describe_cycles(comps, edges)


def test_imports_of_the_package_name_existing_modules():
    # Not one of the six rules, but it keeps rule 1 honest: an import left pointing at a module that
    # moved is no edge of the graph, so it can hide a cycle (and it fails at run time).
    modules, edges = _graph()
    bad = unresolved(modules, edges)
    assert not bad, (
        f"{len(bad)} import(s) of {PACKAGE} modules that do not exist (stale after a move?):\n"
        + describe_edges(bad)
    )


def _edges_where(src_pred, dst_pred) -> list[tuple[str, str, str]]:
    """``(importer, imported, where)`` of every package import with ``src_pred(importer)`` and
    ``dst_pred(imported)``."""
    _, edges = _graph()
    return [(src, dst, where) for src, dsts in sorted(edges.items()) if src_pred(src)
            for dst, where in sorted(dsts.items()) if dst_pred(dst)]


def test_rule2_only_main_pipeline_and_stages_import_stages():
    bad = _edges_where(lambda src: src not in STAGE_IMPORTERS and not within(src, "elm_jax.stages"),
                       lambda dst: within(dst, "elm_jax.stages"))
    assert not bad, (
        f"only {', '.join(STAGE_IMPORTERS)} and modules inside elm_jax.stages may import "
        f"elm_jax.stages[.*]; these do:\n{describe_edges(bad)}"
    )


def test_rule3_models_import_only_models_and_their_base_modules():
    bad = _edges_where(lambda src: within(src, "elm_jax.models"),
                       lambda dst: not any(within(dst, ok) for ok in MODELS_MAY_IMPORT))
    assert not bad, (
        f"elm_jax.models[.*] may import from elm_jax only {', '.join(MODELS_MAY_IMPORT)}; "
        f"these imports go elsewhere:\n{describe_edges(bad)}"
    )


def test_rule4_arch_space_accounting_do_not_import_models():
    bad = _edges_where(lambda src: any(within(src, m) for m in MODEL_FREE),
                       lambda dst: within(dst, "elm_jax.models"))
    assert not bad, (
        f"{', '.join(MODEL_FREE)} must import nothing from elm_jax.models; these do:\n{describe_edges(bad)}"
    )


def test_rule5_no_module_over_the_line_limit():
    modules = discover_modules(REPO, PACKAGE)
    long = sorted(
        (n, name, path)
        for name, path in modules.items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    )
    assert not long, f"{len(long)} module(s) of {PACKAGE} over {MAX_LINES} lines:\n" + "\n".join(
        f"  {path.relative_to(REPO)}: {n} lines" for n, _, path in reversed(long)
    )


def test_rule6_expected_modules_and_packages_exist():
    modules = discover_modules(REPO, PACKAGE)
    missing = [m for m in EXPECTED_MODULES if m not in modules and m not in EXPECTED_PACKAGES]
    not_packages = []
    for p in EXPECTED_PACKAGES:
        pkg_dir = REPO.joinpath(*p.split("."))
        if (pkg_dir / "__init__.py").is_file():
            continue
        if pkg_dir.is_dir():
            not_packages.append(f"{p} ({pkg_dir.relative_to(REPO)}/ has no __init__.py)")
        elif p in modules:
            not_packages.append(f"{p} ({modules[p].relative_to(REPO)} is a plain module)")
        else:
            not_packages.append(f"{p} (missing)")
    shadowed = shadowed_modules(REPO, PACKAGE)
    problems = []
    if not_packages:
        problems.append("not packages: " + ", ".join(not_packages))
    if missing:
        problems.append("missing modules: " + ", ".join(missing))
    if shadowed:
        problems.append("modules shadowed by a same-named package (delete them): " + ", ".join(shadowed))
    assert not problems, "the package layout is incomplete:\n" + "\n".join(f"  {p}" for p in problems)
