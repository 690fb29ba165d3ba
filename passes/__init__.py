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
from .neutral_elementwise import EliminateNeutralElementwise
from .merge_unsqueeze import MergeUnsqueeze
from .reshape_pairs import EliminateReshapePairs
from .schema_casts import EliminateSchemaTypedCasts
from .shape_reshape import SimplifyShapeReshapes
from .shapes import FoldShapes, TypeMap, infer_types
from .training_legalize import AddLayerNormBias, AddLayerNormStatOutputs, UntieLayerNormParams

__all__ = [
    "AddLayerNormBias",
    "AddLayerNormStatOutputs",
    "DedupeInitializers",
    "EliminateCommonSubexpressions",
    "EliminateDeadCode",
    "EliminateIdentity",
    "EliminateNopOps",
    "EliminateReshapePairs",
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
    "SimplifyShapeReshapes",
    "TypeMap",
    "UntieLayerNormParams",
    "infer_types",
    "to_graph",
    "to_model",
]
