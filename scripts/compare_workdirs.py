#!/usr/bin/env python
"""Checks that two elm-jax pipeline work directories hold bitwise the same outputs.

Why: a refactor that is meant to change no behaviour is proven by running the pipeline with
the old and the new code on the same config and comparing the two work directories. The
only things allowed to differ are measurements of time (timings, throughputs, timestamps)
and the work directory's own path; everything else, every float of every JSON file and
every bit of every tensor, has to match exactly.

Usage::

    python scripts/compare_workdirs.py DIR_A DIR_B [--max-per-file N]

Exit status: 0 when the trees are equal, 1 when they differ (each difference is printed:
file, field or tensor, both values or the max abs diff), 2 on bad usage (not two existing
directories). The last line is ``N files compared, M differences`` with the ignored fields
that were met.

What is compared, per file (paths relative to each root; both trees are walked):

* Not compared at all (:data:`IGNORED_FILE_PATTERNS`): the ``.lock`` file (pid, host name,
  start time and command of the run that held it), tensorboard event files (wall-clock
  timestamps in every record), ``*.png`` plots (rendered from the JSON and JSONL files,
  which are compared) and temporary files left by an atomic write that was killed.
* A file present in only one tree is a difference; a directory present in only one tree
  (for example a checkpoint step pruned in one run and not the other) is reported once,
  with the number of files in it. Checkpoint directories are compared like everything else.
* ``*.json``, and the extension-less JSON files orbax writes (``_CHECKPOINT_METADATA``,
  ``_METADATA``, ``_sharding``, ``metadata``, ``array_metadatas/process_N``): parsed and
  compared recursively and exactly: same keys, same list lengths, same types (an ``int``
  is not a ``float``), floats equal bit for bit (``repr`` equality: ``NaN == NaN``,
  ``0.0 != -0.0``). A key named in :data:`IGNORED_FIELDS` is skipped wherever it occurs,
  with everything under it. Strings (and keys) have the work directory's absolute path
  replaced by ``<WORKDIR>`` first, so ``"path": "/runs/a/export/small"`` equals
  ``"path": "/runs/b/export/small"``; in such a path the random suffix of a temporary
  directory (:data:`TEMP_NAME_PATTERNS`, ``.small.tmpdir-<random>``) becomes ``<RANDOM>``.
* ``*.jsonl``: one JSON value per non-blank line, compared line by line as above.
* ``*.safetensors``: loaded with ``safetensors.numpy.load_file``: the same tensor names,
  dtypes, shapes and bitwise-equal bytes (and the same header metadata); a differing tensor
  is reported with its max abs diff and the number of differing elements.
* orbax OCDBT stores (a directory holding ``manifest.ocdbt``: ``checkpoints/<step>/state``,
  ``export/<model>/orbax``): tensorstore writes the data files of an OCDBT database under
  random names (``d/<random hex>``), and how the key/value pairs are spread over those files
  and the manifests depends on the timing of the asynchronous writes. So the files
  ``manifest.ocdbt``, ``d/*`` and ``ocdbt.process_*/*`` are not compared as files: the
  database is opened read-only with tensorstore and compared as what it stores, the same
  keys with the same values (the zarr ``.zarray`` metadata as JSON, each array's chunks as
  bytes; an array whose chunks differ is decoded and reported with its max abs diff unless
  its values are bitwise equal after all). It counts as one file in the summary. The other
  files of the store (``_METADATA``, ``_sharding``, ``array_metadatas/*``,
  ``commit_success.txt``) are compared as files.
* Text (``*.md``, ``*.txt``, ``*.log``): compared line by line after the same path
  normalisation (orbax's ``commit_success.txt`` names the directory it committed to, for an
  exported model the random staging directory ``export/.small.tmpdir-<random>/orbax``).
  Rule for report.md: in a markdown table, the cells of a column whose header is in
  :data:`IGNORED_COLUMNS` are blanked (``meas. latency ms``, the same
  ``measured_latency_ms`` that the JSON files ignore); every other cell and every other
  line has to match. Lines matching :data:`IGNORED_LINE_PATTERNS` (progress bars with
  rates and ETAs, timestamped log prefixes, as in a sweep point's ``run.log``) are dropped
  first; report.md has none.
* Everything else (sentencepiece ``.model``, ``.npz``, array_record, ...): the same bytes.

Not ignored, on purpose: ``predicted_latency_ms`` / ``latency_ms`` (a search result: the
prediction of a latency table cached outside the work directory, so equal between two runs
that share the cache; with a rebuilt table the search itself may choose differently), compile
counts (``compilations``, ``train_step_compilations``) and everything else not listed.

The script needs only numpy, safetensors and (for orbax stores) tensorstore, not elm_jax, so
it can compare the work directories of any two versions of the package.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Keys (at any depth of a JSON/JSONL file) whose values are measurements of time, not results;
# each is skipped with everything under it. Found by reading every JSON file of real `test`
# pipeline runs and the code that writes them; nothing else differed between two runs of the
# same code.
IGNORED_FIELDS: tuple[str, ...] = (
    # export/result.json, export|retrain/<model>/arch.json: end-to-end wall-clock latency of the
    # exported model (latency.measure_model_ms, export.measure_latency=True).
    "measured_latency_ms",
    # <stage>/summary.json and the "train" record of result.json: seconds spent in the train loop.
    "train_time_s",
    # <stage>/summary.json and result.json: seconds for the whole training call.
    "wall_time_s",
    # <stage>/summary.json and result.json: throughput, tokens / train_time_s.
    "tokens_per_s",
    # orbax _CHECKPOINT_METADATA: wall-clock time (ns since the epoch) the save started.
    "init_timestamp_nsecs",
    # orbax _CHECKPOINT_METADATA: wall-clock time (ns since the epoch) the save was committed.
    "commit_timestamp_nsecs",
    # orbax _CHECKPOINT_METADATA: durations of the save's phases (empty {} so far; timings when set).
    "performance_metrics",
    # sweep point directories, sweep_run.json: seconds the point's command ran.
    "wall_s",
    # sweep point directories, sweep_run.json: local time the point's command finished.
    "finished",
    # A latency table latency-<key>.json lands in a work directory only when latency.cache_dir
    # points into it (it is cached in <cache dir>/latency by default). All its numbers are timings:
    "embedding_ms",   # latency table: timed embedding forward, ms
    "head_ms",        # latency table: timed LM-head forward, ms
    "blocks_ms",      # latency table: timed forward of every (family, ffn, heads) block, ms
    "dispatch_ms",    # latency table: timed no-op dispatch per part, ms
    "overhead_ms",    # latency table: median of measured whole models minus their timed parts, ms
    "measured_ms",    # latency table calibration rows: timed whole model, ms
    "parts_ms",       # latency table calibration rows: sum of the timed parts, ms
    "build_s",        # latency table: seconds it took to build
    "created",        # latency table: local time it was built
)

# Markdown table columns (header text) that hold a time measurement; their cells are blanked.
IGNORED_COLUMNS: tuple[str, ...] = (
    "meas. latency ms",  # report.md: the measured_latency_ms of export/result.json
)

# Lines of text files (after splitting on \n and \r) dropped before comparing.
IGNORED_LINE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\d(it/s|s/it)\b|tok/s="),         # tqdm progress bars (run.log): rates and ETAs
    re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+"),  # absl/glog lines, which start with a timestamp
)

# Files (name or path glob, relative to the root) not compared at all.
IGNORED_FILE_PATTERNS: tuple[str, ...] = (
    ".lock",                  # work-directory lock: pid, host, start time and command of its holder
    "events.out.tfevents*",   # tensorboard events: wall-clock timestamp in every record
    "*.png",                  # plots, rendered from the metrics/results that are compared
    ".*.tmp",                 # fileio.atomic_write_* temporary (killed mid-write)
    ".*.tmpdir-*",            # fileio.atomic_directory temporary directory
    "*.tmp",                  # supernet <final>.tmp staging directory, other temporaries
    "*.orbax-checkpoint-tmp*",  # orbax temporary step directory (save still running or killed)
)

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".md", ".txt", ".log")
# Extension-less JSON files orbax writes.
ORBAX_JSON_NAMES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
OCDBT_MANIFEST = "manifest.ocdbt"
WORKDIR_PLACEHOLDER = "<WORKDIR>"
# Random parts of temporary names inside paths, replaced by <RANDOM> (after <WORKDIR>): orbax
# writes the path it committed to in commit_success.txt, and for export/<model>/orbax that is
# the atomic_directory staging directory .<model>.tmpdir-<tempfile.mkdtemp random suffix>/.
TEMP_NAME_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?<=\.tmpdir-)[A-Za-z0-9_]+"),   # fileio.atomic_directory (tempfile.mkdtemp)
    re.compile(r"(?<=\.orbax-checkpoint-tmp-)\d+"),  # older orbax: <step>.orbax-checkpoint-tmp-<time>
)
MAX_VALUE_CHARS = 160


# ---------------------------------------------------------------------------------------------
# Walking


def _ignored_name(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in IGNORED_FILE_PATTERNS)


def _is_ocdbt_internal(rel: str, stores: set[str]) -> bool:
    """Whether ``rel`` is a file of an OCDBT store's database (compared as a database)."""
    for s in stores:
        if _under(rel, s):
            rest = rel[len(s) + 1:] if s else rel
            if rest == OCDBT_MANIFEST or rest.startswith(("d/", "ocdbt.process_")):
                return True
    return False


def walk(root: Path) -> tuple[list[str], set[str], int]:
    """(files, ocdbt stores, number of ignored files) of ``root``, paths relative to it
    (POSIX separators). Files inside an ocdbt store's database are left out of ``files``."""
    files: list[str] = []
    stores: set[str] = set()
    n_ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        kept = []
        for d in sorted(dirnames):
            if _ignored_name(d):
                n_ignored += sum(len(f) for _, _, f in os.walk(os.path.join(dirpath, d)))
            else:
                kept.append(d)
        dirnames[:] = kept
        if OCDBT_MANIFEST in filenames:
            stores.add(rel_dir)
        for f in sorted(filenames):
            if _ignored_name(f):
                n_ignored += 1
            else:
                files.append(f"{rel_dir}/{f}" if rel_dir else f)
    # Only the top-most store of nested ones (ocdbt.process_N/ has its own manifest).
    top = {s for s in stores if not any(s != t and _under(s, t) for t in stores)}
    files = [f for f in files if not _is_ocdbt_internal(f, top)]
    return sorted(files), top, n_ignored


def _under(path: str, parent: str) -> bool:
    return parent == "" or path == parent or path.startswith(parent + "/")


# ---------------------------------------------------------------------------------------------
# Values


class Comparison:
    """Collects the differences and what was ignored."""

    def __init__(self, root_a: Path, root_b: Path):
        self.roots = (root_a, root_b)
        self._path_res = tuple(_path_regex(r) for r in self.roots)
        self.diffs: list[tuple[str, str]] = []
        self.ignored_seen: Counter[str] = Counter()
        self.compared = 0
        self.ignored_files = (0, 0)  # files skipped by IGNORED_FILE_PATTERNS in A and in B

    def diff(self, rel: str, where: str, msg: str) -> None:
        self.diffs.append((rel, f"{rel}: {where}: {msg}" if where else f"{rel}: {msg}"))

    def lines(self, max_per_file: int) -> Iterator[str]:
        """The differences, at most ``max_per_file`` per file (0 = all) then a count of the rest."""
        per: dict[str, list[str]] = {}
        for rel, text in self.diffs:
            per.setdefault(rel, []).append(text)
        for rel, texts in per.items():
            shown = texts if max_per_file <= 0 else texts[:max_per_file]
            yield from shown
            if len(texts) > len(shown):
                yield f"{rel}: ... and {len(texts) - len(shown)} more differences in this file"

    def norm(self, s: str, side: int) -> str:
        """``s`` with this side's work-directory path -> <WORKDIR> and, in paths under it,
        random temporary-name parts -> <RANDOM>."""
        out = self._path_res[side].sub(WORKDIR_PLACEHOLDER, s)
        if WORKDIR_PLACEHOLDER in out:
            for pat in TEMP_NAME_PATTERNS:
                out = pat.sub("<RANDOM>", out)
        return out


def _path_regex(root: Path) -> re.Pattern[str]:
    """Matches the root's absolute path (as given and resolved) where it ends a path component."""
    forms = sorted({os.path.abspath(root), os.path.realpath(root)}, key=len, reverse=True)
    alt = "|".join(re.escape(f.rstrip("/")) for f in forms)
    return re.compile(rf"(?:{alt})(?![^/\s\"'`,;:)\]}}>])")


def _short(v: Any) -> str:
    s = repr(v) if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= MAX_VALUE_CHARS else s[: MAX_VALUE_CHARS - 3] + "..."


def _float_eq(a: float, b: float) -> bool:
    """Bitwise equality of two Python floats (NaN equals NaN, 0.0 differs from -0.0)."""
    return repr(a) == repr(b)


def compare_values(cmp: Comparison, rel: str, a: Any, b: Any, where: str = "") -> None:
    """Recursive exact comparison of two parsed JSON values; differences go to ``cmp``."""
    if isinstance(a, str) and isinstance(b, str):
        na, nb = cmp.norm(a, 0), cmp.norm(b, 1)
        if na != nb:
            cmp.diff(rel, where or "<value>", f"A={_short(na)} B={_short(nb)}")
        return
    if type(a) is not type(b):
        cmp.diff(rel, where or "<value>", f"A={_short(a)} ({type(a).__name__}) "
                                           f"B={_short(b)} ({type(b).__name__})")
        return
    if isinstance(a, dict):
        ka = {cmp.norm(k, 0): k for k in a}
        kb = {cmp.norm(k, 1): k for k in b}
        for k in sorted(set(ka) | set(kb)):
            sub = f"{where}.{k}" if where else k
            if k in IGNORED_FIELDS:
                cmp.ignored_seen[k] += 1
                continue
            if k not in kb:
                cmp.diff(rel, sub, f"only in A (A={_short(a[ka[k]])})")
            elif k not in ka:
                cmp.diff(rel, sub, f"only in B (B={_short(b[kb[k]])})")
            else:
                compare_values(cmp, rel, a[ka[k]], b[kb[k]], sub)
        return
    if isinstance(a, list):
        if len(a) != len(b):
            cmp.diff(rel, where or "<value>", f"list length A={len(a)} B={len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            compare_values(cmp, rel, x, y, f"{where}[{i}]")
        return
    if isinstance(a, float):
        if not _float_eq(a, b):
            d = abs(a - b) if math.isfinite(a) and math.isfinite(b) else float("nan")
            cmp.diff(rel, where or "<value>", f"A={a!r} B={b!r} (abs diff {d:.3g})")
        return
    if a != b:
        cmp.diff(rel, where or "<value>", f"A={_short(a)} B={_short(b)}")


# ---------------------------------------------------------------------------------------------
# Files


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load_jsonl(path: Path) -> list[tuple[int, Any]]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            out.append((i, json.loads(line)))
    return out


def _parsed(cmp: Comparison, rel: str, loader, pa: Path, pb: Path) -> tuple[Any, Any] | None:
    """Both files parsed by ``loader``; None (after reporting or falling back) when one fails."""
    errs = []
    vals = []
    for p in (pa, pb):
        try:
            vals.append(loader(p))
            errs.append(None)
        except (ValueError, UnicodeDecodeError) as e:
            vals.append(None)
            errs.append(e)
    if errs[0] is None and errs[1] is None:
        return vals[0], vals[1]
    if errs[0] is not None and errs[1] is not None:
        compare_bytes(cmp, rel, pa, pb)  # both unreadable the same way: still bitwise equal?
    else:
        side = "A" if errs[0] is not None else "B"
        cmp.diff(rel, "", f"cannot be parsed in {side} only ({errs[0] or errs[1]})")
    return None


def compare_json(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    got = _parsed(cmp, rel, _load_json, pa, pb)
    if got is not None:
        compare_values(cmp, rel, got[0], got[1])


def compare_jsonl(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    got = _parsed(cmp, rel, _load_jsonl, pa, pb)
    if got is None:
        return
    la, lb = got
    if len(la) != len(lb):
        cmp.diff(rel, "", f"number of records A={len(la)} B={len(lb)}")
    for (ia, va), (ib, vb) in zip(la, lb):
        compare_values(cmp, rel, va, vb, f"line {ia}" if ia == ib else f"line {ia}/{ib}")


def _array_diff(a, b) -> str:
    """'max abs diff X, K of N elements differ' for two same-shape arrays."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    try:
        fa, fb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return "values differ"
    with np.errstate(invalid="ignore"):
        same = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
        d = np.abs(fa - fb)
    n_diff = int((~same).sum()) if a.size else 0
    if n_diff == 0:  # equal as values, different bits (e.g. 0.0 vs -0.0 or NaN payloads)
        raw_a = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1) if a.size else None
        raw_b = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, -1) if b.size else None
        n_bits = int((raw_a != raw_b).any(axis=1).sum()) if raw_a is not None else 0
        return f"max abs diff 0 but {n_bits} of {a.size} elements differ in their bits"
    dmax = float(np.nanmax(np.where(same, 0.0, d))) if np.isfinite(d[~same]).any() else float("nan")
    first = np.unravel_index(int(np.argmax(~same.reshape(-1))), a.shape) if a.ndim else ()
    return (f"max abs diff {dmax:.6g}, {n_diff} of {a.size} elements differ (first at index "
            f"{tuple(int(i) for i in first)}: A={a[first]} B={b[first]})")


def _compare_arrays(cmp: Comparison, rel: str, name: str, a, b) -> None:
    if a.dtype != b.dtype:
        cmp.diff(rel, name, f"dtype A={a.dtype} B={b.dtype}")
    elif a.shape != b.shape:
        cmp.diff(rel, name, f"shape A={a.shape} B={b.shape}")
    elif a.tobytes() != b.tobytes():
        cmp.diff(rel, name, _array_diff(a, b))


def compare_safetensors(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

    try:
        ta, tb = load_file(os.fspath(pa)), load_file(os.fspath(pb))
        with safe_open(os.fspath(pa), framework="numpy") as fa:
            ma = fa.metadata() or {}
        with safe_open(os.fspath(pb), framework="numpy") as fb:
            mb = fb.metadata() or {}
    except Exception as e:  # noqa: BLE001  (unreadable, or a dtype numpy lacks)
        print(f"note: {rel}: safetensors not loadable ({e}); comparing bytes", file=sys.stderr)
        compare_bytes(cmp, rel, pa, pb)
        return
    compare_values(cmp, rel, ma, mb, "__metadata__")
    for name in sorted(set(ta) | set(tb)):
        if name not in tb:
            cmp.diff(rel, name, f"tensor only in A {ta[name].dtype}{list(ta[name].shape)}")
        elif name not in ta:
            cmp.diff(rel, name, f"tensor only in B {tb[name].dtype}{list(tb[name].shape)}")
        else:
            _compare_arrays(cmp, rel, name, ta[name], tb[name])


def _split_lines(text: str) -> list[str]:
    return [ln for ln in re.split(r"\r\n|\r|\n", text)
            if not any(p.search(ln) for p in IGNORED_LINE_PATTERNS)]


def _cells(line: str) -> list[str] | None:
    s = line.strip()
    if not (s.startswith("|") and s.endswith("|") and len(s) >= 2):
        return None
    return [c.strip() for c in s[1:-1].split("|")]


def _blank_columns(lines: list[str]) -> list[str]:
    """Markdown table cells under an IGNORED_COLUMNS header replaced by ``<ignored>``."""
    out, cols = [], None
    for ln in lines:
        cells = _cells(ln)
        if cells is None:
            cols = None
        elif cols is None:  # a header row
            cols = {i for i, c in enumerate(cells) if c in IGNORED_COLUMNS}
        elif cols:
            ln = "| " + " | ".join("<ignored>" if i in cols and not set(c) <= set("-:") else c
                                   for i, c in enumerate(cells)) + " |"
        out.append(ln)
    return out


def compare_text(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    try:
        ta, tb = pa.read_text(encoding="utf-8"), pb.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        compare_bytes(cmp, rel, pa, pb)
        return
    la = _blank_columns(_split_lines(cmp.norm(ta, 0)))
    lb = _blank_columns(_split_lines(cmp.norm(tb, 1)))
    hit = {c for c in IGNORED_COLUMNS for ln in la if c in ln}
    for c in hit:
        cmp.ignored_seen[f"column {c!r}"] += 1
    if la == lb:
        return
    if len(la) != len(lb):
        cmp.diff(rel, "", f"number of lines A={len(la)} B={len(lb)}")
    for i, (x, y) in enumerate(zip(la, lb), 1):
        if x != y:
            cmp.diff(rel, f"line {i}", f"A={_short(x)} B={_short(y)}")


def compare_bytes(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    ba, bb = pa.read_bytes(), pb.read_bytes()
    if ba == bb:
        return
    first = next((i for i, (x, y) in enumerate(zip(ba, bb)) if x != y), min(len(ba), len(bb)))
    cmp.diff(rel, "", f"bytes differ (sizes A={len(ba)} B={len(bb)}, first difference at byte {first})")


def _looks_json(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"[")


def compare_file(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    name = pa.name
    suffix = pa.suffix.lower()
    if suffix in JSON_SUFFIXES:
        compare_json(cmp, rel, pa, pb)
    elif suffix in JSONL_SUFFIXES:
        compare_jsonl(cmp, rel, pa, pb)
    elif suffix == ".safetensors":
        compare_safetensors(cmp, rel, pa, pb)
    elif suffix in TEXT_SUFFIXES:
        compare_text(cmp, rel, pa, pb)
    elif not suffix and (name in ORBAX_JSON_NAMES or "/array_metadatas/" in f"/{rel}") \
            and _looks_json(pa) and _looks_json(pb):
        compare_json(cmp, rel, pa, pb)
    else:
        compare_bytes(cmp, rel, pa, pb)


# ---------------------------------------------------------------------------------------------
# OCDBT stores (orbax)


def _ocdbt_items(path: Path) -> dict[str, bytes]:
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    kv = ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": os.fspath(path)}}).result()
    return {k.decode("utf-8", "backslashreplace"): kv.read(k).result().value for k in kv.list().result()}


def _ocdbt_array(path: Path, name: str):
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    base = {"driver": "file", "path": os.fspath(path)}
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": name}}
    return ts.open(spec, open=True, read=True).result().read().result()


def compare_ocdbt(cmp: Comparison, rel: str, pa: Path, pb: Path) -> None:
    label = f"{rel or '.'}/ [ocdbt]"
    try:
        ia, ib = _ocdbt_items(pa), _ocdbt_items(pb)
    except ImportError:
        cmp.diff(label, "", "tensorstore is not installed: cannot compare this orbax store")
        return
    except Exception as e:  # noqa: BLE001  (a damaged store)
        cmp.diff(label, "", f"cannot be read: {e}")
        return
    arrays = sorted({k[: -len("/.zarray")] for k in (*ia, *ib) if k.endswith("/.zarray")})

    def owner(key: str) -> str | None:
        head = key.rsplit("/", 1)[0] if "/" in key else None
        return head if head in array_set else None

    array_set = set(arrays)
    chunk_differs: set[str] = set()
    for key in sorted(set(ia) | set(ib)):
        arr = owner(key)
        if key.endswith("/.zarray"):
            continue
        if arr is not None:  # a chunk: bytes first, values when they differ
            if ia.get(key) != ib.get(key):
                chunk_differs.add(arr)
            continue
        if key not in ib:
            cmp.diff(label, key, "key only in A")
        elif key not in ia:
            cmp.diff(label, key, "key only in B")
        elif ia[key] != ib[key]:
            cmp.diff(label, key, f"value bytes differ (sizes A={len(ia[key])} B={len(ib[key])})")
    for arr in arrays:
        za, zb = ia.get(arr + "/.zarray"), ib.get(arr + "/.zarray")
        if za is None or zb is None:
            cmp.diff(label, arr, f"array only in {'A' if zb is None else 'B'}")
            continue
        try:
            compare_values(cmp, label, json.loads(za), json.loads(zb), f"{arr}/.zarray")
        except ValueError:
            if za != zb:
                cmp.diff(label, f"{arr}/.zarray", "bytes differ")
        if arr in chunk_differs:
            try:
                a, b = _ocdbt_array(pa, arr), _ocdbt_array(pb, arr)
            except Exception as e:  # noqa: BLE001  (tensorstore raises several types)
                cmp.diff(label, arr, f"chunks differ and the array cannot be decoded ({e})")
                continue
            _compare_arrays(cmp, label, arr, a, b)


# ---------------------------------------------------------------------------------------------
# Driver


def _missing_groups(only: list[str], present_dirs: set[str]) -> Iterator[tuple[str, int]]:
    """Groups paths that exist in one tree only by their top-most directory that the other tree
    lacks: yields (path, number of files)."""
    groups: Counter[str] = Counter()
    for rel in only:
        parts = rel.split("/")
        key = rel
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in present_dirs:
                key = d + "/"
                break
        groups[key] += 1
    yield from sorted(groups.items())


def _dirs_of(files: Sequence[str], stores: set[str]) -> set[str]:
    out = set(stores)
    for f in files:
        parts = f.split("/")
        for i in range(1, len(parts)):
            out.add("/".join(parts[:i]))
    return out


def compare_trees(root_a: Path, root_b: Path) -> Comparison:
    cmp = Comparison(root_a, root_b)
    files_a, stores_a, ign_a = walk(root_a)
    files_b, stores_b, ign_b = walk(root_b)
    cmp.ignored_files = (ign_a, ign_b)
    sa, sb = set(files_a), set(files_b)
    dirs_a, dirs_b = _dirs_of(files_a, stores_a), _dirs_of(files_b, stores_b)
    for side, only, other_dirs in (("A", sorted(sa - sb), dirs_b), ("B", sorted(sb - sa), dirs_a)):
        for path, n in _missing_groups(only, other_dirs):
            what = f"directory with {n} file{'s' * (n != 1)}" if path.endswith("/") else "file"
            cmp.diff(path, "", f"{what} only in {side} ({root_a if side == 'A' else root_b})")
    for rel in sorted(sa & sb):
        cmp.compared += 1
        compare_file(cmp, rel, root_a / rel, root_b / rel)
    for s in sorted(stores_a - stores_b):
        cmp.diff(f"{s or '.'}/ [ocdbt]", "", f"orbax store only in A ({root_a})")
    for s in sorted(stores_b - stores_a):
        cmp.diff(f"{s or '.'}/ [ocdbt]", "", f"orbax store only in B ({root_b})")
    for s in sorted(stores_a & stores_b):
        cmp.compared += 1
        compare_ocdbt(cmp, s, root_a / s if s else root_a, root_b / s if s else root_b)
    return cmp


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare_workdirs.py",
        description="Exit 0 when two elm-jax work directories hold bitwise the same outputs "
                    "(timings and the work-directory path excepted), 1 with the list of "
                    "differences otherwise, 2 on bad usage.")
    parser.add_argument("dir_a", metavar="DIR_A")
    parser.add_argument("dir_b", metavar="DIR_B")
    parser.add_argument("--max-per-file", type=int, default=20, metavar="N",
                        help="print at most N differences per file (0 = all; all are counted)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    roots = [Path(args.dir_a), Path(args.dir_b)]
    for r in roots:
        if not r.is_dir():
            print(f"compare_workdirs.py: error: {r} is not a directory", file=sys.stderr)
            return 2
    if os.path.realpath(roots[0]) == os.path.realpath(roots[1]):
        print("compare_workdirs.py: error: DIR_A and DIR_B are the same directory", file=sys.stderr)
        return 2
    cmp = compare_trees(*roots)
    print(f"A = {roots[0]}\nB = {roots[1]}")
    for line in cmp.lines(args.max_per_file):
        print(f"DIFF {line}")
    seen = ", ".join(f"{k} (x{n})" for k, n in sorted(cmp.ignored_seen.items())) or "none"
    ign_a, ign_b = cmp.ignored_files
    print(f"ignored fields met: {seen}; ignored files: {ign_a} in A, {ign_b} in B "
          f"({', '.join(IGNORED_FILE_PATTERNS)})")
    print(f"{cmp.compared} files compared, {len(cmp.diffs)} differences")
    return 1 if cmp.diffs else 0


if __name__ == "__main__":
    sys.exit(main())
