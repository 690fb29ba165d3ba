"""Preparation for integer (QDQ) targets.

``BoundInfiniteConstants``: exporters write attention masks as
``Where(mask, 0, -inf)``; a quantizer cannot give -inf a scale, and the QNN
HTP refuses the graph.  The scalar fill values of a Where that are +-inf get
+-``limit`` instead (default 100: added to attention scores before Softmax,
exp(-100) is below fp32's normal range, so the masked weights stay ~0; a
larger value would spend the quantized range of the masked scores on the
fill value).  The result is verified against the fp32 model like every
other change.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import const_dtype, const_nbytes, const_value, iter_graphs

_SMALL = 64  # bytes: masks' fill values are scalars


class BoundInfiniteConstants(Pass):
    name = "bound_infinite_constants"

    def __init__(self, limit: float = 100.0):
        self.limit = float(limit)

    def _fix(self, c: gs.Constant) -> bool:
        dt = const_dtype(c)
        if dt is None or dt.kind != "f" or const_nbytes(c) > _SMALL:
            return False
        v = const_value(c)
        if not np.isinf(v).any():
            return False
        c.values = np.where(np.isinf(v), np.sign(v) * self.limit, v).astype(v.dtype)
        return True

    def call(self, graph: gs.Graph) -> PassResult:
        fixed = 0
        seen: set[int] = set()
        for g in iter_graphs(graph):
            for node in g.nodes:
                if node.op != "Where":
                    continue
                cands = [t for t in node.inputs[1:] if isinstance(t, gs.Constant)]
                for c in cands:
                    if id(c) not in seen:
                        seen.add(id(c))
                        fixed += self._fix(c)
        return PassResult(bool(fixed), {"constants_bounded": fixed} if fixed else {})


class LowerMaskWhere(Pass):
    """``Where(c, 0, k)`` / ``Where(c, k, 0)`` with scalar float constants
    becomes ``Cast(Not c) * k`` / ``Cast(c) * k``: exact for every c (0 * k and
    1 * k are exact), and the QNN HTP (onnxruntime-qnn 2.7) fails to finalize
    a quantized Where, while Cast and Mul run there."""

    name = "lower_mask_where"

    def call(self, graph: gs.Graph) -> PassResult:
        from .graph import NameScope, is_standard

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
                from onnx import helper

                new_nodes.append(gs.Node("Cast", scope.fresh(f"{base}_Cast"), {"to": helper.np_dtype_to_tensor_dtype(k.dtype)},
                                         inputs=[cond], outputs=[as_float]))
                shape = va.shape if va.ndim >= vb.ndim else vb.shape  # Where broadcasts over all three
                kc = gs.Constant(scope.fresh(f"{base}_value"), np.asarray(k, dtype=k.dtype).reshape(shape))
                node.outputs.clear()
                node.inputs.clear()
                new_nodes.append(gs.Node("Mul", scope.fresh(f"{base}_Mul"), inputs=[as_float, kc], outputs=[out]))
                idx = next(i for i, n in enumerate(g.nodes) if n is node)
                g.nodes[idx:idx + 1] = new_nodes
                done += 1
        return PassResult(bool(done), {"where_lowered": done} if done else {})


class DropNanGuards(Pass):
    """``Where(IsNaN(s), k, s)`` becomes ``s``.  For integer (QDQ) targets
    only: a quantized tensor cannot hold NaN, so the guard is dead there (and
    the QNN HTP fails to finalize a quantized Where).  Exporters emit it after
    attention Softmax for rows that are masked entirely, which only happens
    with -inf masks (see ``BoundInfiniteConstants``)."""

    name = "drop_nan_guards"

    def call(self, graph: gs.Graph) -> PassResult:
        from .graph import bypass, is_standard, producer

        done = 0
        for g in iter_graphs(graph):
            for node in list(g.nodes):
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
