"""A Transpose that only moves size-1 dims becomes a Reshape (for the npu target)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import is_standard
from .shapes import infer_types

__all__ = ["TransposeToReshape"]


class TransposeToReshape(Pass):
    """A Transpose that only moves size-1 dims (static input shape, the other dims
    keeping their order) is a Reshape: same elements in the same order.  For
    the npu target: QNN's layout handling aborts the process on such a Transpose
    after a Gather (a dynamo ConvNeXt's layer scale, [1, C, 1, 1] -> [1, 1, 1, C])."""

    name = "transpose_to_reshape"

    def call(self, graph: gs.Graph) -> PassResult:
        done = 0
        types = None
        for node in graph.nodes:  # the top graph: inference types it
            if node.op != "Transpose" or not is_standard(node) or len(node.inputs) != 1:
                continue
            if types is None:
                types = infer_types(graph)
            shape = types.static_shape(node.inputs[0])
            if shape:
                perm = node.attrs.get("perm") or list(range(len(shape)))[::-1]
                moved = [p for p in perm if shape[p] != 1]
                if moved != sorted(moved) or list(perm) == list(range(len(shape))):
                    continue
                target = np.array([shape[p] for p in perm], np.int64)
                node.op = "Reshape"
                node.attrs = {}
                node.inputs.append(gs.Constant(f"{node.name or node.outputs[0].name}_shape", target))
                done += 1
        return PassResult(bool(done), {"transposes_reshaped": done} if done else {})
