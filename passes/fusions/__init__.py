"""Fusion passes: one rewrite per file."""

from .conv_affine import FuseConvAffine
from .conv_bn import FuseConvBatchNorm
from .matmul_add import FuseMatMulAdd
from .transpose_gemm import FuseTransposedGemm

__all__ = ["FuseConvAffine", "FuseConvBatchNorm", "FuseMatMulAdd", "FuseTransposedGemm"]
