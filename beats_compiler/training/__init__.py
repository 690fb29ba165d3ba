"""Training D/V with ONNX Runtime training (issue 4): artifacts, the training
loop, and the bridge to the training interpreter.

ONNX Runtime training's last Python release (onnxruntime-training-cpu 1.19.2,
pinned with onnx 1.17) lives in its own virtual environment (``.venv-train``).
``generate_artifacts`` and ``train`` run in-process when the current
interpreter is that environment, and otherwise delegate to
``python -m beats_compiler.training.worker`` there.  Nothing here imports
onnxruntime.training at import time.
"""

from __future__ import annotations

from .artifacts import ArtifactsResult, generate_artifacts
from .env import find_training_python, in_training_env
from .loop import TrainResult, train

__all__ = [
    "ArtifactsResult",
    "TrainResult",
    "find_training_python",
    "generate_artifacts",
    "in_training_env",
    "train",
]
