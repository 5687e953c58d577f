"""The sentence(-pair) classifier of fine-tuning: a dense encoder with a pooled [CLS] head, and its save / load."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file, save_file

from elm_jax.fileio import atomic_write_bytes
from elm_jax.models import layers
from elm_jax.models.dense import DenseLM
from elm_jax.models.io import fill_params, flat_params, load_model, model_from_flat, save_model


def encoder_of(model: DenseLM, dtype: Any = None) -> DenseLM:
    """The same encoder without its LM head (a classifier never needs the vocabulary
    projection), computing in ``dtype`` (default: the model's own)."""
    cfg = dataclasses.replace(model.cfg, head="none", dtype=jnp.dtype(dtype or model.cfg.dtype))
    flat = {k: v for k, v in flat_params(model).items() if not k.startswith("head.")}
    return model_from_flat(cfg, flat)


POOLINGS = ("cls", "mean")


def pool(hidden_BxLxH: jnp.ndarray, mask_BxL: jnp.ndarray, pooling: str) -> jnp.ndarray:
    """The sentence vector ``[B, H]`` the head reads: ``cls``, the final state at position 0
    (BERT's ``[CLS]``); ``mean``, ``sum_t m_t h_t / max(sum_t m_t, 1)`` over the real
    (``mask = 1``) positions. An encoder pre-trained by MLM alone never trains its ``[CLS]`` state
    to summarise the sentence (BERT's next-sentence task did that); the mean is the usual remedy."""
    if pooling == "cls":
        return hidden_BxLxH[:, 0]
    if pooling == "mean":
        m = mask_BxL.astype(hidden_BxLxH.dtype)[..., None]
        return (hidden_BxLxH * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


class Classifier(nnx.Module):
    """A dense encoder with a pooled classification head ``W_c tanh(W_p pool(h) + b_p)``
    (:func:`pool`: the ``[CLS]`` state or the mean over real positions)."""

    def __init__(self, encoder: DenseLM, num_classes: int, seed: int, pooling: str = "cls"):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        rngs = nnx.Rngs(params=seed)
        h = encoder.cfg.hidden
        self.pooling = pooling
        self.encoder = encoder
        self.pooler = layers.dense(h, h, encoder.cfg.dtype, rngs)
        self.classifier = layers.dense(h, num_classes, encoder.cfg.dtype, rngs)

    def __call__(self, inputs, mask, segment_ids=None, *, deterministic=True, rngs=None):
        out = self.encoder(inputs, mask, segment_ids, deterministic=deterministic, rngs=rngs)
        pooled = jnp.tanh(self.pooler(pool(out.last_hidden, mask, self.pooling)))
        return self.classifier(pooled)


HEAD_CONFIG = "head.json"  # beside head.safetensors: how the head reads the encoder (pooling)


def save_classifier(path: Path, model: Classifier, meta: Mapping[str, Any]) -> None:
    """``path/encoder/`` (a model directory), ``path/head.safetensors`` (pooler, classifier) and
    ``path/head.json`` (the pooling the head was trained with)."""
    save_model(path / "encoder", model.encoder, meta=dict(meta))
    atomic_write_bytes(path / HEAD_CONFIG, json.dumps({"pooling": model.pooling}).encode())
    heads = {k: v for k, v in flat_params(model).items() if not k.startswith("encoder.")}
    tmp = path / "head.safetensors.tmp"
    save_file(heads, os.fspath(tmp))
    os.replace(tmp, path / "head.safetensors")


def load_classifier(path: Path, num_classes: int, dtype: Any = None, pooling: str | None = None) -> Classifier:
    """The classifier :func:`save_classifier` wrote (computing in ``dtype``), pooling as it was
    trained (``head.json``; ``'cls'`` for a classifier saved before the pooling was recorded).
    A ``pooling`` given that differs from the recorded one is refused: the head would read
    other features than it learnt on."""
    head_cfg = path / HEAD_CONFIG
    recorded = json.loads(head_cfg.read_text())["pooling"] if head_cfg.is_file() else None
    if pooling is not None and recorded is not None and pooling != recorded:
        raise ValueError(f"{path}: this classifier was trained with pooling={recorded!r}, "
                         f"not {pooling!r}")
    encoder = encoder_of(load_model(path / "encoder")[0], dtype)
    model = Classifier(encoder, num_classes, 0, pooling or recorded or "cls")
    return fill_params(model, load_file(os.fspath(path / "head.safetensors")),
                       f"{path / 'head.safetensors'} ({num_classes} classes)", skip_prefix="encoder.")
