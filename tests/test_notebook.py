"""notebooks/quickstart.ipynb runs headless, top to bottom, on the MLM ``test`` config.

The notebook reads its parameters from ``ELM_JAX_NOTEBOOK_CONFIG``, ``ELM_JAX_NOTEBOOK_WORKDIR`` and
``ELM_JAX_NOTEBOOK_OVERRIDES`` (its parameters cell), so the test executes the committed notebook
unchanged; any failing cell fails the test. Its inference helpers (fill-mask, generation) are then
checked against direct computations: the same model run on other input layouts.
"""

from pathlib import Path

import jax
import nbformat
import numpy as np
from nbclient import NotebookClient

import elm_jax
from elm_jax import config as config_lib
from elm_jax.models.dense import init_dense
from elm_jax.lm import dense_config_from

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.output_type == kind]


def _text(cell):
    return "".join(o.text for o in _outputs(cell, "stream"))


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    # Colab: the install cell only acts inside Colab; one parameters cell sets CONFIG and WORKDIR
    assert 'if "google.colab" in sys.modules:' in code[0].source
    params = [c for c in code if "CONFIG = " in c.source]
    assert len(params) == 1 and "ELM_JAX_NOTEBOOK_CONFIG" in params[0].source


def test_quickstart_notebook_runs_on_the_test_config(tmp_path, monkeypatch):
    workdir = tmp_path / "wd"
    monkeypatch.setenv("ELM_JAX_NOTEBOOK_CONFIG", "configs/mlm.py:test")
    monkeypatch.setenv("ELM_JAX_NOTEBOOK_WORKDIR", str(workdir))
    # the found model only (the pipeline test covers the baselines): a 5x cheaper pipeline
    monkeypatch.setenv("ELM_JAX_NOTEBOOK_OVERRIDES",
                       "--config.export.baselines=() --config.export.measure_latency=False")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --xla_cpu_collective_call_terminate_timeout_seconds=300")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # raises on a failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    pipeline = next(c for c in code if '"elm_jax.main"' in c.source)
    assert "[elm-jax] stage evaluate" in _text(pipeline)
    curves = next(c for c in code if "read_metrics" in c.source)
    pareto = next(c for c in code if "pareto.png" in c.source)
    assert any("image/png" in o.data for o in _outputs(curves, "display_data"))
    shown = [o.data for o in _outputs(pareto, "display_data")]
    assert any("image/png" in d for d in shown) and any("| small | found |" in d.get("text/markdown", "")
                                                        for d in shown)
    for name in ("curves_teacher", "curves_supernet", "curves_retrain", "curves_finetune", "pareto"):
        assert (workdir / "report" / f"{name}.png").is_file()
    fill = _text(code[-1]).splitlines()
    for sentence in ("To be, or not to [MASK]: that is the question.", "My kingdom for a [MASK]!"):
        i = fill.index(sentence)
        probs = [float(line.split()[0]) for line in fill[i + 1:i + 6]]
        assert probs == sorted(probs, reverse=True) and all(0 < p < 1 for p in probs)

    # The helpers cell, checked against direct computations on the notebook's own model.
    helpers = next(c for c in code if "helpers" in c.metadata.get("tags", []))
    ns = {}
    exec(helpers.source, ns)  # noqa: S102 (the notebook's own code)
    model_dir = workdir / "retrain" / "small"
    model, tok = elm_jax.load_model(model_dir), elm_jax.load_tokenizer(model_dir)
    text = "My kingdom for a [MASK]!"
    top = ns["fill_mask"](model, tok, text, k=5)
    # reference: the same sentence right-padded to max_len with an attention mask
    ids = [tok.special.cls, *tok.encode("My kingdom for a "), tok.special.mask, *tok.encode("!")]
    pos = ids.index(tok.special.mask)
    x = np.zeros((1, model.cfg.max_len), np.int32)
    x[0, :len(ids)] = ids
    mask = (np.arange(model.cfg.max_len) < len(ids)).astype(np.int32)[None]
    probs = np.asarray(jax.nn.softmax(model(x, mask).logits[0, pos]), np.float64)
    ref = np.argsort(-probs, kind="stable")[:5]
    assert [i for i, _, _ in top] == ref.tolist()
    np.testing.assert_allclose([p for _, _, p in top], probs[ref], rtol=1e-4)
    assert [w for _, w, _ in top] == [tok.decode([int(i)]) for i in ref]

    # generation on a causal LM of the CLM test config: the windowed, padded loop equals
    # re-running the model on the growing unpadded prefix
    clm = init_dense(dense_config_from(config_lib.load_config(str(REPO / "configs" / "clm.py") + ":test"),
                                       tok.vocab_size), seed=3)
    prompt = "To be, or not to be"
    new = 8
    assert len(tok.encode(prompt)) + new <= clm.cfg.max_len  # no window sliding in the reference
    ref_ids = list(tok.encode(prompt))
    for _ in range(new):
        nxt = int(np.argmax(np.asarray(clm(np.asarray([ref_ids], np.int32)).logits[0, -1])))
        ref_ids.append(nxt)
        if nxt == tok.special.eos:
            break
    assert ns["generate"](clm, tok, prompt, new_tokens=new) == ref_ids
    assert ns["generate"](clm, tok, prompt, new_tokens=new, temperature=1e-6) == ref_ids  # T -> 0
    sampled = ns["generate"](clm, tok, prompt, new_tokens=8, temperature=1.0, seed=1)
    assert sampled == ns["generate"](clm, tok, prompt, new_tokens=8, temperature=1.0, seed=1)
    assert sampled[:len(tok.encode(prompt))] == tok.encode(prompt)
    assert all(type(i) is int and 0 <= i < tok.vocab_size for i in sampled)
