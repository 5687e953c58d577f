"""Masked LM (BERT-like): ``--config=configs/mlm.py[:demo|test|paper]``.

The ``paper`` variant distils from BERT-base-uncased: give its checkpoint directory with
``--config.teacher.source=hf_bert:DIR --config.data.tokenizer.path=DIR``.
"""

import os
import runpy

_common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))


def get_config(arg=None):
    variant = arg or "demo"
    c = _common["base_config"]("mlm", variant)
    if variant == "paper":
        c.data.tokenizer.update(kind="wordpiece", vocab_size=30522, path="")
        c.teacher.source = "hf_bert:"  # + the BERT-base-uncased checkpoint directory
    return c
