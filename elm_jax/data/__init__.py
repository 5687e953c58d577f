"""Corpora, tokenizers, tfds text datasets and batch pipelines."""
