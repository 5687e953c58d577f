"""Masked LM (BERT-like): ``--config=configs/mlm.py[:demo|test|paper]``; variants combine,
later ones winning (``:demo,test``).

The ``demo`` variant trains its teacher with the measured recipe below (its gain and wall time:
BENCHMARKS.md, "Teacher recipes").

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


OVERLAYS = {"demo": _demo, "paper": _paper}


def get_config(arg=None):
    return _common["base_config"]("mlm", arg, OVERLAYS)
