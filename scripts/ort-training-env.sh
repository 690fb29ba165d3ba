#!/usr/bin/env bash
# The optional ONNX Runtime training environment (.venv-train/): onnxruntime-training-cpu
# 1.19.2, the last Python release of ORT training, with the onnx it accepts (1.17).  Only
# `beats-compile artifacts --format ort` (ORT's on-device training format), its tests and
# bench/train_minilm.py's ORT row use it; training itself runs in .venv on current onnxruntime.
# Wheels exist for CPython 3.10-3.12 on x86-64 Linux, macOS and Windows only.
# onnxruntime-training-cpu installs the same `onnxruntime` module as the onnxruntime package,
# so beats-compile goes in with --no-deps (its other dependencies: scripts/train-requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv-train/bin/python ]; then
  "$PY" -m venv .venv-train
fi
tstamp=.venv-train/.beats-setup-$(cat pyproject.toml scripts/ort-training-env.sh scripts/train-requirements.txt | sha256sum | cut -c1-16)
if [ ! -f "$tstamp" ]; then
  .venv-train/bin/python -m pip install --quiet --upgrade pip
  .venv-train/bin/python -m pip install --quiet -r scripts/train-requirements.txt
  .venv-train/bin/python -m pip install --quiet --no-deps -e .
  rm -f .venv-train/.beats-setup-*
  touch "$tstamp"
fi
