"""The optional ORT training environment, made on first use for the tests that need it."""

from __future__ import annotations

import fcntl
import subprocess

import pytest

from beats_compiler.training import env as tenv


@pytest.fixture(scope="session")
def ort_training_env():
    """``.venv-train`` (onnxruntime-training-cpu 1.19.2): scripts/ort-training-env.sh makes it once."""
    script = tenv.REPO_ROOT / "scripts" / "ort-training-env.sh"
    # one maker at a time: every pytest-xdist worker that runs such a test asks for it
    lock = tenv.REPO_ROOT / ".cache" / "ort-training-env.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.run([str(script)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    return tenv.DEFAULT_VENV / "bin" / "python"


@pytest.fixture(autouse=True)
def _ort_training_marker(request):
    if request.node.get_closest_marker("ort_training") is not None and not tenv.in_training_env():
        request.getfixturevalue("ort_training_env")
