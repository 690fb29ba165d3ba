#!/usr/bin/env bash
# Sets up everything on a fresh machine with only Python 3.10-3.12 and pip:
#   .venv/        beats-compile (editable) with its test, exporter and bench extras
#                 (current onnx and onnxruntime);
#   .venv-train/  ONNX Runtime training's last Python release
#                 (onnxruntime-training-cpu 1.19.2, pinned with onnx 1.17) and
#                 beats-compile (editable): `beats-compile artifacts|train` run there;
#   .cache/onnx-backend-data/  the ONNX backend test data of the onnx 1.17 wheel.
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
  .venv/bin/python -m pip install --quiet -e ".[test,exporters,bench,npu]"
  rm -f .venv/.beats-setup-*
  touch "$stamp"
fi
# The training environment.  onnxruntime-training-cpu installs the same
# `onnxruntime` module as the onnxruntime package, so beats-compile goes in with
# --no-deps and its other dependencies are listed here (see scripts/train-requirements.txt).
if [ ! -x .venv-train/bin/python ]; then
  "$PY" -m venv .venv-train
fi
tstamp=.venv-train/.beats-setup-$(cat pyproject.toml scripts/setup.sh scripts/train-requirements.txt | sha256sum | cut -c1-16)
if [ ! -f "$tstamp" ]; then
  .venv-train/bin/python -m pip install --quiet --upgrade pip
  .venv-train/bin/python -m pip install --quiet -r scripts/train-requirements.txt
  .venv-train/bin/python -m pip install --quiet --no-deps -e .
  rm -f .venv-train/.beats-setup-*
  touch "$tstamp"
fi
.venv/bin/python scripts/fetch_backend_data.py
