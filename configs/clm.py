"""Causal LM (GPT-like): ``--config=configs/clm.py[:demo|test|paper]``; variants combine,
later ones winning (``:demo,test``).

The ``paper`` variant distils from a GPT-2 checkpoint directory:
``--config.teacher.source=hf_gpt2:DIR``.
"""

import os
import runpy

_common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))


def _demo(c):
    # The teacher recipe measured by bench/teacher_recipe.py (README "Training recipe";
    # BENCHMARKS.md "Teacher recipes"): a 1024-piece vocabulary, no dropout, lr 2e-3 held at
    # its peak to half-way of 1,000 steps.
    c.data.tokenizer.vocab_size = 1024
    c.teacher.model.dropout = 0.0
    c.teacher.train = _common["train_config"](steps=1000, lr=2e-3, eval_every=500,
                                              checkpoint_every=500)
    c.teacher.train.decay_start_frac = 0.5


def _paper(c):
    c.teacher.source = "hf_gpt2:"  # + the GPT-2 checkpoint directory


OVERLAYS = {"demo": _demo, "paper": _paper}


def get_config(arg=None):
    return _common["base_config"]("clm", arg, OVERLAYS)
