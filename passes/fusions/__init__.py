"""Fusion passes: one rewrite per file."""

from .conv_bn import FuseConvBatchNorm
from .matmul_add import FuseMatMulAdd

__all__ = ["FuseConvBatchNorm", "FuseMatMulAdd"]
