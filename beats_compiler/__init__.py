"""beats-compile: a verified graph-rewriting compiler for ONNX models."""

import os as _os

# onnxruntime's import writes a telemetry session file ($TMPDIR/.ses) that
# nothing removes; beats-compile leaves no file behind in the temp folder.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .api import CompileResult, compile
from .errors import BeatsError, InputError, InternalError, VerificationError
from .io import load_model, save_model
from .report import CompileReport
from .targets import TARGETS

from .version import VERSION as __version__

__all__ = [
    "BeatsError",
    "CompileReport",
    "CompileResult",
    "InputError",
    "InternalError",
    "TARGETS",
    "VerificationError",
    "compile",
    "load_model",
    "save_model",
]
