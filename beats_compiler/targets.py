"""Target profiles (plain data) and the one place each target's pipeline is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from passes import (
    DedupeInitializers,
    EliminateCommonSubexpressions,
    EliminateDeadCode,
    EliminateIdentity,
    EliminateNopOps,
    FoldConstants,
    FoldShapes,
    FuseConvBatchNorm,
    FuseMatMulAdd,
    InlineConstantIf,
    Pass,
)

from passes.fp16 import RemoveRedundantCasts
from passes.fusions import FuseConvAffine, FuseTransposedGemm
from passes.merge_unsqueeze import MergeUnsqueeze
from passes.neutral_elementwise import EliminateNeutralElementwise
from passes.schema_casts import EliminateSchemaTypedCasts
from passes.shape_reshape import SimplifyShapeReshapes
from passes.reshape_pairs import EliminateReshapePairs
from passes.npu_prep import BoundInfiniteConstants, DropNanGuards, LowerMaskWhere, TransposeToReshape, UpcastFloat16
from passes.static_shapes import FixInputShapes
from passes.transposed_duplicates import DedupeTransposedInitializers

from .errors import InputError
from .verify import DEFAULT_ATOL, DEFAULT_RTOL

MiB = 1 << 20


@dataclass(frozen=True)
class PipelineOptions:
    """Knobs shared by every target's passes."""

    fold_size_limit: int = 4 * MiB  # most bytes a constant fold may add to the model
    fold_max_tensor: int = 1 << 30  # largest tensor a fold may create at all
    fold_memory_limit: int = 1 << 30  # most bytes all folds of one compile may allocate together
    input_shapes: tuple = ()  # ((input name, (dims...)), ...): npu's static shapes
    protected_casts: frozenset = frozenset()  # Casts the model had before fp16 conversion
    drop_new_lossy_casts: bool = False  # gpu after conversion: fp32->fp16->fp32 pairs of new Casts go


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    passes: tuple[str, ...]
    rtol: float
    atol: float
    providers: tuple[str, ...]
    # What the target does after the fp32 pipeline: "none", "fp16" (beats_compiler.gpu)
    # or "qdq" (beats_compiler.npu); ``post_passes`` clean up after it.
    convert: str = "none"
    post_passes: tuple[str, ...] = ()
    dtype_policy: str = "fp32 everywhere"
    static_shapes: bool = False  # every input dim fixed before the passes run
    # Ops the target's provider takes (None: every standard op).  See beats_compiler.legality.
    legal_ops: frozenset | None = None
    legal_dtypes: frozenset | None = None  # element types of node inputs/outputs it takes
    fp32_ops: tuple[str, ...] = ()  # fp16: ops kept in fp32 (the block list, user-extendable)
    # How the result is verified: "allclose" (rtol/atol on every output) or
    # "accuracy" (cosine similarity and top-1 agreement on held-out inputs).
    verify_metric: str = "allclose"
    verify_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    min_cosine: float | None = None
    min_top1: float | None = None


PASSES: dict[str, Callable[[PipelineOptions], Pass]] = {
    "inline_constant_if": lambda o: InlineConstantIf(),
    "eliminate_identity": lambda o: EliminateIdentity(),
    "fold_constants": lambda o: FoldConstants(max_output_bytes=min(o.fold_max_tensor, o.fold_memory_limit),
                                              max_growth_bytes=o.fold_size_limit, max_total_bytes=o.fold_memory_limit),
    "fold_shapes": lambda o: FoldShapes(),
    "simplify_shape_reshapes": lambda o: SimplifyShapeReshapes(),
    "eliminate_reshape_pairs": lambda o: EliminateReshapePairs(),
    "eliminate_nop_ops": lambda o: EliminateNopOps(),
    "dedupe_initializers": lambda o: DedupeInitializers(),
    "dedupe_transposed_initializers": lambda o: DedupeTransposedInitializers(),
    "eliminate_common_subexpressions": lambda o: EliminateCommonSubexpressions(),
    "fuse_conv_batchnorm": lambda o: FuseConvBatchNorm(),
    "fuse_matmul_add": lambda o: FuseMatMulAdd(),
    "fuse_transposed_gemm": lambda o: FuseTransposedGemm(),
    "fuse_conv_affine": lambda o: FuseConvAffine(),
    "eliminate_neutral_elementwise": lambda o: EliminateNeutralElementwise(),
    "merge_unsqueeze": lambda o: MergeUnsqueeze(),
    "eliminate_schema_typed_casts": lambda o: EliminateSchemaTypedCasts(),
    "eliminate_dead_code": lambda o: EliminateDeadCode(),
    "fix_input_shapes": lambda o: FixInputShapes(dict(o.input_shapes)),
    "bound_infinite_constants": lambda o: BoundInfiniteConstants(),
    "upcast_float16": lambda o: UpcastFloat16(),
    "transpose_to_reshape": lambda o: TransposeToReshape(),
    "lower_mask_where": lambda o: LowerMaskWhere(),
    "drop_nan_guards": lambda o: DropNanGuards(),
    "remove_redundant_casts": lambda o: RemoveRedundantCasts(o.protected_casts, allow_precision_gain=o.drop_new_lossy_casts),
}

_CPU_PASSES = (
    "inline_constant_if",
    "eliminate_identity",
    "fuse_transposed_gemm",  # before fold_constants: no transposed copy of the weight
    "fold_constants",
    "fold_shapes",
    "simplify_shape_reshapes",
    "eliminate_reshape_pairs",
    "eliminate_nop_ops",
    "eliminate_neutral_elementwise",
    "merge_unsqueeze",
    "eliminate_schema_typed_casts",
    "fuse_conv_batchnorm",  # before dedupe/CSE: merged twin Convs with their own BNs could not fuse
    "fuse_conv_affine",
    "dedupe_initializers",
    "dedupe_transposed_initializers",
    "eliminate_common_subexpressions",
    "fuse_matmul_add",
    "eliminate_dead_code",
)

TARGETS: dict[str, TargetProfile] = {
    "cpu": TargetProfile(
        name="cpu",
        description="fp32 graph cleanup and folding, verified on ONNX Runtime's CPU provider",
        passes=_CPU_PASSES,
        rtol=DEFAULT_RTOL,
        atol=DEFAULT_ATOL,
        providers=("CPUExecutionProvider",),
    ),
}


# Precision-sensitive ops kept in fp32 by the gpu target: reductions and
# normalizations whose sums overflow or lose precision in fp16, exponentials and
# logs, and onnxruntime's own list of ops without fp16 kernels (or whose fp16
# results differ: TopK/ArgMax ties, Range, CumSum ...).  Extend with --fp32-ops.
FP16_BLOCK_LIST = (
    # onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST (ops without fp16 kernels)
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier",
    "TreeEnsembleRegressor", "TreeEnsemble", "ZipMap", "NonMaxSuppression", "TopK", "RoiAlign", "Range",
    "CumSum", "Min", "Max", "Upsample",
    # precision: long sums, exp/log, variance
    "ReduceSum", "ReduceMean", "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare", "ReduceL2",
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Erf",
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization",
    # recurrent ops: no fp16 kernels in ONNX Runtime's CPU provider, where the gpu target verifies
    "LSTM", "GRU", "RNN",
    # already quantized models: their scales stay fp32 (an fp16 scale needs opset 19)
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
)

# ONNX ops the QNN execution provider lists as supported (onnxruntime-qnn 2.7
# docs, "Supported ONNX operators"); the HTP backend's real verdict per node
# comes from a QNN session (beats_compiler.npu), this list is the static check.
QNN_OPS = frozenset(
    "Abs Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat Conv "
    "ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Exp Expand Flatten Floor "
    "Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual "
    "GridSample GroupNormalization HardSigmoid HardSwish Identity InstanceNormalization Inverse IsNaN LRN LSTM "
    "LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization MatMul Max MaxPool Mean Min "
    "Mod Mul Neg NonZero Not Or PRelu Pad Pow QuantizeLinear RandomNormalLike RandomUniformLike Reciprocal "
    "ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu RMSNormalization Reshape Resize RoiAlign "
    "Round RotaryEmbedding STFT ScatterElements ScatterND Sigmoid Sign Sin Slice Softmax Softplus SpaceToDepth "
    "Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Unsqueeze Upsample Where "
    "Shape GRU IsInf LpPool OneHot Selu Xor".split()
)
QNN_DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "bool"})

_GPU_POST = ("remove_redundant_casts", "eliminate_common_subexpressions", "eliminate_dead_code")

TARGETS["gpu"] = TargetProfile(
    name="gpu",
    description="fp16 weights and activations (I/O types kept, precision-sensitive ops in fp32), for CUDA",
    passes=_CPU_PASSES,
    rtol=2e-2,
    atol=2e-3,
    providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    convert="fp16",
    post_passes=_GPU_POST,
    dtype_policy="fp16 compute; model inputs/outputs keep their types; FP16_BLOCK_LIST ops in fp32",
    legal_dtypes=frozenset({"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32",
                            "int64", "bool"}),
    fp32_ops=FP16_BLOCK_LIST,
    verify_metric="allclose",
)
TARGETS["npu"] = TargetProfile(
    name="npu",
    description="static shapes, QDQ int8/uint8 (uint16 activations optional) or fp16, for Qualcomm's QNN HTP",
    passes=("fix_input_shapes", "upcast_float16", "bound_infinite_constants", "lower_mask_where", "drop_nan_guards") + _CPU_PASSES
    + ("transpose_to_reshape",),
    rtol=0.0,
    atol=0.0,
    providers=("QNNExecutionProvider", "CPUExecutionProvider"),
    convert="qdq",
    dtype_policy="uint8 activations (or uint16), uint8/int8 weights, int32 biases; fp32 I/O with Q/DQ at the edges; "
                 "or (--activation-type float16) no quantization, the HTP computing in fp16",
    static_shapes=True,
    legal_ops=QNN_OPS,
    legal_dtypes=QNN_DTYPES,
    verify_metric="accuracy",
    verify_providers=("QNNExecutionProvider",),
    min_cosine=0.99,
    min_top1=None,  # reported; a threshold only where the user asks (--min-top1)
)


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise InputError(f"unknown target {name!r}; available: {', '.join(TARGETS)}") from None


def check_disabled(profile: TargetProfile, disable) -> frozenset[str]:
    """The pass names to skip, each one a pass this target runs (its pipeline or its
    post-conversion passes); an unknown name is bad input naming the target's passes."""
    names = frozenset(disable or ())
    runs = list(dict.fromkeys(profile.passes + profile.post_passes))
    unknown = sorted(names - set(runs))
    if unknown:
        owners = sorted({t for n in unknown for t, prof in TARGETS.items() if n in prof.passes + prof.post_passes})
        where = f" (a pass of target {'/'.join(owners)})" if owners else ""
        raise InputError(f"--disable-pass {', '.join(unknown)}: not a pass of target {profile.name}{where}; "
                         f"`beats-compile --help` lists the passes")
    return names


def build_passes(profile: TargetProfile, options: PipelineOptions, *, post: bool = False) -> list[Pass]:
    return [PASSES[name](options) for name in (profile.post_passes if post else profile.passes)]
