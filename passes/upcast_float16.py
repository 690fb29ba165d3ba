"""An fp16 model computed in fp32 inside, its fp16 graph inputs and outputs kept (for the npu target)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, const_value, iter_graphs, replace_uses

__all__ = ["UpcastFloat16"]


def _is_cast(node: gs.Node, to: int) -> bool:
    return node.op == "Cast" and node.attrs.get("to") == to


def _swap(tensors, old, new) -> None:
    for j, t in enumerate(tensors):
        if t is old:
            tensors[j] = new


class UpcastFloat16(Pass):
    """An fp16 model becomes fp32 inside (weights, Casts to fp16, Constant and
    ConstantOfShape values, tensor types), its fp16 graph inputs and outputs
    kept through a Cast at each edge.  For the npu target, which quantizes from
    fp32: onnxruntime's quantizer gives an fp16 model fp16 scales, which
    DequantizeLinear takes only from opset 19 (and the HTP not at all).
    Exact: every fp16 value is an fp32 value; an op computed in fp32 instead of
    fp16 rounds less, which the verification against the fp16 original measures."""

    name = "upcast_float16"

    def call(self, graph: gs.Graph) -> PassResult:
        changed = 0
        for g in iter_graphs(graph):
            kept = {id(t) for t in g.inputs} | ({id(t) for t in g.outputs} if g is graph else set())
            for t in g.tensors().values():
                if t.dtype != np.float16:
                    continue
                if isinstance(t, gs.Constant):
                    t.values = np.asarray(const_value(t), dtype=np.float32)
                    changed += 1
                elif id(t) not in kept:
                    t.dtype = np.float32
            edge = {id(t) for t in graph.outputs} if g is graph else set()
            for node in g.nodes:
                if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT16 \
                        and not any(id(t) in edge for t in node.outputs):  # the casts back at the outputs stay
                    node.attrs["to"] = onnx.TensorProto.FLOAT
                    changed += 1
                for key, value in list(node.attrs.items()):
                    if isinstance(value, gs.Constant) and value.dtype == np.float16:
                        node.attrs[key] = gs.Constant(value.name, np.asarray(const_value(value), np.float32))
                        changed += 1
        names = None
        edges = 0
        for x in graph.inputs:
            if x.dtype != np.float16 or all(_is_cast(n, onnx.TensorProto.FLOAT) for n in x.outputs):
                continue
            names = names or NameScope(graph)
            x32 = gs.Variable(names.fresh(f"{x.name}_fp32"), np.float32, x.shape)
            replace_uses(x, x32)
            graph.nodes.insert(0, gs.Node("Cast", names.fresh(f"{x.name}_to_fp32"), {"to": onnx.TensorProto.FLOAT},
                                          [x], [x32]))
            edges += 1
        for y in graph.outputs:
            if y.dtype != np.float16 or any(_is_cast(n, onnx.TensorProto.FLOAT16) for n in y.inputs):
                continue
            names = names or NameScope(graph)
            y32 = gs.Variable(names.fresh(f"{y.name}_fp32"), np.float32, y.shape)
            for producer in list(y.inputs):
                _swap(producer.outputs, y, y32)
            replace_uses(y, y32)
            graph.nodes.append(gs.Node("Cast", names.fresh(f"{y.name}_to_fp16"), {"to": onnx.TensorProto.FLOAT16},
                                       [y32], [y]))
            edges += 1
        if not changed and not edges:
            return PassResult(False)
        return PassResult(True, {"fp16_values_upcast": changed, "edge_casts": edges})
