# cryobench_lab — every target creates/uses its own virtual environment in $(VENV).
#
# TORCH picks the PyTorch build installed before everything else. The default is the CPU build that this
# project's CI machines carry locally. On a GPU machine use e.g. `make demo TORCH="torch --index-url
# https://download.pytorch.org/whl/cu124"`, or `make demo TORCH=` to keep a torch you installed yourself.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup demo test test-full bench lint clean

help:
	@echo "make demo       set up, then run the oracle reconstruction on the built-in tomotwin3 dataset"
	@echo "make test       set up, then run the fast test suite (~10 min on 2 CPU cores)"
	@echo "make test-full  also run tests marked slow"
	@echo "make bench      run the benchmark scripts (results go to BENCHMARKS.md by hand)"
	@echo "make lint       ruff"
	@echo "make clean      remove the venv, outputs and caches"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH)" ]; then $(BIN)/pip install -q $(TORCH); fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m cryobench_lab model=backproject data=tomotwin3

test: setup
	$(BIN)/python -m pytest -q

test-full: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(BIN)/python bench/oracle_vs_cryodrgn.py
	$(BIN)/python bench/lazy_memory.py

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
