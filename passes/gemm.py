"""Gemm's rules, for the passes that write Gemm nodes (fusions, transposed-weight dedupe)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import const_shape, is_const

__all__ = ["GEMM_TYPES", "gemm_bias_ok"]

# Element types Gemm takes that the rewrites produce Gemm for.
GEMM_TYPES = (np.dtype(np.float32), np.dtype(np.float64))


def gemm_bias_ok(c: gs.Tensor, n: int | str | None) -> bool:
    """Whether ``c`` may be Gemm's C for an output of ``n`` columns: a constant
    that broadcasts unidirectionally to [M, N] (scalar, [1], [1, 1], [N], [1, N])."""
    if not is_const(c):
        return False
    shape = const_shape(c)
    if len(shape) == 0 or shape in ((1,), (1, 1)):
        return True
    return isinstance(n, int) and shape in ((n,), (1, n))
