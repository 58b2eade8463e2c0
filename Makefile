# elastic-sgd: set up from nothing, run the main job, run the tests.
# `make demo` and `make test` are the two commands the README starts with.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup browser demo run test lint typecheck unit integration e2e bench clean

setup: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml (a CPU wheel lies on this machine's disk;
# an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Headless Chromium (Debian's package) for the dashboard's browser test.
browser:
	@command -v chromium >/dev/null 2>&1 || bash scripts/install_chromium.sh

# The main job: the service on its embedded defaults, configs/demo.yaml submitted and
# watched to the end; leaves a summary and a plot under runs/demo.
demo: setup
	bash scripts/demo.sh

# One job without the service.
run: setup
	$(BIN)/elastic-sgd run configs/digits_elastic.yaml --out runs/digits-elastic

SOURCES := core actors service api elastic_sgd cli tests bench scripts

# ruff's rules (complexity: mccabe at most 12; unused arguments) and the import-linter
# layer contracts are configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/lint-imports

# mypy strict on the packages core actors service api elastic_sgd cli (the list, and the per-library
# overrides, are pyproject.toml's [tool.mypy])
typecheck: setup
	$(BIN)/mypy

test: setup browser lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

unit: setup
	$(PY) -m pytest -q -m unit

bench: setup
	$(PY) -m bench.throughput
	$(PY) -m bench.straggler

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
