"""Finding the ONNX Runtime training interpreter, and importing ORT training
without torch.

``import onnxruntime.training`` imports ``training/optim``, which imports
torch.  The artifact builder and the on-device training API need none of it:
``import_ort_training`` registers an empty package module for
``onnxruntime.training`` (its ``__path__`` set to the real folder) before
importing ``onnxruntime.training.artifacts`` and ``onnxruntime.training.api``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

from ..errors import InputError

ENV_VAR = "BEATS_TRAIN_PYTHON"
ORT_TRAINING_SERIES = "1.19."
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-train"

HOWTO = (
    "ONNX Runtime training (onnxruntime-training-cpu 1.19.2 with onnx 1.17, for --format ort only) is not "
    f"installed: run ./scripts/ort-training-env.sh, or `python -m venv .venv-train && .venv-train/bin/pip install -r "
    f"scripts/train-requirements.txt && .venv-train/bin/pip install --no-deps -e .` in {REPO_ROOT}, "
    f"or set {ENV_VAR} to a Python that has it"
)


def _ort_training_dir() -> Path | None:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "training"
    return folder if (folder / "api").is_dir() and (folder / "artifacts.py").is_file() else None


def in_training_env() -> bool:
    """True when this interpreter's onnxruntime is ORT training 1.19.x."""
    if _ort_training_dir() is None:
        return False
    try:
        from importlib.metadata import version

        ver = version("onnxruntime-training-cpu")
    except Exception:
        try:
            import onnxruntime

            ver = onnxruntime.__version__
        except Exception:
            return False
    return ver.startswith(ORT_TRAINING_SERIES)


def find_training_python() -> str:
    """The interpreter that runs ORT training: ``$BEATS_TRAIN_PYTHON``, else
    this one if it has ORT training 1.19.x, else ``<repo>/.venv-train``."""
    given = os.environ.get(ENV_VAR)
    if given:
        p = Path(given)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise InputError(f"{ENV_VAR}={given} is not an executable Python; {HOWTO}")
        return str(p)
    if in_training_env():
        return sys.executable
    venv = DEFAULT_VENV / "bin" / "python"
    if venv.is_file() and os.access(venv, os.X_OK):
        return str(venv)
    raise InputError(HOWTO)


def runs_here(python: str) -> bool:
    """Whether the work can run in this process (the training Python is this one)."""
    if not in_training_env():
        return False
    try:
        # Not resolved: venvs' pythons are symlinks to one binary.
        return os.path.abspath(python) == os.path.abspath(sys.executable)
    except (OSError, ValueError):
        return False


def import_ort_training():
    """``(artifacts, onnxblock, api)`` modules of ORT training, without torch."""
    folder = _ort_training_dir()
    if folder is None or not in_training_env():
        raise InputError(HOWTO)
    name = "onnxruntime.training"
    mod = sys.modules.get(name)
    if mod is None:
        import onnxruntime  # noqa: F401  (the parent package first)

        mod = types.ModuleType(name)
        mod.__path__ = [str(folder)]
        mod.__file__ = str(folder / "__init__.py")
        mod.__package__ = name
        sys.modules[name] = mod
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # the builder logs every graph transformer at INFO
    from onnxruntime.training import api, artifacts, onnxblock

    return artifacts, onnxblock, api
