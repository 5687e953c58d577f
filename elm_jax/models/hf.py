"""Load Hugging Face BERT and GPT-2 checkpoints into :class:`DenseLM` (no torch needed).

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json`` with its shards), as written by ``save_pretrained``.
Tensors are read with ``safetensors.numpy``. PyTorch ``nn.Linear`` weights are
``[out, in]`` and are transposed; GPT-2 ``Conv1D`` weights are already ``[in, out]``.

Every failure a user can cause (missing directory or file, unsupported model type or
option, missing tensors, wrong shapes) raises :class:`TeacherLoadError` saying what is
wrong and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elm_jax.models.dense import BlockSpec, DenseConfig, DenseLM, empty_model

Path_ = tuple  # parameter path inside DenseLM, e.g. ('blocks', 0, 'attn', 'query', 'kernel')


class TeacherLoadError(ValueError):
    """A teacher checkpoint could not be loaded; the message says why and what to do."""


# ----------------------------------------------------------------------------------
# Reading a checkpoint directory
# ----------------------------------------------------------------------------------

def read_checkpoint_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Reads ``config.json`` and all safetensors tensors of a HF checkpoint directory."""
    d = Path(path).expanduser()
    if not d.exists():
        raise TeacherLoadError(
            f"teacher checkpoint directory {str(d)!r} does not exist. Point the teacher "
            "path at a directory written by Hugging Face save_pretrained (config.json + "
            "model.safetensors)."
        )
    if not d.is_dir():
        raise TeacherLoadError(
            f"teacher checkpoint path {str(d)!r} is a file, not a directory. Give the "
            "directory that holds config.json and model.safetensors."
        )
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise TeacherLoadError(
            f"{str(d)!r} has no config.json. A Hugging Face checkpoint directory needs "
            "config.json next to model.safetensors (save the model with save_pretrained)."
        )
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherLoadError(f"cannot parse {cfg_file}: {e}") from e

    from safetensors.numpy import load_file

    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise TeacherLoadError(f"cannot read shard index {index}: {e}") from e
        files = [d / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TeacherLoadError(f"shards listed in {index} are missing: {missing}")
    else:
        hint = ""
        if (d / "pytorch_model.bin").is_file():
            hint = (" It has pytorch_model.bin only: convert it once, e.g. load it with "
                    "transformers and call save_pretrained(dir, safe_serialization=True).")
        raise TeacherLoadError(
            f"{str(d)!r} has no model.safetensors (nor model.safetensors.index.json).{hint} "
            "Weights are read from safetensors only (no torch at run time)."
        )
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # corrupt file, unsupported dtype, ...
            raise TeacherLoadError(
                f"cannot read {f}: {e}. Re-save the checkpoint as float32/float16 safetensors."
            ) from e
    return config, tensors


class _Tensors:
    """Key lookup with optional prefixes and aliases; records the keys it cannot find."""

    def __init__(self, tensors: dict[str, np.ndarray], prefixes: tuple[str, ...]):
        self.tensors = tensors
        self.prefixes = prefixes
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return self._find(key) is not None

    def _find(self, key: str) -> str | None:
        names = [key]
        # Old BERT checkpoints name LayerNorm parameters gamma / beta.
        if key.endswith("LayerNorm.weight"):
            names.append(key[: -len("weight")] + "gamma")
        if key.endswith("LayerNorm.bias"):
            names.append(key[: -len("bias")] + "beta")
        for p in self.prefixes:
            for n in names:
                if p + n in self.tensors:
                    return p + n
        return None

    def get(self, key: str) -> np.ndarray | None:
        k = self._find(key)
        if k is None:
            self.missing.append(key)
            return None
        return np.asarray(self.tensors[k])


def _assign(model: DenseLM, values: dict[Path_, np.ndarray], sources: dict[Path_, str],
            where: str) -> DenseLM:
    """Writes ``values`` into ``model``'s params after checking every shape; every
    parameter of the model must be covered."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    mismatches = []
    for p, arr in values.items():
        if p not in flat:
            raise AssertionError(f"internal: no parameter {p} in DenseLM")  # loader bug
        want = tuple(flat[p].get_value().shape)
        if tuple(arr.shape) != want:
            mismatches.append(f"{sources[p]}: checkpoint {tuple(arr.shape)} vs expected {want}")
    if mismatches:
        raise TeacherLoadError(
            f"{where}: tensor shapes do not match config.json ({len(mismatches)} mismatches, "
            f"first: {mismatches[:5]}). The config and the weights come from different "
            "models; re-save the checkpoint with save_pretrained."
        )
    uncovered = [p for p in flat if p not in values]
    if uncovered:
        raise AssertionError(f"internal: parameters not loaded: {uncovered[:5]}")
    for p, arr in values.items():
        flat[p].set_value(jnp.asarray(arr, jnp.float32))
    nnx.update(model, state)
    leftover = [x for x in jax.tree_util.tree_leaves(nnx.state(model))
                if isinstance(x, jax.ShapeDtypeStruct)]
    if leftover:
        raise AssertionError("internal: abstract values left in the loaded model")
    return model


def _raise_missing(t: _Tensors, where: str, what: str) -> None:
    if t.missing:
        raise TeacherLoadError(
            f"{where}: {len(t.missing)} tensors missing from the checkpoint (first: "
            f"{t.missing[:6]}; looked up with prefixes {list(t.prefixes)}). {what}"
        )


def _act(name: str, where: str) -> str:
    table = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_fast": "gelu_tanh", "relu": "relu"}
    if name not in table:
        raise TeacherLoadError(
            f"{where}: activation {name!r} is not supported (supported: {sorted(table)})."
        )
    return table[name]


def _check_type(config: dict[str, Any], expected: str, where: str) -> None:
    mt = config.get("model_type")
    if mt != expected:
        raise TeacherLoadError(
            f"{where}: config.json has model_type={mt!r}, this loader reads {expected!r} "
            "checkpoints. Use load_hf_bert for model_type 'bert' and load_hf_gpt2 for "
            "'gpt2'; other architectures are not supported."
        )


def _need(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config or config[key] is None:
        raise TeacherLoadError(f"{where}: config.json lacks {key!r}.")
    return config[key]


# ----------------------------------------------------------------------------------
# BERT
# ----------------------------------------------------------------------------------

def bert_config(config: dict[str, Any], head: str = "none", dtype: Any = jnp.float32,
                where: str = "BERT config") -> DenseConfig:
    """The :class:`DenseConfig` of a HF BERT ``config.json`` dict."""
    _check_type(config, "bert", where)
    pet = config.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise TeacherLoadError(
            f"{where}: position_embedding_type={pet!r} is not supported (only 'absolute')."
        )
    h = int(_need(config, "hidden_size", where))
    act = _act(config.get("hidden_act", "gelu"), where)
    spec = BlockSpec("bert", int(_need(config, "intermediate_size", where)),
                     int(_need(config, "num_attention_heads", where)))
    if h % spec.heads:
        raise TeacherLoadError(f"{where}: num_attention_heads={spec.heads} does not divide hidden_size={h}")
    return DenseConfig(
        vocab_size=int(_need(config, "vocab_size", where)),
        hidden=h,
        inner=max(h // 4, 1),
        blocks=(spec,) * int(_need(config, "num_hidden_layers", where)),
        max_len=int(config.get("max_position_embeddings", 512)),
        embedding="standard",
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        causal=False,
        head=head,
        final_norm=False,
        ln_eps=float(config.get("layer_norm_eps", 1e-12)),
        dropout=0.0,
        dtype=dtype,
        embed_norm=True,
        hidden_act="" if act == "gelu" else act,
    )


def load_hf_bert(path: str | Path, *, head: str | None = None,
                 dtype: Any = jnp.float32) -> tuple[DenseLM, DenseConfig]:
    """Loads a HF BERT checkpoint directory (BertModel or BertForMaskedLM/PreTraining).

    Keys may carry the ``bert.`` prefix or none. ``head=None`` picks 'mlm' when the
    checkpoint has ``cls.predictions.*`` tensors, else 'none'; ``head='mlm'`` on a
    checkpoint without them raises; ``head='none'`` ignores them. The decoder is tied to
    the word embeddings (an untied, different decoder is rejected). The pooler and NSP
    head are ignored.
    """
    where = f"BERT checkpoint {str(path)!r}"
    config, tensors = read_checkpoint_dir(path)
    _check_type(config, "bert", where)
    t = _Tensors(tensors, ("bert.", ""))
    has_mlm = t.has("cls.predictions.transform.dense.weight")
    if head is None:
        head = "mlm" if has_mlm else "none"
    if head not in ("mlm", "none"):
        raise TeacherLoadError(f"{where}: head must be None, 'mlm' or 'none', got {head!r}")
    if head == "mlm" and not has_mlm:
        raise TeacherLoadError(
            f"{where}: head='mlm' was asked but the checkpoint has no MLM head "
            "(cls.predictions.* tensors; it was saved as a plain BertModel). Use a "
            "BertForMaskedLM / BertForPreTraining checkpoint, or head='none' to load the "
            "encoder only."
        )
    cfg = bert_config(config, head, dtype, where)

    vals: dict[Path_, np.ndarray] = {}
    srcs: dict[Path_, str] = {}

    def put(p: Path_, key: str, fn: Callable[[np.ndarray], np.ndarray] = lambda x: x):
        a = t.get(key)
        if a is not None:
            vals[p], srcs[p] = fn(a), key

    tr = lambda a: a.T  # torch Linear [out, in] -> [in, out]

    def linear(p: Path_, key: str):
        put(p + ("kernel",), key + ".weight", tr)
        put(p + ("bias",), key + ".bias")

    def norm(p: Path_, key: str):
        put(p + ("scale",), key + ".weight")
        put(p + ("bias",), key + ".bias")

    put(("embed", "word", "embedding"), "embeddings.word_embeddings.weight")
    put(("embed", "position", "embedding"), "embeddings.position_embeddings.weight")
    if cfg.type_vocab_size:
        put(("embed", "segment", "embedding"), "embeddings.token_type_embeddings.weight")
    norm(("embed", "norm"), "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        hf, me = f"encoder.layer.{i}.", ("blocks", i)
        for n in ("query", "key", "value"):
            linear(me + ("attn", n), hf + f"attention.self.{n}")
        linear(me + ("attn", "output"), hf + "attention.output.dense")
        norm(me + ("attn_norm",), hf + "attention.output.LayerNorm")
        linear(me + ("ffn", "wi"), hf + "intermediate.dense")
        linear(me + ("ffn", "wo"), hf + "output.dense")
        norm(me + ("ffn_norm",), hf + "output.LayerNorm")
    if head == "mlm":
        linear(("head", "transform"), "cls.predictions.transform.dense")
        norm(("head", "norm"), "cls.predictions.transform.LayerNorm")
        if t.has("cls.predictions.bias"):
            put(("head", "bias"), "cls.predictions.bias")
        else:
            put(("head", "bias"), "cls.predictions.decoder.bias")
        if t.has("cls.predictions.decoder.weight") and ("embed", "word", "embedding") in vals:
            dec = t.get("cls.predictions.decoder.weight")
            if dec.shape != vals[("embed", "word", "embedding")].shape or not np.allclose(
                dec, vals[("embed", "word", "embedding")]
            ):
                raise TeacherLoadError(
                    f"{where}: cls.predictions.decoder.weight differs from the word "
                    "embeddings; only tied MLM decoders are supported."
                )
    _raise_missing(t, where, "The file is not a complete BERT checkpoint for its "
                   "config.json; re-save it with save_pretrained.")
    model = empty_model(cfg)
    return _assign(model, vals, srcs, where), cfg


# ----------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------

def gpt2_config(config: dict[str, Any], head: str = "clm", dtype: Any = jnp.float32,
                where: str = "GPT-2 config") -> DenseConfig:
    """The :class:`DenseConfig` of a HF GPT-2 ``config.json`` dict."""
    _check_type(config, "gpt2", where)
    if config.get("scale_attn_by_inverse_layer_idx", False):
        raise TeacherLoadError(f"{where}: scale_attn_by_inverse_layer_idx=True is not supported.")
    if not config.get("scale_attn_weights", True):
        raise TeacherLoadError(f"{where}: scale_attn_weights=False is not supported.")
    if config.get("add_cross_attention", False):
        raise TeacherLoadError(f"{where}: cross-attention GPT-2 checkpoints are not supported.")
    h = int(_need(config, "n_embd", where))
    heads = int(_need(config, "n_head", where))
    if h % heads:
        raise TeacherLoadError(f"{where}: n_head={heads} does not divide n_embd={h}")
    inner = config.get("n_inner") or 4 * h
    act = _act(config.get("activation_function", "gelu_new"), where)
    return DenseConfig(
        vocab_size=int(_need(config, "vocab_size", where)),
        hidden=h,
        inner=max(h // 4, 1),
        blocks=(BlockSpec("gpt2", int(inner), heads),) * int(_need(config, "n_layer", where)),
        max_len=int(_need(config, "n_positions", where)),
        embedding="standard",
        type_vocab_size=0,
        causal=True,
        head=head,
        final_norm=True,
        ln_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        dropout=0.0,
        dtype=dtype,
        embed_norm=False,
        hidden_act="" if act == "gelu_tanh" else act,
    )


def load_hf_gpt2(path: str | Path, *, head: str = "clm",
                 dtype: Any = jnp.float32) -> tuple[DenseLM, DenseConfig]:
    """Loads a HF GPT-2 checkpoint directory (GPT2Model or GPT2LMHeadModel).

    Keys may carry the ``transformer.`` prefix or none. ``c_attn`` is split into query,
    key and value; the LM head is tied to ``wte`` (an untied, different ``lm_head`` is
    rejected); ``ln_f`` becomes ``final_norm``. ``head`` is 'clm' or 'none'.
    """
    where = f"GPT-2 checkpoint {str(path)!r}"
    config, tensors = read_checkpoint_dir(path)
    if head not in ("clm", "none"):
        raise TeacherLoadError(f"{where}: head must be 'clm' or 'none', got {head!r}")
    cfg = gpt2_config(config, head, dtype, where)
    h = cfg.hidden
    t = _Tensors(tensors, ("transformer.", ""))
    vals: dict[Path_, np.ndarray] = {}
    srcs: dict[Path_, str] = {}

    def put(p: Path_, key: str, fn: Callable[[np.ndarray], np.ndarray] = lambda x: x):
        a = t.get(key)
        if a is not None:
            vals[p], srcs[p] = fn(a), key

    def conv1d(p: Path_, key: str):  # Conv1D weight is [in, out] already
        put(p + ("kernel",), key + ".weight")
        put(p + ("bias",), key + ".bias")

    def norm(p: Path_, key: str):
        put(p + ("scale",), key + ".weight")
        put(p + ("bias",), key + ".bias")

    put(("embed", "word", "embedding"), "wte.weight")
    put(("embed", "position", "embedding"), "wpe.weight")
    for i in range(cfg.num_layers):
        hf, me = f"h.{i}.", ("blocks", i)
        norm(me + ("attn_norm",), hf + "ln_1")
        w, b = t.get(hf + "attn.c_attn.weight"), t.get(hf + "attn.c_attn.bias")
        if w is not None and b is not None:
            if w.shape != (h, 3 * h) or b.shape != (3 * h,):
                raise TeacherLoadError(
                    f"{where}: {hf}attn.c_attn has shape {w.shape}/{b.shape}, expected "
                    f"{(h, 3 * h)}/{(3 * h,)} from config.json (n_embd={h})."
                )
            for j, n in enumerate(("query", "key", "value")):
                vals[me + ("attn", n, "kernel")] = w[:, j * h:(j + 1) * h]
                vals[me + ("attn", n, "bias")] = b[j * h:(j + 1) * h]
                srcs[me + ("attn", n, "kernel")] = hf + "attn.c_attn.weight"
                srcs[me + ("attn", n, "bias")] = hf + "attn.c_attn.bias"
        conv1d(me + ("attn", "output"), hf + "attn.c_proj")
        norm(me + ("ffn_norm",), hf + "ln_2")
        conv1d(me + ("ffn", "wi"), hf + "mlp.c_fc")
        conv1d(me + ("ffn", "wo"), hf + "mlp.c_proj")
    norm(("final_norm",), "ln_f")
    if "lm_head.weight" in tensors and ("embed", "word", "embedding") in vals:
        lm = tensors["lm_head.weight"]
        wte = vals[("embed", "word", "embedding")]
        if lm.shape != wte.shape or not np.allclose(lm, wte):
            raise TeacherLoadError(
                f"{where}: lm_head.weight differs from wte.weight; only tied LM heads are "
                "supported."
            )
    _raise_missing(t, where, "The file is not a complete GPT-2 checkpoint for its "
                   "config.json; re-save it with save_pretrained.")
    model = empty_model(cfg)
    return _assign(model, vals, srcs, where), cfg


__all__ = ["TeacherLoadError", "load_hf_bert", "load_hf_gpt2", "bert_config",
           "gpt2_config", "read_checkpoint_dir"]
