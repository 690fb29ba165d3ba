"""Preparation for integer (QDQ) targets.

``BoundInfiniteConstants``: exporters write attention masks as
``Where(mask, 0, -inf)`` (or a finite stand-in: float32's lowest value,
-65504, -10000); a quantizer cannot give -inf a scale, and a finite one
spends the whole quantized range on it.  The scalar fill values of a Where
that are +-inf or at least 1e4 in magnitude get
+-``limit`` instead (default 100: added to attention scores before Softmax,
exp(-100) is below fp32's normal range, so the masked weights stay ~0; a
larger value would spend the quantized range of the masked scores on the
fill value).  The result is verified against the fp32 model like every
other change.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import const_dtype, const_nbytes, const_value, iter_graphs

_SMALL = 64  # bytes: masks' fill values are scalars
# Fill values this large act as -inf: torch.finfo(float32).min (Llama, dynamo exports),
# fp16's -65504, BERT's -10000.
_HUGE = 1e4


class BoundInfiniteConstants(Pass):
    name = "bound_infinite_constants"

    def __init__(self, limit: float = 100.0):
        self.limit = float(limit)

    def _fix(self, c: gs.Constant) -> bool:
        dt = const_dtype(c)
        if dt is None or dt.kind != "f" or const_nbytes(c) > _SMALL:
            return False
        v = const_value(c)
        huge = np.abs(v.astype(np.float64)) >= _HUGE
        if not huge.any():
            return False
        c.values = np.where(huge, np.sign(v) * self.limit, v).astype(v.dtype)
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
        from .graph import NameScope, replace_uses

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


class TransposeToReshape(Pass):
    """A Transpose that only moves size-1 dims (static input shape, the other dims
    keeping their order) is a Reshape: same elements in the same order.  For
    the npu target: QNN's layout handling aborts the process on such a Transpose
    after a Gather (a dynamo ConvNeXt's layer scale, [1, C, 1, 1] -> [1, 1, 1, C])."""

    name = "transpose_to_reshape"

    def call(self, graph: gs.Graph) -> PassResult:
        from .graph import is_standard
        from .shapes import infer_types

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
