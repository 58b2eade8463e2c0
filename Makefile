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
# The example task packages are installed as a user installs theirs (pip, as packages of
# their own, next to elastic-sgd): jobs name them as gpt_bytes.task:build and
# cnn_digits.task:build, and the tests import them from the installed packages.
EXAMPLES := examples/gpt_bytes examples/cnn_digits

$(VENV)/.installed: pyproject.toml $(addsuffix /pyproject.toml,$(EXAMPLES))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet $(addprefix -e ,$(EXAMPLES))
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

SOURCES := core actors service api elastic_sgd cli tests bench scripts examples

# ruff's rules (complexity: mccabe at most 12; unused arguments) and the import-linter
# layer contracts are configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/lint-imports

# mypy strict on the packages core actors service api elastic_sgd
# cli (the list, and the per-library
# overrides, are pyproject.toml's [tool.mypy]); then, with the same settings, the example
# task packages and the benchmarks that train them
TYPED_EXAMPLES := examples/gpt_bytes/gpt_bytes examples/cnn_digits/cnn_digits \
	bench/plain_task.py bench/transformer.py

typecheck: setup
	$(BIN)/mypy
	$(BIN)/mypy $(TYPED_EXAMPLES)

test: setup browser lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

unit: setup
	$(PY) -m pytest -q -m unit

bench: setup
	$(PY) -m bench.throughput
	$(PY) -m bench.straggler
	$(PY) -m bench.transformer

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
