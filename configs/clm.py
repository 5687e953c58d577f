"""Causal LM (GPT-like): ``--config=configs/clm.py[:demo|test|paper]``.

The ``paper`` variant distils from a GPT-2 checkpoint directory:
``--config.teacher.source=hf_gpt2:DIR``.
"""

import os
import runpy

_common = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))


def get_config(arg=None):
    variant = arg or "demo"
    c = _common["base_config"]("clm", variant)
    if variant == "paper":
        c.teacher.source = "hf_gpt2:"  # + the GPT-2 checkpoint directory
    return c
