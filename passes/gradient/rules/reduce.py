"""Gradient rules: reductions (ReduceSum, ReduceMean).

Axes come from the attribute (ReduceMean before opset 18) or the constant
second input; the output gradient is unsqueezed back (keepdims=0) and
expanded to the input's run-time shape.
"""

from __future__ import annotations

import math

from ..context import GradientError
from .base import Rule

__all__ = ["RULES"]


def _axes(g, node) -> list[int] | None:
    """The reduced axes, non-negative and sorted; None for all axes."""
    x = node.inputs[0]
    if "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = g.ints_of(node.inputs[1], "the reduction axes")
    else:
        axes = []
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return []
        return None
    r = g.rank(x)
    if r is None:
        raise GradientError(f"{node.op} node {node.name!r}: input rank unknown")
    return sorted(a + r if a < 0 else a for a in axes)


def _spread(g, node, gy):
    """gy brought back to the input's shape (broadcast over the reduced axes)."""
    x = node.inputs[0]
    r = g.rank(x)
    if r is None:
        raise GradientError(f"{node.op} node {node.name!r}: input rank unknown")
    axes = _axes(g, node)
    if axes == []:
        return gy, axes
    keep = int(node.attrs.get("keepdims", 1))
    if not keep:
        gy = g.unsqueeze(gy, axes if axes is not None else list(range(r))) if r else gy
    return g.op("Expand", [gy, g.shape_of(x)]), axes


def _reduce_sum(g, node, gys):
    gx, _ = _spread(g, node, gys[0])
    return [gx, None]


def _reduce_mean(g, node, gys):
    x = node.inputs[0]
    gx, axes = _spread(g, node, gys[0])
    if axes == []:
        return [gx, None]
    s = g.shape(x)
    picked = range(len(s)) if axes is None else axes
    dims = [s[a] for a in picked]
    if all(isinstance(d, int) for d in dims):
        count = g.scalar(float(math.prod(dims)), x)
    else:
        n = g.op("Div", [g.op("Size", [x]), g.op("Size", [node.outputs[0]])])
        count = g.cast_like(n, x)
    return [g.div(gx, count), None]


RULES: dict[str, Rule] = {
    "ReduceSum": Rule(_reduce_sum, inputs=(0,)),
    "ReduceMean": Rule(_reduce_mean, inputs=(0,)),
}
