# Entry points. Each target creates .venv with the pinned set (requirements.lock) when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
EXPERIMENT_ARGS ?=

.PHONY: venv test demo experiment clean-venv

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) recipes/demo.py

experiment: $(STAMP)
	$(PY) recipes/experiments/minitron_smollm2.py $(EXPERIMENT_ARGS)

clean-venv:
	rm -rf $(VENV)
