"""``Where(IsNaN(s), k, s)`` becomes ``s`` (for integer targets)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import bypass, const_value, is_standard, producer, walk_nodes

__all__ = ["DropNanGuards"]


class DropNanGuards(Pass):
    """``Where(IsNaN(s), k, s)`` becomes ``s``.  For integer (QDQ) targets
    only: a quantized tensor cannot hold NaN, so the guard is dead there (and
    the QNN HTP fails to finalize a quantized Where).  Exporters emit it after
    attention Softmax for rows that are masked entirely, which only happens
    with -inf masks (see ``BoundInfiniteConstants``)."""

    name = "drop_nan_guards"

    def call(self, graph: gs.Graph) -> PassResult:
        done = 0
        for g, node in walk_nodes(graph):
            if node.op != "Where" or not is_standard(node) or len(node.inputs) != 3:
                continue
            cond, _k, s = node.inputs
            p = producer(cond)
            if p is None or p.op != "IsNaN" or not p.inputs or p.inputs[0] is not s:
                continue
            if not isinstance(_k, gs.Constant) or const_value(_k).size != 1:
                continue  # a larger k could broadcast the output beyond s's shape
            if bypass(g, node, s, node.outputs[0]):
                done += 1
        return PassResult(bool(done), {"nan_guards_dropped": done} if done else {})
