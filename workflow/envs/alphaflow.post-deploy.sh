#!/usr/bin/env bash
# Snakemake runs this inside the new environment of alphaflow.yaml (`snakemake --sdm conda`), from the workflow's
# working directory, the repository root: the hash-pinned packages installed without their dependencies
# (requirements/no-deps.txt), then the project itself, editable, so every rule's `alphaflow` is this checkout.
set -euo pipefail
if [ ! -f requirements/no-deps.txt ] || [ ! -f pyproject.toml ]; then
  echo "alphaflow.post-deploy.sh: run snakemake from the alphaflow repository root (found no requirements/no-deps.txt in $PWD)" >&2
  exit 1
fi
python -m pip install --no-deps --require-hashes -r requirements/no-deps.txt
python -m pip install --no-deps --no-build-isolation -e .
