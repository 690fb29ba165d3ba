"""Training D/V: artifacts, the training loop, and the optional ORT on-device export.

The default engine (``native``) builds a train-step and an eval model with the
gradient pass (``passes.gradient``, ``passes.train_step``) and runs them on the
installed onnxruntime.  ``format="ort"`` writes ONNX Runtime training's
on-device artifacts instead; that needs onnxruntime-training-cpu 1.19.2 (with
onnx 1.17) in its own virtual environment (``.venv-train``), where
``generate_artifacts`` and ``train`` run in-process or are delegated to
``python -m beats_compiler.training.worker``.  Nothing here imports
onnxruntime.training at import time.

The entry points live in ``api``; the modules below it import each other in
one direction: ``api`` -> ``worker`` -> ``artifacts``, ``loop`` -> ``native``
-> ``common`` (a leaf), with ``env``, ``preflight`` and ``gradients`` beside.
"""

from __future__ import annotations

from .api import ArtifactsResult, TrainResult, generate_artifacts, train
from .env import find_training_python, in_training_env

__all__ = [
    "ArtifactsResult",
    "TrainResult",
    "find_training_python",
    "generate_artifacts",
    "in_training_env",
    "train",
]
