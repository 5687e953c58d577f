"""elm-jax: ELM (Elastic Language Model) architecture search in JAX/Flax NNX.

Public entry points for using a model the pipeline produced::

    import elm_jax
    model = elm_jax.load_model("workdirs/mlm_demo/retrain/small")   # a DenseLM (Flax NNX)
    tok = elm_jax.load_tokenizer("workdirs/mlm_demo/retrain/small")
    logits = model(ids_BxS, mask_BxS).logits
"""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


def load_model(path: str | os.PathLike):
    """The :class:`~elm_jax.models.dense.DenseLM` saved in a model directory (an exported,
    retrained or teacher model), ready for inference; its metadata is ``model.cfg`` plus the
    directory's ``arch.json`` when present."""
    from elm_jax.models.io import load_model as _load

    return _load(path)[0]


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a model directory (a SentencePiece ``*.model`` or a WordPiece
    ``tokenizer.json`` / ``vocab.txt``)."""
    from elm_jax.data.corpus import DataError
    from elm_jax.data.tokenizer import SentencePieceTokenizer, WordPieceTokenizer

    p = Path(path)
    sp = sorted(p.glob("*.model"))
    if sp:
        return SentencePieceTokenizer(sp[0])
    if (p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file():
        return WordPieceTokenizer(p)
    raise DataError(f"{p} holds no tokenizer (*.model, tokenizer.json or vocab.txt)")
