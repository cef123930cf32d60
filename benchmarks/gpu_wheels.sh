#!/usr/bin/env bash
# Wheels of what benchmarks/gpu_suite.sh needs and a bare CUDA image (Python 3.12, its own torch, timm, safetensors,
# numpy, PyYAML, ...) lacks: the params schema's jsonschema, torch-fidelity (the metric networks) and diffusers (the
# SD-VAE), with their own needs, at the versions installed here. Run it on a machine with PyPI; the suite installs
# any *.whl in .whl/ (git-ignored) before it starts.
#
#   bash benchmarks/gpu_wheels.sh            # → .whl/ (about 5 MB)
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PACKAGES="jsonschema jsonschema-specifications referencing rpds-py torch-fidelity diffusers importlib-metadata"
PINS=()
for p in $PACKAGES; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] || { echo "gpu_wheels.sh: $p is not installed in $PY (make setup)" >&2; exit 1; }
  PINS+=("$p==$v")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PINS[@]}"
ls .whl
