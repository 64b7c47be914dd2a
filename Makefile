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

# ---- studies (conf/sweep/*.yaml): sweep, then compare. SIZE=tiny shrinks a study to minutes;
# SWEEP_ARGS narrows or extends the grid, e.g. SWEEP_ARGS="model=segvae,segvae_fixedseg seed=0,1 data.snr=0.1".
# Re-running a target skips the finished runs. Outputs: $(SWEEPS)/<study>/ and $(SWEEPS)/<study>/compare/.
SWEEPS ?= multirun
SIZE ?=
SWEEP_ARGS ?=
.PHONY: sweep-segmentation sweep-segment-count sweep-hydra sweep-partgmm sweep-leaderboard
sweep-segmentation sweep-segment-count sweep-hydra sweep-partgmm sweep-leaderboard: setup
	CRYOBENCH_SWEEPS=$(SWEEPS) $(BIN)/python -m cryobench_lab -m +sweep=$(STUDY_$@) $(if $(SIZE),+size=$(SIZE)) $(SWEEP_ARGS)
	$(BIN)/python -m cryobench_lab.compare $(SWEEPS)/$(STUDY_$@)
STUDY_sweep-segmentation := segmentation_ablation
STUDY_sweep-segment-count := segment_count
STUDY_sweep-hydra := hydra_kd
STUDY_sweep-partgmm := partgmm_ablation
STUDY_sweep-leaderboard := leaderboard

help:
	@echo "make demo       set up, then run the headline job: the mixture of neural fields on the built-in tomotwin3 dataset"
	@echo "make test       set up, then run the fast test suite (~10 min on 2 CPU cores)"
	@echo "make test-full  also run tests marked slow"
	@echo "make bench      run the benchmark scripts (results go to BENCHMARKS.md by hand)"
	@echo "make lint       ruff"
	@echo "make clean      remove the venv, outputs and caches"
	@echo "make sweep-segmentation [SIZE=tiny] [SWEEP_ARGS=...]  a study, then its comparison (also sweep-hydra, sweep-partgmm, sweep-segment-count, sweep-leaderboard)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH)" ]; then $(BIN)/pip install -q $(TORCH); fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m cryobench_lab model=hydra data=tomotwin3

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

test-full: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup
	$(BIN)/python bench/oracle_vs_cryodrgn.py
	$(BIN)/python bench/lazy_memory.py

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
