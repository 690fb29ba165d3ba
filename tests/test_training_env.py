"""The test suite in the training environment (issue 4: "the test suite runs in
both environments"): ``.venv-train`` holds onnxruntime-training-cpu 1.19.2 and
onnx 1.17, where ``beats-compile artifacts|train`` do their work in-process.
This runs the modules that code path uses there, so the README's one test
command covers both environments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from beats_compiler.training import env as tenv

ROOT = Path(__file__).resolve().parents[1]
# What runs in the training environment: training, the reparameterization it
# trains, the I/O it reads and writes with, on onnx 1.17 / ORT 1.19.2.
SUBSET = [
    "tests/training",
    "tests/passes/test_training_legalize.py",
    "tests/passes/test_reparam.py",
    "tests/passes/test_reparam_bf16.py",
    "tests/compiler/test_reparam_cli.py",
    "tests/compiler/test_io.py",
]


@pytest.mark.slow
def test_suite_passes_in_the_training_environment(tmp_path):
    if tenv.in_training_env():
        pytest.skip("already running in the training environment (these tests run directly here)")
    python = tenv.DEFAULT_VENV / "bin" / "python"
    assert python.exists(), f"{python} missing: run ./scripts/setup.sh (it creates the training environment)"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("BEATS_TRAIN_PYTHON", None)
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not exporters",
         "--basetemp", str(tmp_path / "t"), *SUBSET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    assert proc.returncode == 0, f"training-environment tests failed:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail
