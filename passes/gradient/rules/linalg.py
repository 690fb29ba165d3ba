"""Gradient rules: MatMul and Gemm.

MatMul follows numpy: rank-1 operands are promoted (and the promotion
undone), batch dims broadcast.  The common transformer case, a rank >= 3
activation times a 2-D weight, gets the weight gradient as one 2-D Gemm over
the flattened rows (no batched product, no reduction afterwards).
"""

from __future__ import annotations

from .base import Rule

__all__ = ["RULES"]


def _swap_last(g, t, rank):
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return g.transpose(t, perm)


def _matmul(g, node, gys):
    a, b = node.inputs[:2]
    y = node.outputs[0]
    gy = gys[0]
    sa, sb, sy = g.shape(a), g.shape(b), g.shape(y)
    if sa is None or sb is None or sy is None:
        from ..context import GradientError

        raise GradientError(f"MatMul node {node.name!r}: operand ranks unknown")
    ra, rb = len(sa), len(sb)
    da = db = None
    if ra >= 2 and rb == 2:
        # Weight-style: y [..., M, N] = a [..., M, K] @ b [K, N].
        if g.needs(0):
            da = g.op("MatMul", [gy, g.transpose(b, [1, 0])])
        if g.needs(1):
            if ra == 2:
                db = g.op("Gemm", [a, gy], {"transA": 1})
            else:
                a2 = g.reshape(a, g.op("Concat", [g.ints([-1]), g.dim_of(a, ra - 1)], {"axis": 0}))
                g2 = g.reshape(gy, g.op("Concat", [g.ints([-1]), g.dim_of(b, 1)], {"axis": 0}))
                db = g.op("Gemm", [a2, g2], {"transA": 1})
        return [da, db]
    # General form: promote rank-1 operands to matrices.
    A, B, G = a, b, gy
    if ra == 1 and rb == 1:
        A, B, G = g.unsqueeze(a, [0]), g.unsqueeze(b, [1]), g.reshape(gy, g.ints([1, 1]))
    elif ra == 1:
        A, G = g.unsqueeze(a, [0]), g.unsqueeze(gy, [-2])
    elif rb == 1:
        B, G = g.unsqueeze(b, [1]), g.unsqueeze(gy, [-1])
    rA, rB = max(ra, 2), max(rb, 2)
    batch = tuple(sy[: len(sy) - (ra >= 2) - (rb >= 2)]) if len(sy) >= 1 else ()
    m = sa[-2] if ra >= 2 else 1
    k = sa[-1]
    n = sb[-1] if rb >= 2 else 1
    if g.needs(0):
        full = g.op("MatMul", [G, _swap_last(g, B, rB)])  # [batch..., M, K]
        if ra >= 2:
            da = g.sum_to(full, a, shape=batch + (m, k))
        else:  # [batch..., 1, K] -> [K]
            da = g.reduce_sum(full, list(range(len(batch) + 1)), keepdims=False)
    if g.needs(1):
        full = g.op("MatMul", [_swap_last(g, A, rA), G])  # [batch..., K, N]
        if rb >= 2:
            db = g.sum_to(full, b, shape=batch + (k, n))
        else:  # [batch..., K, 1] -> [K]
            db = g.reshape(g.reduce_sum(full, list(range(len(batch))), keepdims=False) if batch else full,
                           g.shape_of(b))
    return [da, db]


def _gemm(g, node, gys):
    a, b = node.inputs[:2]
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    gy = gys[0]
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    da = db = dc = None
    if g.needs(0):
        if not ta:
            da = g.op("Gemm", [gy, b], {"transB": 0 if tb else 1, "alpha": alpha})
        else:
            da = g.op("Gemm", [b, gy], {"transA": tb, "transB": 1, "alpha": alpha})
    if g.needs(1):
        if not tb:
            db = g.op("Gemm", [a, gy], {"transA": 0 if ta else 1, "alpha": alpha})
        else:
            db = g.op("Gemm", [gy, a], {"transA": 1, "transB": ta, "alpha": alpha})
    if c is not None and g.needs(2):
        scaled = gy if beta == 1.0 else g.mul(gy, g.scalar(beta, node.outputs[0]))
        dc = g.sum_to(scaled, c)
    return [da, db, dc]


RULES: dict[str, Rule] = {
    "MatMul": Rule(_matmul),
    "Gemm": Rule(_gemm),
}
