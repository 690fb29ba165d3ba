"""cpu: fp32 graph cleanup and folding; no lowering step."""

from __future__ import annotations

from ..verify import DEFAULT_ATOL, DEFAULT_RTOL
from .profile import TargetProfile

# The fp32 pipeline every target starts from (by pass name, in order).
CPU_PASSES = (
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

PROFILE = TargetProfile(
    name="cpu",
    description="fp32 graph cleanup and folding, verified on ONNX Runtime's CPU provider",
    passes=CPU_PASSES,
    rtol=DEFAULT_RTOL,
    atol=DEFAULT_ATOL,
    providers=("CPUExecutionProvider",),
)
