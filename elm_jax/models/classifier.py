"""The sentence(-pair) classifier of fine-tuning: a dense encoder with a pooled [CLS] head, and its save / load."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file, save_file

from elm_jax.models import layers
from elm_jax.models.dense import DenseLM
from elm_jax.models.io import fill_params, flat_params, load_model, model_from_flat, save_model


def encoder_of(model: DenseLM, dtype: Any = None) -> DenseLM:
    """The same encoder without its LM head (a classifier never needs the vocabulary
    projection), computing in ``dtype`` (default: the model's own)."""
    cfg = dataclasses.replace(model.cfg, head="none", dtype=jnp.dtype(dtype or model.cfg.dtype))
    flat = {k: v for k, v in flat_params(model).items() if not k.startswith("head.")}
    return model_from_flat(cfg, flat)


class Classifier(nnx.Module):
    """A dense encoder with a pooled ``[CLS]`` classification head."""

    def __init__(self, encoder: DenseLM, num_classes: int, seed: int):
        rngs = nnx.Rngs(params=seed)
        h = encoder.cfg.hidden
        self.encoder = encoder
        self.pooler = layers.dense(h, h, encoder.cfg.dtype, rngs)
        self.classifier = layers.dense(h, num_classes, encoder.cfg.dtype, rngs)

    def __call__(self, inputs, mask, segment_ids=None, *, deterministic=True, rngs=None):
        out = self.encoder(inputs, mask, segment_ids, deterministic=deterministic, rngs=rngs)
        pooled = jnp.tanh(self.pooler(out.last_hidden[:, 0]))
        return self.classifier(pooled)


def save_classifier(path: Path, model: Classifier, meta: Mapping[str, Any]) -> None:
    """``path/encoder/`` (a model directory) and ``path/head.safetensors`` (pooler, classifier)."""
    save_model(path / "encoder", model.encoder, meta=dict(meta))
    heads = {k: v for k, v in flat_params(model).items() if not k.startswith("encoder.")}
    tmp = path / "head.safetensors.tmp"
    save_file(heads, os.fspath(tmp))
    os.replace(tmp, path / "head.safetensors")


def load_classifier(path: Path, num_classes: int, dtype: Any = None) -> Classifier:
    """The classifier :func:`save_classifier` wrote (computing in ``dtype``)."""
    encoder = encoder_of(load_model(path / "encoder")[0], dtype)
    model = Classifier(encoder, num_classes, 0)
    return fill_params(model, load_file(os.fspath(path / "head.safetensors")),
                       f"{path / 'head.safetensors'} ({num_classes} classes)", skip_prefix="encoder.")
