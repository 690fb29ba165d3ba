"""Framework-agnostic ONNX graph passes (onnx, numpy, onnx-graphsurgeon, networkx only).

One pass per module, the module named after the pass (``fold_constants.py``:
``FoldConstants``, name ``fold_constants``); ``get_pass(name)`` finds any of
them by name (``registry``).
"""

from .add_layernorm_bias import AddLayerNormBias
from .add_layernorm_stat_outputs import AddLayerNormStatOutputs
from .base import ManagerReport, Pass, PassError, PassManager, PassRecord, PassResult
from .bound_infinite_constants import BoundInfiniteConstants
from .convert import Envelope, to_graph, to_model
from .dedupe_initializers import DedupeInitializers
from .dedupe_transposed_initializers import DedupeTransposedInitializers
from .drop_nan_guards import DropNanGuards
from .eliminate_common_subexpressions import EliminateCommonSubexpressions
from .eliminate_dead_code import EliminateDeadCode
from .eliminate_identity import EliminateIdentity
from .eliminate_neutral_elementwise import EliminateNeutralElementwise
from .eliminate_nop_ops import EliminateNopOps
from .eliminate_reshape_pairs import EliminateReshapePairs
from .eliminate_schema_typed_casts import EliminateSchemaTypedCasts
from .fix_input_shapes import FixInputShapes, ShapeError
from .fold_constants import FoldConstants
from .fold_shapes import FoldShapes
from .fusions import FuseConvAffine, FuseConvBatchNorm, FuseMatMulAdd, FuseTransposedGemm
from .inline_constant_if import InlineConstantIf
from .lower_mask_where import LowerMaskWhere
from .merge_unsqueeze import MergeUnsqueeze
from .registry import get_pass, pass_names
from .remove_redundant_casts import RemoveRedundantCasts
from .shapes import TypeMap, infer_types
from .simplify_shape_reshapes import SimplifyShapeReshapes
from .transpose_to_reshape import TransposeToReshape
from .untie_layernorm_params import UntieLayerNormParams
from .upcast_float16 import UpcastFloat16

__all__ = [
    "AddLayerNormBias",
    "AddLayerNormStatOutputs",
    "BoundInfiniteConstants",
    "DedupeInitializers",
    "DedupeTransposedInitializers",
    "DropNanGuards",
    "EliminateCommonSubexpressions",
    "EliminateDeadCode",
    "EliminateIdentity",
    "EliminateNeutralElementwise",
    "EliminateNopOps",
    "EliminateReshapePairs",
    "EliminateSchemaTypedCasts",
    "Envelope",
    "FixInputShapes",
    "FoldConstants",
    "FoldShapes",
    "FuseConvAffine",
    "FuseConvBatchNorm",
    "FuseMatMulAdd",
    "FuseTransposedGemm",
    "InlineConstantIf",
    "LowerMaskWhere",
    "ManagerReport",
    "MergeUnsqueeze",
    "Pass",
    "PassError",
    "PassManager",
    "PassRecord",
    "PassResult",
    "RemoveRedundantCasts",
    "ShapeError",
    "SimplifyShapeReshapes",
    "TransposeToReshape",
    "TypeMap",
    "UntieLayerNormParams",
    "UpcastFloat16",
    "get_pass",
    "infer_types",
    "pass_names",
    "to_graph",
    "to_model",
]
