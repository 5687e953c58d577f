"""Tokenizers behind one interface: SentencePiece (trained here or loaded) and WordPiece (BERT).

Every tokenizer exposes the special ids the pipeline needs: ``pad``, ``unk``, ``bos``, ``eos``,
``mask``, ``cls``, ``sep``. SentencePiece models trained here are deterministic (single thread, no
input sampling) and cached under a hash of the training text and the settings, so the same corpus
and config always give the same model file, and a second run reuses it.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from elm_jax.data.corpus import DataError
from elm_jax import pretrained
from elm_jax.fileio import atomic_write_bytes

SPECIAL_PIECES = ("[MASK]", "[CLS]", "[SEP]")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    bos: int
    eos: int
    mask: int
    cls: int
    sep: int

    def all(self) -> tuple[int, ...]:
        return tuple(sorted(set(dataclasses.astuple(self))))


class Tokenizer(abc.ABC):
    """Interface: ``encode``, ``decode``, ``vocab_size``, ``special`` ids, ``describe``."""

    special: SpecialIds
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """JSON-able description (kind, path, vocab size) for stats and reports."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with pad=0, unk=1, bos=2, eos=3 and [MASK], [CLS], [SEP] pieces."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise DataError(f"SentencePiece model {path} does not exist")
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=os.fspath(path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{path} is not a SentencePiece model ({e}); delete it (a cached one is "
                            f"retrained) or point data.tokenizer.path at a valid .model file") from None
        self.vocab_size = int(self._sp.get_piece_size())
        ids = {p: self._sp.piece_to_id(p) for p in SPECIAL_PIECES}
        unk = self._sp.unk_id()
        missing = [p for p, i in ids.items() if i == unk]
        if missing or self._sp.pad_id() < 0 or self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise DataError(
                f"SentencePiece model {path} lacks special pieces {missing or ''} or pad/bos/eos ids; "
                f"train it with pad, bos, eos and user_defined_symbols={list(SPECIAL_PIECES)}"
            )
        self.special = SpecialIds(
            pad=self._sp.pad_id(), unk=unk, bos=self._sp.bos_id(), eos=self._sp.eos_id(),
            mask=ids["[MASK]"], cls=ids["[CLS]"], sep=ids["[SEP]"],
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"kind": "sentencepiece", "path": os.fspath(self.path), "vocab_size": self.vocab_size}


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece from a ``tokenizer.json`` or ``vocab.txt`` (a checkpoint dir or the file)."""

    def __init__(self, path: str | os.PathLike, lowercase: bool = True):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import normalizers, pre_tokenizers, processors  # noqa: F401
        from tokenizers.models import WordPiece

        p = Path(path)
        if p.is_dir():
            cands = [p / "tokenizer.json", p / "vocab.txt"]
            found = [c for c in cands if c.is_file()]
            if not found:
                raise DataError(f"{p} has neither tokenizer.json nor vocab.txt")
            p = found[0]
        if not p.is_file():
            raise DataError(f"WordPiece tokenizer file {p} does not exist")
        if p.suffix == ".json":
            tok = HFTokenizer.from_file(os.fspath(p))
        else:
            tok = HFTokenizer(WordPiece.from_file(os.fspath(p), unk_token="[UNK]"))
            tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.path = p
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        ids = {}
        for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
            i = tok.token_to_id(name)
            if i is None:
                raise DataError(f"WordPiece vocabulary {p} lacks the special token {name}")
            ids[name] = i
        self.special = SpecialIds(
            pad=ids["[PAD]"], unk=ids["[UNK]"], bos=ids["[CLS]"], eos=ids["[SEP]"],
            mask=ids["[MASK]"], cls=ids["[CLS]"], sep=ids["[SEP]"],
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"kind": "wordpiece", "path": os.fspath(self.path), "vocab_size": self.vocab_size}


def sentencepiece_cache_key(texts: Sequence[str], settings: dict) -> str:
    """sha256 over the settings (canonical JSON) and every training text, in order."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()[:20]


def train_sentencepiece(
    texts: Sequence[str],
    vocab_size: int,
    cache_dir: str | os.PathLike,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
) -> Path:
    """Trains (or reuses from the cache) a deterministic SentencePiece model on ``texts``.

    Determinism: one thread, no sentence sampling or shuffling, fixed special pieces. The model
    is written to a temporary name and renamed, so a killed run never leaves a half model.
    """
    import sentencepiece as spm

    if vocab_size < len(SPECIAL_PIECES) + 8:
        raise DataError(f"config.data.tokenizer.vocab_size={vocab_size} is too small (min {len(SPECIAL_PIECES) + 8})")
    settings = dict(vocab_size=int(vocab_size), model_type=model_type,
                    character_coverage=float(character_coverage), version=1)
    key = sentencepiece_cache_key(texts, settings)
    out_dir = Path(cache_dir) / "tokenizers"
    out = out_dir / f"spm-{key}.model"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [ln.strip() for t in texts for ln in t.splitlines() if ln.strip()]
    if not lines:
        raise DataError("the training text for the tokenizer is empty")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        inp = Path(tmp) / "input.txt"
        inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "spm"
        try:
            spm.SentencePieceTrainer.train(
                input=os.fspath(inp), model_prefix=os.fspath(prefix), vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                user_defined_symbols=list(SPECIAL_PIECES),
                num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=max_sentence_length, minloglevel=2,
                hard_vocab_limit=True,
            )
        except RuntimeError as e:
            raise DataError(
                f"SentencePiece training failed for vocab_size={vocab_size}: {e}. Adjust "
                "config.data.tokenizer.vocab_size to what the message allows for this corpus."
            ) from None
        # The model records its temporary input path; drop it so the file is a function of the
        # text and settings alone (byte-identical across runs and machines).
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((Path(tmp) / "spm.model").read_bytes())
        del proto.trainer_spec.input[:]
        proto.trainer_spec.model_prefix = ""
        atomic_write_bytes(out, proto.SerializeToString())
    return out


def build_tokenizer(tok_cfg, train_texts: Sequence[str] | None, cache_dir) -> Tokenizer:
    """The tokenizer the config asks for.

    ``tok_cfg.kind``: ``sentencepiece`` (train on ``train_texts``, cached), ``sentencepiece_model``
    (load ``tok_cfg.path``), or ``wordpiece`` (``tok_cfg.path``: a BERT checkpoint dir or its
    ``tokenizer.json`` / ``vocab.txt``).
    """
    if tok_cfg.kind == "sentencepiece":
        path = train_sentencepiece(train_texts or [], tok_cfg.vocab_size, cache_dir,
                                   model_type=tok_cfg.model_type)
        return SentencePieceTokenizer(path)
    path = pretrained.resolve_path(tok_cfg.path)  # pretrained:NAME -> the installed checkpoint
    if tok_cfg.kind == "sentencepiece_model":
        return SentencePieceTokenizer(path)
    if tok_cfg.kind == "wordpiece":
        return WordPieceTokenizer(path, lowercase=tok_cfg.get("lowercase", True))
    raise DataError(f"config.data.tokenizer.kind={tok_cfg.kind!r} is not one of "
                    "'sentencepiece', 'sentencepiece_model', 'wordpiece'")


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids per document (int32); a document's lines are encoded as one text."""
    return [np.asarray(ids, np.int32) for ids in tok.encode_batch(list(texts))]
