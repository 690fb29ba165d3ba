"""Elementwise ops with a neutral constant operand: x + 0, 0 + x, x - 0,
x * 1, 1 * x, x / 1, x ** 1, x and True, x or False become x.

Exporters write these wherever a bias or scale happens to be neutral: a
freshly initialized transformer's Linear and LayerNorm biases are zeros, and
an exporter's "linear" is MatMul + Add whatever the bias holds.  Removed only
where the result is x itself: the constant holds the neutral value in every
element, and broadcasting it cannot change x's shape (every constant dim is 1
or equals x's static dim, and its rank is at most x's); same element type.
The only bit that can differ is the sign of a zero (-0 + 0 = +0), which
compares equal.  Integer and float types for the arithmetic ops, bool for And/Or.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import (
    NodeIndex,
    const_dtype,
    const_shape,
    const_value,
    is_const,
    is_standard,
    iter_graphs,
)
from .shapes import TypeMap, infer_types
from .tensors import const_nbytes

__all__ = ["EliminateNeutralElementwise"]

# op -> (neutral value, operand slots the constant may occupy)
_NEUTRAL = {
    "Add": (0, (0, 1)),
    "Sub": (0, (1,)),
    "Mul": (1, (0, 1)),
    "Div": (1, (1,)),
    "Pow": (1, (1,)),
    "And": (True, (0, 1)),
    "Or": (False, (0, 1)),
}
_KINDS = {"And": "b", "Or": "b"}  # the others: integer and float types
_MAX_CHECK_BYTES = 1 << 26  # a constant larger than this is not read to find out


def _shape_kept(x_shape, c_shape) -> bool:
    if len(c_shape) > len(x_shape):
        return False
    for xd, cd in zip(reversed(x_shape), reversed(c_shape)):
        if cd != 1 and not (isinstance(xd, int) and xd == cd):
            return False
    return True


class EliminateNeutralElementwise(Pass):
    name = "eliminate_neutral_elementwise"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        tm: TypeMap | None = None
        stats: dict[str, int] = {}
        for g in iter_graphs(graph):
            alive = NodeIndex(g)
            for node in list(g.nodes):
                rule = _NEUTRAL.get(node.op)
                if rule is None or not is_standard(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
                    continue
                if node not in alive:
                    continue
                neutral, slots = rule
                for slot in slots:
                    c, x = node.inputs[slot], node.inputs[1 - slot]
                    if not is_const(c) or is_const(x) or not x.name or const_nbytes(c) > _MAX_CHECK_BYTES:
                        continue
                    dt = const_dtype(c)
                    if dt is None or dt.kind not in _KINDS.get(node.op, "fiu"):
                        continue
                    if node.op == "Pow" and dt.kind != "f":  # integer Pow: keep it simple
                        continue
                    v = const_value(c)
                    if v.size == 0 or not np.all(v == neutral):
                        continue
                    tm = tm or infer_types(graph)  # only once a candidate is found
                    xs = tm.shape(x)
                    if xs is None or tm.dtype(x) != dt or not _shape_kept(xs, const_shape(c)):
                        continue
                    if alive.bypass(node, x, node.outputs[0]):
                        stats[node.op] = stats.get(node.op, 0) + 1
                        break
        # x op neutral == x, same element type and shape (checked above): readers read a tensor of that type
        return PassResult(bool(stats), stats, types_kept=True)
