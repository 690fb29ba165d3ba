"""Framework-agnostic ONNX graph passes (onnx, numpy, onnx-graphsurgeon, networkx only)."""

from .base import ManagerReport, Pass, PassError, PassManager, PassRecord, PassResult
from .cleanup import (
    DedupeInitializers,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    EliminateIdentity,
    EliminateNopOps,
)
from .constant_folding import FoldConstants
from .convert import Envelope, to_graph, to_model
from .fusions import FuseConvBatchNorm, FuseMatMulAdd
from .inline_if import InlineConstantIf
from .shapes import FoldShapes, TypeMap, infer_types

__all__ = [
    "DedupeInitializers",
    "EliminateCommonSubexpressions",
    "EliminateDeadCode",
    "EliminateIdentity",
    "EliminateNopOps",
    "Envelope",
    "FoldConstants",
    "FoldShapes",
    "FuseConvBatchNorm",
    "FuseMatMulAdd",
    "InlineConstantIf",
    "ManagerReport",
    "Pass",
    "PassError",
    "PassManager",
    "PassRecord",
    "PassResult",
    "TypeMap",
    "infer_types",
    "to_graph",
    "to_model",
]
