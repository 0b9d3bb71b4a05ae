# Two entry points do all setup on a fresh machine:
#   make run   -> create/refresh .venv, then `python -m signal_drift.spectra --dim 64`
#   make test  -> create/refresh .venv, then the test suite (doctests included)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= experiments/spectra_dim64

.PHONY: env run test lint bench verify clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of torch first: an open range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,notebooks,peft]'
	touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m signal_drift.spectra --dim 64 --out $(OUT)

verify: $(STAMP)
	$(BIN)/python -m signal_drift.verify --dim 8
	$(BIN)/python -m signal_drift.verify --dim 32

test: $(STAMP)
	$(BIN)/python -m ruff check signal_drift tests benchmarks notebooks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check signal_drift tests benchmarks notebooks
	$(BIN)/python -m ruff format --check signal_drift tests benchmarks notebooks

# Benchmark peers, installed without their CUDA-pulling dependencies (torch stays 2.13.0 CPU).
PEERS := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 hessian-eigenthings==1.0.0a5 pyhessian==0.1 \
	einops einconv opt-einsum linear_operator unfoldNd jaxtyping wadler_lindig

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(PEERS)
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/lm.py

clean:
	rm -rf $(VENV) build *.egg-info
