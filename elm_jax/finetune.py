"""The finetune / evaluate stages.

``finetune`` (MLM): each retrained model (or, without a retrain stage, each exported one) gets a
sentence classifier on its ``[CLS]`` state (pooler ``tanh(W_p h + b_p)``, then ``W_c``) and is
fine-tuned on the sentence-polarity task (Pang & Lee, the source sentences of SST-2; fixed
stratified split), reporting validation and test accuracy.

``evaluate``: validation loss (and perplexity for CLM) of every final model on the corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from elm_jax import export, sharding
from elm_jax import train as train_lib
from elm_jax.data.corpus import LabelledSplit, load_polarity
from elm_jax.data.prepare import cache_dir_of
from elm_jax.data.tokenizer import Tokenizer
from elm_jax.fileio import atomic_write_json
from elm_jax.models import layers
from elm_jax.models.dense import DenseLM
from elm_jax.teacher import evaluate_lm


class Classifier(nnx.Module):
    """A dense encoder with a pooled ``[CLS]`` classification head."""

    def __init__(self, encoder: DenseLM, num_classes: int, seed: int):
        rngs = nnx.Rngs(params=seed)
        h = encoder.cfg.hidden
        self.encoder = encoder
        self.pooler = layers.dense(h, h, encoder.cfg.dtype, rngs)
        self.classifier = layers.dense(h, num_classes, encoder.cfg.dtype, rngs)

    def __call__(self, inputs, mask, *, deterministic=True, rngs=None):
        out = self.encoder(inputs, mask, deterministic=deterministic, rngs=rngs)
        pooled = jnp.tanh(self.pooler(out.last_hidden[:, 0]))
        return self.classifier(pooled)


def encode_sentences(tok: Tokenizer, split: LabelledSplit, seq_len: int) -> dict[str, np.ndarray]:
    """``[CLS] ids [SEP]`` (truncated to ``seq_len``), padded; labels as int32."""
    ids = np.full((len(split.texts), seq_len), tok.special.pad, np.int32)
    for i, row in enumerate(tok.encode_batch(list(split.texts))):
        row = [tok.special.cls, *row[: seq_len - 2], tok.special.sep]
        ids[i, : len(row)] = row
    return {"inputs": ids, "mask": (ids != tok.special.pad).astype(np.int32),
            "labels": np.asarray(split.labels, np.int32)}


class SentenceBatches:
    """Training batches (a pure function of (seed, step), per-epoch permutations) and fixed
    evaluation batches (the last one padded with zero-weight rows)."""

    def __init__(self, data: dict[str, np.ndarray], batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.n = len(data["labels"])

    def _rows(self, idx: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.data.items()} | {"weights": weights.astype(np.float32)}

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        g = step * self.batch_size + np.arange(self.batch_size)
        epochs, pos = g // self.n, g % self.n
        idx = np.array([np.random.default_rng([self.seed, int(e)]).permutation(self.n)[p]
                        for e, p in zip(epochs, pos)])
        per = self.batch_size // process_count
        sl = slice(process_index * per, (process_index + 1) * per)
        return {k: v[sl] for k, v in self._rows(idx, np.ones(self.batch_size)).items()}

    def batches(self, process_index: int = 0, process_count: int = 1):
        per = self.batch_size // process_count
        for start in range(0, self.n, self.batch_size):
            idx = np.arange(start, start + self.batch_size)
            w = idx < self.n
            b = self._rows(np.minimum(idx, self.n - 1), w)
            yield {k: v[process_index * per:(process_index + 1) * per] for k, v in b.items()}


def _sums(logits, batch):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
    w = batch["weights"]
    return {"loss_sum": jnp.sum(nll * w), "weight_sum": jnp.sum(w),
            "correct_sum": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w)}


def cls_loss_fn(model: Classifier, batch, rng):
    """Mean cross-entropy of the class labels (dropout on)."""
    s = _sums(model(batch["inputs"], batch["mask"], deterministic=False, rngs=nnx.Rngs(dropout=rng)), batch)
    return s["loss_sum"] / jnp.maximum(s["weight_sum"], 1.0), s


def cls_eval_fn(model: Classifier, batch):
    return _sums(model(batch["inputs"], batch["mask"]), batch)


def final_models(workdir: str | os.PathLike) -> dict[str, Path]:
    """Budget -> model directory: the retrained models, else the exported ones."""
    for stage in ("retrain", "export"):
        p = Path(workdir) / stage / "result.json"
        if p.is_file():
            return {k: Path(v["path"]) for k, v in json.loads(p.read_text()).items()}
    raise FileNotFoundError(f"no exported models in {workdir}: run the export stage first")


def run_finetune_stage(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Fine-tunes each final MLM model on sentence polarity; accuracy on validation and test."""
    root = Path(workdir) / "finetune"
    done = root / "result.json"
    if done.is_file():
        print(f"[finetune] complete already: {root}")
        return json.loads(done.read_text())
    if cfg.task != "mlm":
        raise ValueError("finetune (sentence polarity) needs an MLM encoder; use --stages=evaluate for CLM")
    fc = cfg.finetune
    splits = load_polarity(cache_dir_of(cfg.data), seed=cfg.seed)
    enc = {k: encode_sentences(data.tokenizer, v, cfg.data.seq_len) for k, v in splits.items()}
    mesh = sharding.make_mesh(cfg.mesh)
    result = {}
    for name, path in final_models(workdir).items():
        encoder, _ = export.load_model(path)
        model = Classifier(encoder, 2, cfg.seed)
        tc = ConfigDict(fc.train.to_dict() | {"seed": cfg.seed})
        trainer = train_lib.Trainer(model, cls_loss_fn, cls_eval_fn, tc, mesh)
        train_src = SentenceBatches(enc["train"], fc.batch_size, cfg.seed)
        state, summary = train_lib.fit(trainer, train_src, SentenceBatches(enc["validation"], fc.batch_size, 0),
                                       root, name=f"{name}_run", meta={"budget": name})
        test = train_lib.evaluate(trainer, state, SentenceBatches(enc["test"], fc.batch_size, 0))
        result[name] = {"validation_accuracy": summary["eval"]["correct"],
                        "test_accuracy": test["correct"], "steps": summary["final_step"]}
        print(f"[finetune] {name}: polarity accuracy validation {result[name]['validation_accuracy']:.4f}, "
              f"test {result[name]['test_accuracy']:.4f}")
    if jax.process_index() == 0:
        atomic_write_json(done, result)
    return result


def run_evaluate_stage(cfg, workdir: str | os.PathLike, data) -> dict[str, Any]:
    """Validation loss / perplexity / token accuracy of every final model and of the teacher."""
    mesh = sharding.make_mesh(cfg.mesh)
    models = {name: export.load_model(p)[0] for name, p in final_models(workdir).items()}
    teacher_dir = Path(workdir) / "teacher" / "model"
    if export.is_model_dir(teacher_dir):
        models["teacher"] = export.load_model(teacher_dir)[0]
    result = {}
    for name, model in models.items():
        if model.cfg.head == "none":
            continue
        m = evaluate_lm(model, data.eval, mesh)
        result[name] = {"loss": m["loss"], "perplexity": m["perplexity"],
                        "accuracy": m["correct"], "params": sum(
                            v.size for v in export.flat_params(model).values())}
        print(f"[evaluate] {name}: loss {m['loss']:.4f} perplexity {result[name]['perplexity']:.2f} "
              f"accuracy {m['correct']:.4f} ({result[name]['params']:,} params)")
    if jax.process_index() == 0:
        from elm_jax.report import build_report

        atomic_write_json(Path(workdir) / "evaluate" / "result.json", result)
        print(build_report(workdir))
    return result
