"""Shape and Size of tensors whose dims inference proves static, and picks of
static dims from a Shape, folded to constants."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import const_value, is_const, is_standard, walk_nodes
from .shapes import TypeMap, infer_types, replace_with_constant, shape_slice

__all__ = ["FoldShapes"]


class FoldShapes(Pass):
    """Shape/Size of tensors whose (selected) dims inference proves static,
    and Gather/Slice of a Shape that pick only static dims, become constants.
    Dynamic dimensions are never replaced."""

    name = "fold_shapes"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        tm = infer_types(graph)
        stats = {"shape": 0, "size": 0, "shape_gather": 0, "shape_slice": 0}
        if tm.error:
            stats["inference_failed"] = 1
        for g, node in walk_nodes(graph):
            if not is_standard(node) or len(node.outputs) != 1 or not node.inputs:
                continue
            if node.op == "Shape":
                shape = tm.shape(node.inputs[0])
                if shape is None:
                    continue
                dims = [shape[i] for i in shape_slice(len(shape), node.attrs.get("start", 0), node.attrs.get("end"))]
                if all(isinstance(d, int) for d in dims):
                    replace_with_constant(g, node, node.outputs[0], np.array(dims, dtype=np.int64))
                    stats["shape"] += 1
            elif node.op == "Size":
                shape = tm.static_shape(node.inputs[0])
                if shape is not None:
                    replace_with_constant(g, node, node.outputs[0], np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64))
                    stats["size"] += 1
            elif node.op in ("Gather", "Slice"):
                key = self._fold_shape_pick(g, node, tm)
                if key:
                    stats[key] += 1
        return PassResult(any(stats[k] for k in ("shape", "size", "shape_gather", "shape_slice")), stats)

    @staticmethod
    def _fold_shape_pick(g: gs.Graph, node: gs.Node, tm: TypeMap) -> str | None:
        src = node.inputs[0]
        prod = src.inputs[0] if len(src.inputs) else None
        if prod is None or prod.op != "Shape" or not is_standard(prod) or not prod.inputs:
            return None
        shape = tm.shape(prod.inputs[0])
        if shape is None:
            return None
        dims = [shape[i] for i in shape_slice(len(shape), prod.attrs.get("start", 0), prod.attrs.get("end"))]
        idx = np.arange(len(dims))
        if node.op == "Gather":
            if len(node.inputs) != 2 or not is_const(node.inputs[1]) or node.attrs.get("axis", 0) != 0:
                return None
            ind = const_value(node.inputs[1]).astype(np.int64)
            if ind.size == 0 or ind.min() < -len(dims) or ind.max() >= len(dims):
                return None
            picked = idx[ind]
            key = "shape_gather"
        else:
            consts = node.inputs[1:]
            if len(consts) < 2 or not all(is_const(t) for t in consts if t.name):
                return None
            starts = const_value(consts[0]).astype(np.int64).ravel()
            ends = const_value(consts[1]).astype(np.int64).ravel()
            axes = const_value(consts[2]).ravel() if len(consts) > 2 and consts[2].name else np.array([0])
            steps = const_value(consts[3]).astype(np.int64).ravel() if len(consts) > 3 and consts[3].name else np.array([1])
            if starts.size != 1 or ends.size != 1 or axes.size != 1 or int(axes[0]) not in (0, -1) or steps.size != 1 or steps[0] != 1:
                return None
            picked = idx[int(starts[0]):int(np.clip(ends[0], -(2**62), 2**62))]
            key = "shape_slice"
        vals = np.asarray([dims[i] for i in np.ravel(picked)], dtype=object)
        if not all(isinstance(v, int) for v in vals):
            return None
        value = np.array(vals.tolist(), dtype=np.int64).reshape(np.shape(picked))
        replace_with_constant(g, node, node.outputs[0], value)
        return key
