"""What ONNX Runtime training 1.19.2 can differentiate.

Sources (read for this module, not copied):

- op list: ``orttraining/orttraining/core/graph/gradient_builder_registry.cc``
  of microsoft/onnxruntime (the versioned ``REGISTER_GRADIENT_BUILDER(op,
  start, end, builder)`` form), cross-checked against the builder classes
  compiled into the onnxruntime-training-cpu 1.19.2 wheel (the ``Register<...>``
  instantiations named in ``onnxruntime_pybind11_state*.so``: 81 builders) and
  by generating artifacts for one-op models with that wheel (Floor, Round,
  Sign, Elu, Softplus, HardSigmoid, ReduceMax/Min/Prod, Sum, Mean, PRelu, Mod,
  CumSum, Einsum, InstanceNormalization, GlobalMaxPool fail with "The gradient
  builder has not been registered"; every default-domain op listed below that
  was tried passed).
- which edges carry no gradient: ``STOP_GRADIENT_EDGES`` and
  ``GRAD_ALLOWED_TYPES`` in ``orttraining/orttraining/core/framework/
  gradient_graph_builder.{h,cc}``: the builder walks back from the loss and
  forward from the trainable initializers, skipping the listed input slots and
  every edge whose tensor is not float/float16/double/bfloat16, and asks for a
  gradient builder only for the nodes on both walks.

ORT looks builders up by op type alone (any domain); the names below are
domain-qualified where the op lives outside the default domain.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

MS = "com.microsoft"

# Default-domain ops with a gradient builder.
_ONNX_OPS = """
Abs Add AveragePool BatchNormalization Cast Clip Concat Conv ConvTranspose Cos Div Dropout Erf Exp Expand
Flatten Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Identity LayerNormalization LeakyRelu Log
LogSoftmax MatMul Max MaxPool Min Mul Neg Pad Pow Reciprocal ReduceL2 ReduceLogSumExp ReduceMean ReduceSum Relu
Reshape Resize ScatterElements ScatterND Sigmoid Sin Slice Softmax SoftmaxCrossEntropyLoss Split Sqrt Squeeze Sub
Tanh Tile TopK Transpose Trilu Unsqueeze Where
""".split()

# com.microsoft ops with a gradient builder (contrib and training ops).
_MS_OPS = """
BatchNormInternal BiasGelu ConcatTraining FakeQuant FastGelu FlattenAndUnpad GRUTraining Gelu LSTMTraining
LayerNormalization MatMulBnb4 MegatronF MegatronG PadAndUnflatten PythonOp QuickGelu Recv ScaledSum Send
ShrunkenGather SimplifiedLayerNormalization SoftmaxCrossEntropy SoftmaxCrossEntropyLossInternal
SparseSoftmaxCrossEntropy
""".split()

GRADIENT_OPS: frozenset[str] = frozenset(_ONNX_OPS) | frozenset(f"{MS}:{op}" for op in _MS_OPS)

# Ops registered only from an opset on (``REGISTER_GRADIENT_BUILDER("Slice", 10, INF, ...)``):
# Slice-1 keeps starts/ends in attributes and SliceGrad cannot take it.
MIN_OPSET: dict[str, int] = {"Slice": 10}


def unsupported_form(node: onnx.NodeProto) -> str | None:
    """Why ORT's builder for this (registered) op cannot take this node's
    form, or None.  Found by generating artifacts with the 1.19.2 wheel."""
    attrs = {a.name: a for a in node.attribute}
    named_out = [x for x in node.output if x]
    if node.op_type == "Transpose" and "perm" not in attrs:
        return "Transpose without 'perm': ORT's builder reads the attribute (unordered_map::at)"
    if node.op_type == "Pad" and "mode" in attrs and attrs["mode"].s not in (b"", b"constant"):
        return f"Pad mode {attrs['mode'].s.decode(errors='replace')!r}: ORT's builder takes constant mode only"
    if node.op_type == "SoftmaxCrossEntropyLoss" and len(named_out) < 2:
        return "SoftmaxCrossEntropyLoss without its log_prob output: ORT's builder reads it"
    if node.op_type == "LayerNormalization" and (len(node.input) < 3 or not node.input[2] or len(named_out) < 3):
        return (
            "LayerNormalization without bias or Mean/InvStdDev outputs: ORT's builder needs all three "
            "(the pre-flight adds them unless the scale is computed)"
        )
    return None


# Input slots that never carry a gradient (integer, boolean or index operands).
STOP_GRADIENT_EDGES: dict[str, frozenset[int]] = {
    op: frozenset(slots)
    for op, slots in {
        "Not": (0,),
        "And": (0, 1),
        "Or": (0, 1),
        "Xor": (0, 1),
        "Equal": (0, 1),
        "Less": (0, 1),
        "LessOrEqual": (0, 1),
        "Greater": (0, 1),
        "GreaterOrEqual": (0, 1),
        "IsInf": (0,),
        "IsNaN": (0,),
        "NonZero": (0,),
        "BatchNormalization": (3, 4),
        "BatchNormInternal": (3, 4),
        "Pow": (1,),  # ORT: "Pow's input_1 is differentiable, but gradient not yet implemented"
        "Gather": (1,),
        "GatherElements": (1,),
        "GatherND": (1,),
        "Shape": (0,),
        "Size": (0,),
        "Reshape": (1,),
        "Expand": (1,),
        "Dropout": (1, 2),
        "Slice": (1, 2, 3, 4),
        "SparseSoftmaxCrossEntropy": (1, 2),
        "SoftmaxCrossEntropyLoss": (1, 2),
        "SoftmaxCrossEntropyLossInternal": (1, 2, 3),
        "ConstantOfShape": (0,),
        "Scatter": (1,),
        "ScatterElements": (1,),
        "ScatterND": (1,),
        "OneHot": (0, 1, 2),
        "Where": (0,),
        "Range": (0, 1, 2),
        "Tile": (1,),
        "TopK": (1,),
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "ReduceSum": (1,),
        "Split": (1,),
        "Clip": (1, 2),
    }.items()
}

# Element types a gradient flows through (GRAD_ALLOWED_TYPES).
GRAD_TYPES: frozenset[int] = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)

# Ops none of whose outputs is ever differentiable: they only carry shapes,
# indices, masks or integers.  With element types known, the type rule above
# already excludes them; this list decides when inference left a type unknown.
NON_DIFFERENTIABLE_OPS: frozenset[str] = frozenset(
    """
    Shape Size ConstantOfShape Range NonZero ArgMax ArgMin Equal Less LessOrEqual Greater GreaterOrEqual Not And Or
    Xor IsInf IsNaN BitShift BitwiseAnd BitwiseOr BitwiseXor BitwiseNot OneHot EyeLike RandomNormal RandomUniform
    RandomNormalLike RandomUniformLike Multinomial Bernoulli StringNormalizer
    """.split()
)


def qualified(op_type: str, domain: str) -> str:
    """``Add`` for the default domain, ``com.microsoft:FastGelu`` otherwise."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}:{op_type}"


def has_gradient(op_type: str, domain: str, opset: int | None = None) -> bool:
    """Whether ORT training 1.19.2 registers a gradient builder for this op
    (at ``opset``, the model's import of the op's domain, when given)."""
    if qualified(op_type, domain) not in GRADIENT_OPS:
        return False
    if domain in ("", "ai.onnx") and opset is not None and opset < MIN_OPSET.get(op_type, 0):
        return False
    return True
