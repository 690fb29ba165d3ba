"""Fusion passes: one rewrite per file."""

from .fuse_conv_affine import FuseConvAffine
from .fuse_conv_batchnorm import FuseConvBatchNorm
from .fuse_matmul_add import FuseMatMulAdd
from .fuse_transposed_gemm import FuseTransposedGemm

__all__ = ["FuseConvAffine", "FuseConvBatchNorm", "FuseMatMulAdd", "FuseTransposedGemm"]
