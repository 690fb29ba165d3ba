"""The optional ORT on-device export in its own environment: ``.venv-train``
(made on first use by scripts/ort-training-env.sh) holds
onnxruntime-training-cpu 1.19.2 and onnx 1.17, where ``artifacts --format
ort`` and ``train`` on such artifacts run in-process.  This runs the modules of
that code path there, so the README's one test command covers it too."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from beats_compiler.training import env as tenv

ROOT = Path(__file__).resolve().parents[2]
# What runs in the training environment: training, the reparameterization it
# trains, the I/O it reads and writes with, on onnx 1.17 / ORT 1.19.2.
SUBSET = [
    "tests/training/test_artifacts.py",
    "tests/training/test_preflight.py",
    "tests/passes/test_add_layernorm_stat_outputs.py",
    "tests/passes/test_add_layernorm_bias.py",
    "tests/passes/test_untie_layernorm_params.py",
]


@pytest.mark.slow
@pytest.mark.ort_training
def test_ort_export_passes_in_the_training_environment(tmp_path, ort_training_env):
    if tenv.in_training_env():
        pytest.skip("already running in the training environment (these tests run directly here)")
    python = ort_training_env
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("BEATS_TRAIN_PYTHON", None)
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not exporters",
         "--basetemp", str(tmp_path / "t"), *SUBSET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = "\n".join(proc.stdout.splitlines()[-30:])
    assert proc.returncode == 0, f"training-environment tests failed:\n{tail}\n{proc.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail
