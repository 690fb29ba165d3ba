#!/usr/bin/env bash
# Sets up everything on a fresh machine with only Python 3.10-3.13 and pip:
#   .venv/        beats-compile (editable) with its test, exporter, bench and npu extras
#                 (current onnx and onnxruntime; training runs here too);
#   .cache/torchvision-0.28.0/  torchvision for the MobileNetV3 training test (side folder);
#   .cache/onnx-backend-data/  the ONNX backend test data of the onnx 1.17 wheel.
# ONNX Runtime training 1.19.2 (the optional on-device export, `artifacts --format ort`)
# is not installed here: scripts/ort-training-env.sh makes it on demand.
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
# torchvision's real MobileNetV3 for the training tests: its PyPI wheel is a CUDA
# build whose C ops cannot load beside the CPU torch, and transformers imports any
# torchvision it finds, so it goes into a side folder that only
# fixtures/torchvision_models.py puts on sys.path (with its C-op registrations stubbed).
if [ ! -d .cache/torchvision-0.28.0/torchvision ]; then
  .venv/bin/python -m pip install --quiet --no-deps --target .cache/torchvision-0.28.0 "torchvision==0.28.0"
fi
.venv/bin/python scripts/fetch_backend_data.py
