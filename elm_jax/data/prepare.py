"""The data stage: corpus -> tfds array_record -> tokenizer -> packed rows -> batch sources.

``prepare_data(config)`` is what every stage calls to get its data; ``--stages=data`` runs it
alone and prints the statistics. Everything it builds is cached (the registry archive, the tfds
dataset, the tokenizer) under keys of its inputs, so repeated runs are cheap and identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from elm_jax.data import context_free
from elm_jax.data import corpus as corpus_lib
from elm_jax.data import pipeline, tfds_text
from elm_jax.data import tokenizer as tok_lib
from elm_jax.data.corpus import DataError, Document
from elm_jax.fileio import atomic_write_bytes, atomic_write_json


@dataclasses.dataclass
class DataBundle:
    """What a training stage needs: the tokenizer, the training batches, the fixed batches of the
    validation split (``eval``: compares final models) and of the search split (``search``: scores
    candidates), and the statistics."""

    tokenizer: tok_lib.Tokenizer
    train: pipeline.LMBatches
    eval: pipeline.EvalBatches
    search: pipeline.EvalBatches
    stats: dict


def cache_dir_of(data_cfg) -> Path:
    return Path(data_cfg.cache_dir) if data_cfg.cache_dir else corpus_lib.default_cache_dir()


def _documents_key(splits: dict[str, list[Document]]) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        h.update(split.encode())
        for d in splits[split]:
            h.update(d.name.encode() + b"\0" + hashlib.sha256(d.text.encode()).digest())
    return h.hexdigest()[:16]


BUILTIN_CORPORA = ("shakespeare", "movie_reviews")


def _builtin_splits(name: str, data_cfg, cache: Path
                    ) -> tuple[list[Document], list[Document], list[Document]]:
    """(train, search, validation) of a corpus shipped in a registry archive."""
    if name == "shakespeare":
        docs = corpus_lib.load_shakespeare(cache)
        rest, val = corpus_lib.split_by_document(docs, corpus_lib.DEFAULT_VALIDATION_DOCS)
        train, search = corpus_lib.split_by_document(rest, corpus_lib.DEFAULT_SEARCH_DOCS)
        return train, search, val
    return corpus_lib.three_way_split_by_hash(corpus_lib.load_movie_reviews(cache),
                                              data_cfg.validation_fraction, data_cfg.search_fraction)


def load_documents(data_cfg) -> dict[str, list[Document]]:
    """The ``train``, ``search`` and ``validation`` documents of the configured corpus, read
    through tfds; the three splits hold disjoint documents (DESIGN 5).

    ``search`` scores candidates during the architecture search; ``validation`` compares the final
    models, baselines and teacher, so the found model is never compared on the data that chose it.
    Default corpus: fixed held-out works (:data:`~elm_jax.data.corpus.DEFAULT_SEARCH_DOCS`,
    :data:`~elm_jax.data.corpus.DEFAULT_VALIDATION_DOCS`). ``movie_reviews``: ``data.validation_fraction``
    of the reviews held out by text hash for validation, then ``data.search_fraction`` of the rest
    for the search; ``shakespeare+movie_reviews``: each split the union of both. Otherwise ``data.search_files`` (files)
    or ``data.tfds_search_split`` (tfds) when given, else ``data.search_fraction`` of the training
    documents held out by text hash (:func:`~elm_jax.data.corpus.hold_out_by_hash`). Every split
    is fixed here, before the tokenizer (trained on ``train`` only) or any model sees the text.

    Local corpora (the default, or the user's files) are written once as an array_record tfds
    dataset in the cache and read back with ``tfds.data_source``; a named tfds dataset prepared
    by the user is read with the same reader.
    """
    cache = cache_dir_of(data_cfg)
    held_out_search = "--config.data.search_files=... (or several training documents)"
    if data_cfg.corpus == "tfds":
        data_dir = data_cfg.tfds_data_dir or None

        def read(split: str) -> list[Document]:
            return tfds_text.read_text_split(data_cfg.tfds_name, split, data_dir, data_cfg.text_key,
                                             name_key=None)

        out = {"train": read(data_cfg.tfds_train_split),
               "validation": read(data_cfg.tfds_validation_split)}
        if data_cfg.tfds_search_split:
            out["search"] = read(data_cfg.tfds_search_split)
        else:
            out["train"], out["search"] = corpus_lib.hold_out_by_hash(
                out["train"], data_cfg.search_fraction, "search (--config.data.tfds_search_split=...)")
    else:
        if all(part in BUILTIN_CORPORA for part in data_cfg.corpus.split("+")):
            train, search, val = [], [], []
            for part in data_cfg.corpus.split("+"):
                for split, docs in zip((train, search, val), _builtin_splits(part, data_cfg, cache)):
                    split.extend(docs)
        elif data_cfg.corpus == "files":
            train = corpus_lib.read_text_files(data_cfg.train_files, "data.train_files")
            val = corpus_lib.read_text_files(data_cfg.validation_files, "data.validation_files")
            if data_cfg.search_files:
                search = corpus_lib.read_text_files(data_cfg.search_files, "data.search_files")
            else:
                train, search = corpus_lib.hold_out_by_hash(train, data_cfg.search_fraction,
                                                            f"search ({held_out_search})")
        else:
            raise DataError(f"config.data.corpus={data_cfg.corpus!r} is not 'shakespeare', 'movie_reviews' "
                            "(or both, 'shakespeare+movie_reviews'), 'files' or 'tfds'")
        splits = {"train": train, "search": search, "validation": val}
        data_dir = cache / "tfds" / _documents_key(splits)
        tfds_text.build_local_text(splits, data_dir)
        out = {s: tfds_text.read_text_split(tfds_text.LOCAL_TEXT_NAME, s, data_dir) for s in splits}
    if data_cfg.max_docs > 0:
        out = {s: d[: data_cfg.max_docs] for s, d in out.items()}
    for s, d in out.items():
        if not d or not any(doc.text.strip() for doc in d):
            raise DataError(f"the {s} split of the corpus is empty")
    return out


def _tokenizer_texts(docs: list[Document], max_chars: int) -> list[str]:
    if max_chars <= 0:
        return [d.text for d in docs]
    texts, left = [], max_chars
    for d in docs:
        if left <= 0:
            break
        texts.append(d.text[:left])
        left -= len(texts[-1])
    return texts


def max_predictions_of(cfg) -> int:
    """``data.max_predictions`` resolved: MLM ``-1`` -> :func:`pipeline.auto_max_predictions`;
    CLM (every position scored) and ``0`` -> 0, the head at every position."""
    d = cfg.data
    if cfg.task != "mlm" or d.max_predictions == 0:
        return 0
    if d.max_predictions < 0:
        return pipeline.auto_max_predictions(d.mask_rate, d.seq_len)
    return int(d.max_predictions)


def prepare_data(cfg, workdir: str | os.PathLike | None = None, verbose: bool = False) -> DataBundle:
    """Builds the tokenizer and batch sources for ``cfg``; with ``workdir``, records
    ``workdir/data/stats.json`` and a copy of the tokenizer model there."""
    d = cfg.data
    docs = load_documents(d)
    cache = cache_dir_of(d)
    tok = tok_lib.build_tokenizer(d.tokenizer, _tokenizer_texts(docs["train"], d.tokenizer.max_train_chars),
                                  cache)
    masking = pipeline.Masking(d.mask_rate, d.mask_token_frac, d.random_token_frac,
                               max_predictions_of(cfg))
    pack = pipeline.pack_mlm if cfg.task == "mlm" else pipeline.pack_clm
    rows, tokens = {}, {}
    for split, split_docs in docs.items():
        ids = tok_lib.encode_documents(tok, [x.text for x in split_docs])
        tokens[split] = int(sum(len(i) for i in ids))
        rows[split] = pack(ids, d.seq_len, tok.special)
    train = pipeline.LMBatches(rows["train"], cfg.task, d.batch_size, cfg.seed, tok.special,
                               tok.vocab_size, masking)
    evals = pipeline.EvalBatches(rows["validation"], cfg.task, d.eval_batch_size, cfg.seed,
                                 tok.special, tok.vocab_size, masking, d.eval_batches, split="validation")
    search = pipeline.EvalBatches(rows["search"], cfg.task, d.eval_batch_size, cfg.seed,
                                  tok.special, tok.vocab_size, masking, split="search")
    stats = {
        "task": cfg.task,
        "corpus": d.corpus,
        "tokenizer": tok.describe(),
        "seq_len": d.seq_len,
        "global_batch": d.batch_size,
        "max_predictions": masking.max_predictions,
        # every document of every split, name and text: part of the teacher cache's key
        "documents_key": _documents_key(docs),
        "steps_per_epoch": round(train.steps_per_epoch, 2),
        "eval_batches": len(evals),
        "search_batches": len(search),
    }
    for split in docs:
        chars = sum(len(x.text) for x in docs[split])
        r = rows[split]
        stats[split] = {
            "documents": len(docs[split]),
            "characters": chars,
            "tokens": tokens[split],
            "chars_per_token": round(chars / max(tokens[split], 1), 3),
            "sequences": int(r.shape[0]),
            "padding_fraction": round(float(np.mean(r == tok.special.pad)), 4),
        }
    bundle = DataBundle(tok, train, evals, search, stats)
    # the trivial answer of the validation split (DESIGN 8): every model's loss stands beside it
    stats["baselines"] = {"validation": context_free.reference_loss(bundle, evals)}
    if workdir is not None:
        out = Path(workdir) / "data"
        out.mkdir(parents=True, exist_ok=True)
        src = getattr(tok, "path", None)
        if src is not None and Path(src).is_file():
            atomic_write_bytes(out / Path(src).name, Path(src).read_bytes())
        atomic_write_json(out / "stats.json", stats)
    if verbose:
        print(format_stats(stats))
    return bundle


def format_stats(stats: dict) -> str:
    lines = [f"data: task={stats['task']} corpus={stats['corpus']} tokenizer={stats['tokenizer']['kind']} "
             f"vocab={stats['tokenizer']['vocab_size']} seq_len={stats['seq_len']} "
             f"global_batch={stats['global_batch']} steps/epoch={stats['steps_per_epoch']}"]
    lines.append(f"{'split':<12}{'docs':>6}{'chars':>12}{'tokens':>11}{'chars/tok':>10}{'seqs':>8}{'pad%':>7}")
    for split in ("train", "search", "validation"):
        if split not in stats:  # work directories written before the search split
            continue
        s = stats[split]
        lines.append(f"{split:<12}{s['documents']:>6}{s['characters']:>12,}{s['tokens']:>11,}"
                     f"{s['chars_per_token']:>10}{s['sequences']:>8}{100 * s['padding_fraction']:>6.1f}%")
    for split, b in stats.get("baselines", {}).items():
        lines.append(f"trivial answer on {split}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in b.items() if k.endswith("_loss")))
    return "\n".join(lines)
