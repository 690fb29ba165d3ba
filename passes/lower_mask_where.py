"""``Where(c, 0, k)`` / ``Where(c, k, 0)`` with scalar float constants becomes
``Cast(Not c) * k`` / ``Cast(c) * k`` (for the npu target)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from .base import Pass, PassResult
from .graph import NameScope, const_value, index_of, is_standard, iter_graphs

__all__ = ["LowerMaskWhere"]


class LowerMaskWhere(Pass):
    """``Where(c, 0, k)`` / ``Where(c, k, 0)`` with scalar float constants
    becomes ``Cast(Not c) * k`` / ``Cast(c) * k``: exact for every c (0 * k and
    1 * k are exact), and the QNN HTP (onnxruntime-qnn 2.7) fails to finalize
    a quantized Where, while Cast and Mul run there."""

    name = "lower_mask_where"

    def call(self, graph: gs.Graph) -> PassResult:
        done = 0
        for g in iter_graphs(graph):
            scope = None
            for node in list(g.nodes):
                if node.op != "Where" or not is_standard(node) or len(node.inputs) != 3:
                    continue
                c, a, b = node.inputs
                if not all(isinstance(t, gs.Constant) for t in (a, b)):
                    continue
                va, vb = const_value(a), const_value(b)
                if va.size != 1 or vb.size != 1 or va.dtype.kind != "f" or va.dtype != vb.dtype:
                    continue
                if float(va.ravel()[0]) == 0.0 and not np.signbit(va.ravel()[0]):
                    k, use_not = vb, True
                elif float(vb.ravel()[0]) == 0.0 and not np.signbit(vb.ravel()[0]):
                    k, use_not = va, False
                else:
                    continue
                if not np.isfinite(k).all():
                    continue
                if scope is None:
                    scope = NameScope(g)
                out = node.outputs[0]
                base = node.name or "where"
                cond = c
                new_nodes = []
                if use_not:
                    cond = gs.Variable(scope.fresh(f"{base}_not"), dtype=np.bool_)
                    new_nodes.append(gs.Node("Not", scope.fresh(f"{base}_Not"), inputs=[c], outputs=[cond]))
                as_float = gs.Variable(scope.fresh(f"{base}_float"), dtype=k.dtype)
                new_nodes.append(gs.Node("Cast", scope.fresh(f"{base}_Cast"), {"to": helper.np_dtype_to_tensor_dtype(k.dtype)},
                                         inputs=[cond], outputs=[as_float]))
                shape = va.shape if va.ndim >= vb.ndim else vb.shape  # Where broadcasts over all three
                kc = gs.Constant(scope.fresh(f"{base}_value"), np.asarray(k, dtype=k.dtype).reshape(shape))
                node.outputs.clear()
                node.inputs.clear()
                new_nodes.append(gs.Node("Mul", scope.fresh(f"{base}_Mul"), inputs=[as_float, kc], outputs=[out]))
                idx = index_of(g, node)
                g.nodes[idx:idx + 1] = new_nodes
                done += 1
        return PassResult(bool(done), {"where_lowered": done} if done else {})
