"""Fine-tuning: GLUE records through tfds, pair encoding, GLUE metrics, KD from a fine-tuned teacher."""

import json
import re
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from elm_jax import engine as train_lib
from elm_jax.config import ConfigError, load_config, validate
from elm_jax.data import glue
from elm_jax.data.corpus import DataError
from elm_jax.data.tasks import SentenceBatches, TaskData, encode_examples, load_task, pair_lengths
from elm_jax.data.tokenizer import WordPieceTokenizer
from elm_jax.engine import sharding
from elm_jax.engine.checkpoint import Checkpointer
from elm_jax.models.classifier import Classifier, encoder_of, load_classifier
from elm_jax.models.dense import BlockSpec, DenseConfig, init_dense
from elm_jax.models.io import save_model
from elm_jax.stages import finetune
from elm_jax.stages.finetune import fine_tune, fine_tuned_teacher, make_loss_fns, metric_ratios
from elm_jax.stages.finetune import run as run_finetune_stage

WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "good", "bad", "film", "was", "very",
         "dull", "fun", "it", "is", "not", "so", "what", "who", "why", "did", "you", "see", "here", "there",
         "every", "day", "night")
VOCAB = 5 + len(WORDS)  # [PAD] [UNK] [CLS] [SEP] [MASK] + the words
SEQ = 16
TEACHER = (BlockSpec("bert", 48, 2),) * 2  # hidden 24
STUDENT = (BlockSpec("mobilebert", 16, 2),)  # hidden 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return WordPieceTokenizer(path)


def _wid(word: str) -> int:
    return 5 + WORDS.index(word)


def _sentences(rng, n, lo=2, hi=9):
    return [" ".join(rng.choice(WORDS, rng.integers(lo, hi))) for _ in range(n)]


def _mrpc_rows(seed, n):
    rng = np.random.default_rng(seed)
    a, b = _sentences(rng, n), _sentences(rng, n)
    return [{"sentence1": x, "sentence2": y, "label": int(x.split()[0] == y.split()[0] or i % 3 == 0)}
            for i, (x, y) in enumerate(zip(a, b))]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    glue.build_local_glue("mrpc", {"train": _mrpc_rows(0, 40), "validation": _mrpc_rows(1, 12),
                                   "test": [{**r, "label": -1} for r in _mrpc_rows(2, 3)]}, d)
    return d


@nnx.jit
def _jit_forward(model, inputs, mask, segment_ids):
    return model(inputs, mask, segment_ids)


def _forward(model, batch):
    """Classifier logits (jitted: one compile beats hundreds of eager op compiles)."""
    return np.asarray(_jit_forward(model, batch["inputs"], batch["mask"], batch["segment_ids"]))


def _tiny(blocks, seed=0, segments=0):
    """A tiny MLM DenseLM over the test vocabulary (the same few shapes in every test, so the
    eager initialisers compile once)."""
    hidden = 24 if blocks == TEACHER else 16
    return init_dense(DenseConfig(vocab_size=VOCAB, hidden=hidden, inner=hidden // 2, blocks=blocks,
                                  max_len=SEQ, type_vocab_size=segments), seed)


# ---------------------------------------------------------------------------------------------
# Data


def test_glue_records_round_trip_through_tfds(tmp_path, glue_dir):
    texts = ["héllo wörld", "ünïcode ✓ ok", "x" * 500]
    cola = [{"sentence": s, "label": i % 2} for i, s in enumerate(texts)]
    glue.build_local_glue("cola", {"train": cola, "validation": cola[:1]}, tmp_path)
    glue.build_local_glue("cola", {"train": cola, "validation": cola[:1]}, tmp_path)  # idempotent
    got = glue.read_glue_split(glue.GLUE_TASKS["cola"], "train", tmp_path)
    assert got.first == tuple(r["sentence"] for r in cola) and got.second is None
    assert got.labels.tolist() == [r["label"] for r in cola]
    want = _mrpc_rows(0, 40)  # written in this order; tfds shuffles on disk, the reader restores idx order
    got = glue.read_glue_split(glue.GLUE_TASKS["mrpc"], "train", glue_dir)
    assert got.first == tuple(r["sentence1"] for r in want)
    assert got.second == tuple(r["sentence2"] for r in want)
    assert got.labels.tolist() == [r["label"] for r in want]
    # model selection: a stratified, seeded part of train, disjoint from what is trained on
    train, held, tests = glue.load_glue(glue.GLUE_TASKS["mrpc"], glue_dir, seed=3, holdout_frac=0.25)
    assert list(tests) == ["validation"] and len(tests["validation"]) == 12
    pairs = lambda s: set(zip(s.first, s.second, s.labels.tolist()))
    assert pairs(train) | pairs(held) == pairs(got) and not pairs(train) & pairs(held)
    assert len(held) == 10 and abs(held.labels.mean() - got.labels.mean()) < 0.1
    again = glue.load_glue(glue.GLUE_TASKS["mrpc"], glue_dir, seed=3, holdout_frac=0.25)[1]
    assert again.first == held.first
    with pytest.raises(DataError, match="labels are hidden"):
        glue.read_glue_split(glue.GLUE_TASKS["mrpc"], "test", glue_dir)
    assert "tensorflow" not in sys.modules


def test_missing_glue_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError) as e:
        glue.load_glue(glue.GLUE_TASKS["sst2"], tmp_path / "nowhere", 0, 0.1)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"tfds build glue/sst2 --file_format=array_record --data_dir={tmp_path / 'nowhere'}" in msg


@pytest.mark.parametrize("field,value,match", [
    ("finetune.task", "glue/stsb", "regression"),
    ("finetune.task", "glue/squad", "unknown fine-tuning task"),
    ("finetune.kd", "kl", "must be one of"),
    ("finetune.temperature", 0.0, "must be >"),
    ("finetune.holdout_frac", 1.0, "must be < 1"),
    ("finetune.teacher_train.steps", 0, "must be >= 1"),
    ("finetune.seeds", 0, "must be >= 1"),
    ("finetune.pooling", "max", "must be one of"),
])
def test_bad_finetune_config_names_the_field(field, value, match):
    cfg = load_config("configs/mlm.py:test")
    cfg.finetune.kd = "dist"
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"^config\.{re.escape(field)}: .*{match}"):
        validate(cfg, ["finetune"])


def _longest_first(la, lb, budget):
    """BERT tokenizers' truncation: drop one token at a time from the longer text (ties: b)."""
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_pair_encoding_and_segments(tok):
    for la in range(14):
        for lb in range(14):
            assert pair_lengths(la, lb, 10) == _longest_first(la, lb, 10)
    split = glue.TaskSplit(("the cat sat", "a " * 20), ("on a mat", "dog ran"), np.array([1, 0]))
    enc = encode_examples(tok, split, SEQ)
    ids = [2, *map(_wid, ("the", "cat", "sat")), 3, *map(_wid, ("on", "a", "mat")), 3]
    assert enc["inputs"][0].tolist() == ids + [0] * (SEQ - len(ids))
    assert enc["segment_ids"][0].tolist() == [0] * 5 + [1] * 4 + [0] * (SEQ - 9)
    assert enc["mask"][0].tolist() == [1] * 9 + [0] * (SEQ - 9)
    la, lb = _longest_first(20, 2, SEQ - 3)  # the long first text is cut, the short pair text kept
    assert enc["inputs"][1].tolist() == [2, *[_wid("a")] * la, 3, _wid("dog"), _wid("ran"), 3]
    assert enc["segment_ids"][1].tolist() == [0] * (la + 2) + [1] * (lb + 1)
    single = encode_examples(tok, glue.TaskSplit(("it is fun",), None, np.array([1])), SEQ)
    assert single["inputs"][0, :5].tolist() == [2, _wid("it"), _wid("is"), _wid("fun"), 3]
    assert not single["segment_ids"].any()
    # the segment ids reach the encoder of a model with a segment table, and only there
    flipped = enc | {"segment_ids": 1 - enc["segment_ids"]}
    for segments, changes in ((2, True), (0, False)):
        model = Classifier(encoder_of(_tiny(STUDENT, segments=segments)), 2, 0)
        assert np.allclose(_forward(model, enc), _forward(model, flipped)) != changes


# ---------------------------------------------------------------------------------------------
# Metrics


def _reference(y, p):
    """Binary accuracy / F1 / MCC straight from the predictions (no confusion matrix)."""
    tp = np.sum((y == 1) & (p == 1))
    tn = np.sum((y == 0) & (p == 0))
    fp = np.sum((y == 0) & (p == 1))
    fn = np.sum((y == 1) & (p == 0))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    den = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return {"accuracy": np.mean(y == p), "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "mcc": (tp * tn - fp * fn) / den if den else 0.0}


def _confusion(y, p, c):
    cm = np.zeros((c, c))
    np.add.at(cm, (y, p), 1)
    return cm


def test_glue_metrics_match_independent_formulas():
    # scikit-learn's documented example: matthews_corrcoef([+1,+1,+1,-1], [+1,-1,+1,+1]) = -0.33...
    m = glue.classification_metrics(_confusion(np.array([1, 1, 1, 0]), np.array([1, 0, 1, 1]), 2),
                                    ("accuracy", "f1", "mcc"))
    assert m["mcc"] == pytest.approx(-1 / 3) and m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == 0.5
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        got = glue.classification_metrics(_confusion(y, p, 2), ("accuracy", "f1", "mcc"))
        assert got == pytest.approx(_reference(y, p))
    y = rng.integers(0, 2, 30)  # a constant predictor: MCC 0 (zero denominator), F1 0 for all-negative
    constant = glue.classification_metrics(_confusion(y, np.zeros_like(y), 2), ("f1", "mcc"))
    assert constant == {"f1": 0.0, "mcc": 0.0}
    # three classes: MCC of a perfect / an inverted-by-permutation predictor
    y = rng.integers(0, 3, 40)
    assert glue.classification_metrics(_confusion(y, y, 3), ("mcc",))["mcc"] == pytest.approx(1.0)
    assert glue.classification_metrics(_confusion(y, y, 3), ("accuracy",))["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------
# Distillation


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))


def _np_kd(kind, zs, zt, tau):
    ps, pt = _np_softmax(zs / tau), _np_softmax(zt / tau)
    if kind == "soft_ce":
        return tau ** 2 * np.mean(-np.sum(pt * np.log(_np_softmax(zs / tau)), -1))
    inter = 1 - np.mean([_np_pearson(ps[i], pt[i]) for i in range(len(ps))])
    intra = 1 - np.mean([_np_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return tau ** 2 * (inter + intra)


@pytest.mark.parametrize("kind", ["dist", "soft_ce"])
def test_kd_loss_wiring_matches_numpy(kind):
    rng = np.random.default_rng(1)
    c, w = 3, 7.5
    teacher = Classifier(encoder_of(_tiny(TEACHER, seed=1)), c, 2)
    student = Classifier(encoder_of(_tiny(STUDENT, seed=3)), c, 4)
    ids = rng.integers(5, VOCAB, (6, 10)).astype(np.int32)
    batch = {"inputs": ids, "mask": np.ones_like(ids), "segment_ids": np.zeros_like(ids),
             "labels": rng.integers(0, c, 6).astype(np.int32),
             "weights": np.array([1, 1, 1, 1, 1, 0], np.float32)}  # the last row: eval padding
    loss_fn, _, frozen = make_loss_fns(c, kind, w, 2.0, teacher)
    loss, sums = nnx.jit(loss_fn)(student, batch, jax.random.key(0), frozen)  # dropout 0: deterministic
    real = batch["weights"] > 0
    zs = _forward(student, batch).astype(np.float64)[real]
    zt = _forward(teacher, batch).astype(np.float64)[real]
    ce = -np.mean(np.log(_np_softmax(zs))[np.arange(5), batch["labels"][real]])
    kd = _np_kd(kind, zs, zt, 2.0)
    assert float(sums["kd_total"]) == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert float(loss) == pytest.approx(ce + w * kd, rel=1e-4)
    agree = np.sum(zs.argmax(-1) == zt.argmax(-1))
    assert float(sums["agree_sum"]) == agree


def test_kd_moves_the_student_to_a_fixed_teacher():
    """KD only (kd_weight 100, random labels): the KD term falls and the student comes to predict
    what the teacher predicts. Student and teacher start from the same encoder, their heads
    differ; each input is one distinct word (in the pooled first position) and [SEP]."""
    c, n = 3, 24
    encoder = encoder_of(_tiny(STUDENT, seed=1))
    teacher, student = Classifier(encoder, c, 7), Classifier(encoder_of(encoder), c, 8)
    rng = np.random.default_rng(0)
    ids = np.zeros((n, 8), np.int32)
    ids[:, 0], ids[:, 1] = rng.permutation(np.arange(5, VOCAB))[:n], 3
    data = {"inputs": ids, "mask": (ids != 0).astype(np.int32), "segment_ids": np.zeros_like(ids),
            "labels": rng.integers(0, c, n).astype(np.int32)}
    assert len(set(_forward(teacher, data).argmax(-1).tolist())) > 1
    loss_fn, eval_fn, frozen = make_loss_fns(c, "dist", 100.0, 1.0, teacher)
    mesh = sharding.make_mesh(None)  # all 8 test devices: the KD step with a sharded batch and teacher
    tc = ConfigDict({"steps": 20, "lr": 1e-2, "warmup_frac": 0.1, "weight_decay": 0.01, "clip_norm": 1.0,
                     "seed": 0})
    trainer = train_lib.Trainer(student, loss_fn, eval_fn, tc, mesh, frozen=frozen,
                                ratios=metric_ratios("dist"))
    src = SentenceBatches(data, 16, 0)
    state = trainer.init_state()
    before = train_lib.evaluate(trainer, state, src)
    kds = []
    for step in range(20):
        state, m = trainer.train_step(state, sharding.global_batch(src.batch(step), mesh))
        kds.append(float(m["kd_total"]))
    after = train_lib.evaluate(trainer, state, src)
    assert np.mean(kds[-5:]) < 0.2 * np.mean(kds[:3])
    assert after["kd_total"] < 0.2 * before["kd_total"]
    assert after["agree"] >= 0.9 and after["agree"] > before["agree"] + 0.3


# ---------------------------------------------------------------------------------------------
# The stage


def test_finetune_stage_on_glue_with_dist_from_the_fine_tuned_teacher(tmp_path, tok, glue_dir, capsys,
                                                                     monkeypatch):
    # one device keeps the stage's checkpointing cheap (the 8-device KD step is tested above)
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda cfg: make_mesh(cfg, devices=jax.devices()[:1]))
    wd = tmp_path / "wd"
    assert tok.vocab_size == VOCAB
    save_model(wd / "teacher" / "model", _tiny(TEACHER, seed=1))
    save_model(wd / "export" / "small", _tiny(STUDENT, seed=2))
    (wd / "export" / "result.json").write_text(json.dumps({"small": {"path": str(wd / "export" / "small")}}))
    cfg = load_config("configs/mlm.py:test")
    cfg.data.seq_len = SEQ
    cfg.finetune.update(task="glue/mrpc", tfds_data_dir=str(glue_dir), kd="dist", kd_weight=2.0,
                        temperature=2.0, holdout_frac=0.2)
    for tc in (cfg.finetune.train, cfg.finetune.teacher_train):
        tc.update(steps=4, eval_every=4, checkpoint_every=4, log_every=2)
    validate(cfg, ["finetune"])
    data = types.SimpleNamespace(tokenizer=tok)
    result = run_finetune_stage(cfg, wd, data)
    small, teacher = result["small"], result["teacher"]
    for entry in (small, teacher):
        assert entry["task"] == "glue/mrpc" and entry["metric_names"] == ["accuracy", "f1"]
        assert entry["test_split"] == "validation" and entry["steps"] == 4
        assert entry["test_metrics"]["accuracy"] == pytest.approx(entry["test_accuracy"])
        assert entry["validation_metrics"]["accuracy"] == pytest.approx(entry["validation_accuracy"])
    assert {k: small["kd"][k] for k in ("kind", "weight", "temperature")} == {
        "kind": "dist", "weight": 2.0, "temperature": 2.0}
    assert teacher["kd"] == {"kind": "none"}
    for run in ("small_glue_mrpc_dist_run", "teacher_glue_mrpc_run"):
        assert (wd / "finetune" / run / "metrics.jsonl").is_file()
    # the cached teacher reproduces its reported metrics, computed here from its predictions
    model = load_classifier(wd / "finetune" / "teacher_glue_mrpc", 2)
    enc = encode_examples(tok, glue.read_glue_split(glue.GLUE_TASKS["mrpc"], "validation", glue_dir), SEQ)
    pred = _forward(model, enc).argmax(-1)
    ref = _reference(enc["labels"], pred)
    assert teacher["test_metrics"] == pytest.approx({"accuracy": ref["accuracy"], "f1": ref["f1"]})
    assert json.loads((wd / "finetune" / "result.json").read_text()) == result
    # the fine-tuned teacher is cached: asked again, it is loaded, not trained
    capsys.readouterr()
    task = load_task(cfg, tok)
    cached, entry = fine_tuned_teacher(cfg, wd, task, sharding.make_mesh(cfg.mesh))
    assert "teacher fine-tuned on glue/mrpc already" in capsys.readouterr().out and entry == teacher
    np.testing.assert_allclose(_forward(cached, enc), _forward(model, enc))
    assert run_finetune_stage(cfg, wd, data) == result  # complete: read back
    cfg.finetune.teacher_train.lr = 0.5  # a cache made with other settings is refused, not reused
    with pytest.raises(ValueError, match="other settings"):
        fine_tuned_teacher(cfg, wd, task, sharding.make_mesh(cfg.mesh))


def test_mean_pooling_reads_the_mean_of_the_real_tokens():
    """finetune.pooling='mean': the head reads sum_t m_t h_t / sum_t m_t of the encoder's final
    states (numpy), 'cls' the state at position 0; an unknown pooling is refused."""
    from elm_jax.models.classifier import pool

    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, (3, SEQ)).astype(np.int32)
    ids[:, 0] = 2
    mask = np.ones_like(ids)
    mask[0, 5:], mask[1, 9:] = 0, 0
    ids[mask == 0] = 0
    enc = encoder_of(_tiny(STUDENT, seed=5))
    h = np.asarray(enc(ids, mask, None).last_hidden)
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(pool(h, mask, "mean")), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pool(h, mask, "cls")), h[:, 0])
    model = Classifier(enc, 2, 0, pooling="mean")
    pooler, head = model.pooler, model.classifier
    pooled = np.tanh(want @ np.asarray(pooler.kernel[...]) + np.asarray(pooler.bias[...]))
    np.testing.assert_allclose(_forward(model, {"inputs": ids, "mask": mask, "segment_ids": np.zeros_like(ids)}),
                               pooled @ np.asarray(head.kernel[...]) + np.asarray(head.bias[...]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        Classifier(enc, 2, 0, pooling="max")


def test_a_saved_classifier_comes_back_with_the_pooling_it_was_trained_with(tmp_path):
    """save_classifier records the pooling (head.json); load_classifier reads it, so the loaded
    model's logits equal the saved one's; a different pooling asked for is refused; a classifier
    saved before the pooling was recorded loads as 'cls' (found by the GLUE teacher test once the
    demo default became 'mean': the reloaded teacher read [CLS] and scored otherwise)."""
    from elm_jax.models.classifier import HEAD_CONFIG, save_classifier

    rng = np.random.default_rng(1)
    ids = rng.integers(5, VOCAB, (4, SEQ)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    batch = {"inputs": ids, "mask": mask, "segment_ids": np.zeros_like(ids)}
    model = Classifier(encoder_of(_tiny(STUDENT, seed=3)), 2, 4, pooling="mean")
    save_classifier(tmp_path / "c", model, {"role": "test"})
    back = load_classifier(tmp_path / "c", 2)
    assert back.pooling == "mean"
    np.testing.assert_allclose(_forward(back, batch), _forward(model, batch), rtol=1e-6, atol=1e-6)
    assert load_classifier(tmp_path / "c", 2, pooling="mean").pooling == "mean"
    with pytest.raises(ValueError, match="trained with pooling='mean'"):
        load_classifier(tmp_path / "c", 2, pooling="cls")
    (tmp_path / "c" / HEAD_CONFIG).unlink()  # written before pooling was recorded
    assert load_classifier(tmp_path / "c", 2).pooling == "cls"


def test_found_model_with_seeds_and_from_scratch_beside_bag_of_words(tmp_path, tok, glue_dir, monkeypatch):
    """finetune.seeds / finetune.scratch: a found model is fine-tuned with every seed, and from
    random initialisation with the same seeds; a baseline with the first seed only; the paired
    comparisons are those of the runs' own per-example scores."""
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda cfg: make_mesh(cfg, devices=jax.devices()[:1]))
    wd = tmp_path / "wd"
    save_model(wd / "export" / "small", _tiny(STUDENT, seed=2))
    save_model(wd / "export" / "small_matched_bert", _tiny(STUDENT, seed=3))
    (wd / "export" / "result.json").write_text(json.dumps({
        "small": {"path": str(wd / "export" / "small"), "kind": "found"},
        "small_matched_bert": {"path": str(wd / "export" / "small_matched_bert"), "kind": "baseline_matched"}}))
    cfg = load_config("configs/mlm.py:test")
    cfg.data.seq_len = SEQ
    cfg.finetune.update(task="glue/mrpc", tfds_data_dir=str(glue_dir), holdout_frac=0.2, seeds=2, scratch=True)
    cfg.finetune.train.update(steps=4, eval_every=4, checkpoint_every=4, log_every=1)
    validate(cfg, ["finetune"])
    result = run_finetune_stage(cfg, wd, types.SimpleNamespace(tokenizer=tok))
    root = wd / "finetune"
    runs = sorted(p.name for p in root.glob("*_run"))
    assert runs == ["small_glue_mrpc_run", "small_glue_mrpc_s1_run", "small_matched_bert_glue_mrpc_run",
                    "small_scratch_glue_mrpc_s0_run", "small_scratch_glue_mrpc_s1_run"]

    def first_loss(run):
        rows = [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]
        return next(r["train/loss"] for r in rows if "train/loss" in r)

    # from scratch is another starting point than the pre-trained encoder, with the same seed
    assert first_loss("small_scratch_glue_mrpc_s0_run") != first_loss("small_glue_mrpc_run")
    small, base = result["small"], result["small_matched_bert"]
    bow = json.loads((root / "bag_of_words.json").read_text())
    n = len(bow["test_correct"])
    assert n == 12 and np.mean(bow["test_correct"]) == pytest.approx(bow["test_accuracy"])
    acc, scratch = small["seeds"]["test_accuracy"], small["scratch"]["test_accuracy"]
    assert small["seeds"]["seeds"] == small["scratch"]["seeds"] == [0, 1] and acc[0] == small["test_accuracy"]
    assert small["scratch_test_accuracy"] == pytest.approx(np.mean(scratch))
    c = small["comparisons"]
    assert c["minus_bag_of_words"]["diff"] == pytest.approx(np.mean(acc) - bow["test_accuracy"])
    assert c["pretrained_minus_scratch"]["diff"] == pytest.approx(np.mean(acc) - np.mean(scratch))
    for comp in (*c.values(), base["comparisons"]["minus_bag_of_words"]):
        assert comp["lo"] <= comp["diff"] <= comp["hi"] and comp["examples"] == n
    assert c["pretrained_minus_scratch"]["runs_a"] == c["pretrained_minus_scratch"]["runs_b"] == 2
    assert base["comparisons"]["minus_bag_of_words"]["diff"] == pytest.approx(
        base["test_accuracy"] - bow["test_accuracy"])
    assert "seeds" not in base and "scratch" not in base and set(base["comparisons"]) == {"minus_bag_of_words"}


@pytest.mark.parametrize("kd", ["none", "dist"])
def test_metric_ratios_derive_what_the_old_sum_rule_did(kd):
    """The declared ratios give the keys and values of the former implicit rule (every
    ``X_sum`` divided by ``weight_sum``); confusion counts and ``kd_total`` stay raw sums."""
    from elm_jax.engine.trainer import derive_ratios

    sums = {"agree_sum": 5.0, "confusion_0_0": 3.0, "confusion_0_1": 1.0, "correct_sum": 4.0,
            "kd_count": 2.0, "kd_total": 0.7, "loss_sum": 6.5, "weight_sum": 8.0}
    if kd == "none":
        sums = {k: v for k, v in sums.items() if not k.startswith(("agree", "kd_"))}
    old = dict(sums) | {k[:-4]: v / sums["weight_sum"] for k, v in sums.items()
                        if k.endswith("_sum") and k != "weight_sum"}
    got = derive_ratios(sums, metric_ratios(kd))
    assert list(got) == list(old) and got == old


# ---------------------------------------------------------------------------------------------
# Model selection on the holdout split


def _word_rows(words, labels):
    """``[CLS] w [SEP]`` rows (padded to SEQ) with the given labels."""
    ids = np.zeros((len(words), SEQ), np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = 2, words, 3
    return {"inputs": ids, "mask": (ids != 0).astype(np.int32), "segment_ids": np.zeros_like(ids),
            "labels": np.asarray(labels, np.int32)}


def _word_task(holdout_flipped: bool):
    """Label = the word's id parity. Train and test follow the rule; the holdout follows it, or
    (``holdout_flipped``) its opposite, so that the better a model learns the rule the worse its
    holdout score: the best holdout step then comes before the last one."""
    words = np.repeat(np.arange(5, VOCAB), 2)
    rule = words % 2
    held = 1 - rule if holdout_flipped else rule
    return _task_data(_word_rows(words, rule), _word_rows(words, held), _word_rows(words, rule))


def _task_data(train, validation, test):
    return TaskData("polarity", 2, ("accuracy",), train, validation, {"test": test})


def _select_tc(**kw):
    return ConfigDict({"steps": 24, "lr": 1e-2, "warmup_frac": 0.1, "weight_decay": 0.01, "b1": 0.9,
                       "b2": 0.999, "eps": 1e-6, "clip_norm": 1.0, "log_every": 4, "eval_every": 4,
                       "checkpoint_every": 8, "keep_checkpoints": 2, "nan_policy": "stop"} | kw)


_LEARNS = {"lr": 3e-2, "checkpoint_every": 6}  # learns the rule within the 24 steps


def _accuracy(model, split):
    return float(np.mean(_forward(model, split).argmax(-1) == split["labels"]))


def _logged_holdout(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval/correct"]) for r in rows if "eval/correct" in r]


def _classifier():
    return Classifier(encoder_of(_tiny(STUDENT, seed=2)), 2, 0)


def _mesh2():
    return sharding.make_mesh(None, devices=jax.devices()[:2])


@pytest.mark.fidelity
def test_fine_tune_tests_the_best_holdout_step_not_the_last(tmp_path):
    """The reported model is the best-holdout one among the logged evaluations (the earliest of
    ties), recomputed here from the returned model's own predictions; the final step's model,
    reported beside it, is the last checkpoint's."""
    data = _word_task(holdout_flipped=True)
    model, entry = fine_tune(_classifier(), data, _select_tc(**_LEARNS), 8, _mesh2(), tmp_path, "run", 0)
    logged = _logged_holdout(tmp_path / "run")
    assert [s for s, _ in logged] == [4, 8, 12, 16, 20, 24]
    scores = [a for _, a in logged]
    best = logged[int(np.argmax(scores))]  # argmax: the first of equal maxima
    assert best[0] < 24 and best[1] > scores[-1]  # the construction: the holdout peaks early
    assert scores.count(best[1]) > 1  # and ties: the earliest of them is selected
    # the returned model IS the selected one: its holdout / test accuracy from its predictions
    assert _accuracy(model, data.validation) == pytest.approx(best[1])
    assert entry["validation_accuracy"] == pytest.approx(best[1])
    assert entry["test_accuracy"] == pytest.approx(_accuracy(model, data.tests["test"]))
    assert entry["selected_step"] == entry["selection"]["step"] == best[0]
    assert entry["selection"]["holdout_score"] == pytest.approx(best[1])
    assert [s for s, _ in entry["selection"]["holdout_evals"]] == [s for s, _ in logged]
    assert entry["selection"]["metric"] == "accuracy" and entry["steps"] == 24
    assert entry["test_metrics"]["accuracy"] == pytest.approx(entry["test_accuracy"])
    # the per-example scores the paired comparisons use: the model's own predictions, padding dropped
    test = data.tests["test"]
    assert len(test["labels"]) % 8  # the last evaluation batch is padded
    correct = finetune.example_correct(model, test, 8)
    np.testing.assert_array_equal(correct, _forward(model, test).argmax(-1) == test["labels"])
    assert correct.mean() == pytest.approx(entry["test_accuracy"])
    # the final step's scores, for transparency: those of the last checkpoint's model
    trainer = train_lib.Trainer(_classifier(), *make_loss_fns(2)[:2], _select_tc(seed=0, **_LEARNS), _mesh2(),
                                ratios=metric_ratios())
    with Checkpointer(tmp_path / "run" / "checkpoints", keep=2, save_every=1) as ck:
        last, _, step = ck.restore_latest(trainer.abstract_state)
    final = trainer.model_from_state(last)
    assert step == entry["final"]["step"] == 24
    assert entry["final"]["test_accuracy"] == pytest.approx(_accuracy(final, data.tests["test"]))
    assert entry["final"]["validation_accuracy"] == pytest.approx(scores[-1])
    assert entry["final"]["test_accuracy"] > entry["test_accuracy"]  # selection changed the answer


class _Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fine_tune(_classifier(), _word_task(holdout_flipped=False), _select_tc(**_LEARNS), 8, _mesh2(),
                     tmp_path_factory.mktemp("whole"), "whole", 0)


def _same_params(m1, m2):
    a, b = jax.tree.leaves(nnx.state(m1, nnx.Param)), jax.tree.leaves(nnx.state(m2, nnx.Param))
    return len(a) == len(b) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b))


@pytest.mark.fidelity
@pytest.mark.parametrize("when", ["before_first_checkpoint", "after_a_checkpoint"])
def test_selection_survives_a_kill_bitwise(tmp_path, monkeypatch, uninterrupted, when):
    """A run killed right after a holdout improvement that no run checkpoint has recorded yet
    (the store then holds a model of an abandoned attempt) and rerun selects the same step and
    returns the same model, bit for bit, as an uninterrupted run, with the same result entry;
    rerun once more when complete, it reads the same answer back."""
    want_model, want = uninterrupted
    evals, best, gains = want["selection"]["holdout_evals"], -1.0, []
    for step, score in evals:
        if score > best:
            best, gains = score, gains + [step]
    every = _LEARNS["checkpoint_every"]
    if when == "before_first_checkpoint":
        kill_at = gains[0] + 1
        assert kill_at < every
    else:
        later = [g for g in gains if g > every and g % every and (g + 1) % every]
        assert later, f"no holdout improvement between checkpoints to kill after: {evals}"
        kill_at = later[0] + 1
    assert want["selected_step"] == gains[-1] and len(gains) > 1

    class Dying(SentenceBatches):
        def batch(self, step, *a):
            if step == kill_at:
                raise _Killed(step)
            return super().batch(step, *a)

    data = _word_task(holdout_flipped=False)
    monkeypatch.setattr(finetune, "SentenceBatches", Dying)
    with pytest.raises(_Killed):
        fine_tune(_classifier(), data, _select_tc(**_LEARNS), 8, _mesh2(), tmp_path, "run", 0)
    store = tmp_path / "run" / finetune.SELECTION_DIR
    stored = sorted(int(p.name) for p in store.iterdir() if p.name.isdigit())
    assert max(stored) == kill_at - 1 > every * (kill_at // every)  # newer than the last checkpoint
    monkeypatch.undo()
    got_model, got = fine_tune(_classifier(), data, _select_tc(**_LEARNS), 8, _mesh2(), tmp_path, "run", 0)
    assert got == want and _same_params(got_model, want_model)
    again_model, again = fine_tune(_classifier(), data, _select_tc(**_LEARNS), 8, _mesh2(), tmp_path, "run", 0)
    assert again == want and _same_params(again_model, want_model)
