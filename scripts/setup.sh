#!/usr/bin/env bash
# Sets up everything on a fresh machine with only Python 3.10-3.12 and pip:
#   .venv/ with beats-compile (editable) and its test and exporter extras,
#   .cache/onnx-backend-data/ with the ONNX backend test data of the onnx 1.17 wheel.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.beats-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch 2.13.0 is the CPU build; install it first so nothing pulls a CUDA build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[test,exporters]"
  rm -f .venv/.beats-setup-*
  touch "$stamp"
fi
.venv/bin/python scripts/fetch_backend_data.py
