# Entry points. `make test` and `make reproduce` set themselves up from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TRACES_DIR ?= ../shared/data/traces

.PHONY: help setup test test-fast lint reproduce reproduce-quick traces wheels clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned CPU stack

test: $(STAMP)  ## lint, then the CPU test suite (Triton kernels under the interpreter)
	$(PY) -m ruff check deft baselines workloads scripts tests
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 tests

test-fast: $(STAMP)  ## the test suite without the slow marker
	TRITON_INTERPRET=1 $(PY) -m pytest -n 2 -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check deft baselines workloads scripts tests

reproduce: $(STAMP)  ## paper sweeps on a GPU, or analytic IO + tables + figures from committed rows on a CPU
	$(PY) -m scripts.reproduce

reproduce-quick: $(STAMP)  ## the quick profile (under 10 minutes on an H100)
	$(PY) -m scripts.reproduce profile=quick

traces:  ## fetch the DeFT authors' public trace templates into ./traces (when ../shared is absent)
	bash scripts/fetch_traces.sh

wheels:  ## download the wheels the GPU machine lacks into .whl/
	bash scripts/download_wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis outputs multirun
