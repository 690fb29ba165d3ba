"""Type and shape facts from ONNX shape inference."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import cached_analysis
from .convert import export_skeleton, proto_subgraphs
from .graph import const_dtype, const_shape, io_ids, is_const, iter_graphs, replace_uses

__all__ = ["Dim", "TypeMap", "infer_types", "replace_with_constant", "shape_slice"]

Dim = int | str | None

# Initializers above this many elements are handed to shape inference as
# typed graph inputs, so probing shapes never copies big weights around.
_PROBE_CONST_LIMIT = 1024
# ONNX data propagation spells out one dim per element of every 1-D tensor of
# known length that reaches a propagating op (getInputData in onnx's
# shape_inference/implementation.h): a 1-D "bomb" would be allocated in C++.
# Past this length, inference runs without data propagation.
_DATA_PROP_MAX_LEN = 1 << 20
# Over-estimated element values past this are "unbounded" (inf): a chain of Mul
# nodes would otherwise square a Python int per node (EfficientNet's x * sigmoid(x)
# after a reparameterized Conv: 65 squarings of ~1000, a hang).
_VAL_CAP = 1 << 62


@dataclass
class TypeMap:
    """Element type and shape per tensor name, as far as inference proves them."""

    elem: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[Dim, ...] | None] = field(default_factory=dict)
    error: str | None = None

    def shape(self, t: gs.Tensor) -> tuple[Dim, ...] | None:
        if is_const(t):
            return const_shape(t)
        s = self.shapes.get(t.name)
        if s is None and isinstance(t, gs.Variable) and t.shape is not None:
            s = tuple(d if isinstance(d, (int, str)) else None for d in t.shape)
        return s

    def static_shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        s = self.shape(t)
        if s is None or not all(isinstance(d, int) and d >= 0 for d in s):
            return None
        return tuple(int(d) for d in s)

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        if is_const(t):
            return const_dtype(t)
        e = self.elem.get(t.name, 0)
        if e:
            try:
                return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(e))
            except Exception:
                return None
        if isinstance(t, gs.Variable) and isinstance(t.dtype, type | np.dtype):
            try:
                return np.dtype(t.dtype)
            except TypeError:
                return None
        return None


def _value_types(g: onnx.GraphProto) -> list[tuple[str, int, tuple[Dim, ...] | None]]:
    """(name, element type, dims or None) of each tensor-typed input, output
    and value_info of ``g`` (not its subgraphs), in that order."""
    out = []
    for vi in (*g.input, *g.output, *g.value_info):
        tp = vi.type
        if not tp.HasField("tensor_type"):
            continue
        tt = tp.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out.append((vi.name, tt.elem_type, dims))
    return out


def _collect(g: onnx.GraphProto, tm: TypeMap) -> None:
    for name, elem, dims in _value_types(g):
        if elem:
            tm.elem[name] = elem
        if dims is not None:
            tm.shapes[name] = dims
    for t in g.initializer:
        tm.elem[t.name] = t.data_type
        tm.shapes[t.name] = tuple(int(d) for d in t.dims)
    for sub in proto_subgraphs(g):
        _collect(sub, tm)


def _has_long_1d(g: onnx.GraphProto, types: list | None = None) -> bool:
    for _name, _elem, dims in _value_types(g) if types is None else types:
        if dims is not None and len(dims) == 1 and isinstance(dims[0], int) and dims[0] > _DATA_PROP_MAX_LEN:
            return True
    for node in g.node:
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            if any(_has_long_1d(sub) for sub in subs):
                return True
    return False


# Data propagation computes numbers from small integer constants and static
# dims, through arithmetic; a shape operand (input index) that may reach a big
# number gives a 1-D tensor a big static length in that same run.
_SHAPE_OPERAND = {"ConstantOfShape": 0, "Expand": 1, "Reshape": 1, "Resize": 3, "Upsample": 1, "Tile": 1}
_INT_TYPES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})


def _int_array(t: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` of an INT32/INT64 tensor stored in the model,
    without its generic dispatch (the common layouts read directly)."""
    if t.HasField("segment") or sys.byteorder != "little":
        return onnx.numpy_helper.to_array(t)
    int64 = t.data_type == onnx.TensorProto.INT64
    dt = np.int64 if int64 else np.int32
    if t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, dtype=dt).reshape(t.dims)
    return np.asarray(t.int64_data if int64 else t.int32_data, dtype=dt).reshape(t.dims)


def _data_prop_bounded(g: onnx.GraphProto, vals: dict | None = None, dims: dict | None = None,
                       types: list | None = None) -> bool:
    """Whether no 1-D tensor can get a static length over ``_DATA_PROP_MAX_LEN``
    through data propagation, by over-estimating (per tensor) the numbers it
    may compute (``vals``) and the numeric dims it may give (``dims``).
    ``types``: ``_value_types(g)`` when the caller has it."""
    vals = {} if vals is None else vals
    dims = {} if dims is None else dims
    shapes = {name: sh for name, _elem, sh in (_value_types(g) if types is None else types) if sh is not None}

    def known(name):  # (max static dim, fully static, rank) from the plain inference run
        sh = shapes.get(name)
        if sh is None:
            return 0, False, None
        return (max((d if isinstance(d, int) else 0 for d in sh), default=0), all(isinstance(d, int) for d in sh),
                len(sh))

    def biggest(t: onnx.TensorProto) -> int:
        if t.data_type not in _INT_TYPES or t.data_location == onnx.TensorProto.EXTERNAL:
            return 0
        return int(np.abs(_int_array(t).astype(np.int64)).max(initial=0))

    for t in g.initializer:
        vals[t.name], dims[t.name] = biggest(t), max(t.dims, default=0)
    for vi in g.input:
        dims.setdefault(vi.name, known(vi.name)[0])  # a symbolic input dim never becomes a number
    for node in g.node:
        ins = [i for i in node.input if i]
        v = [vals.get(i, 0) for i in ins]
        d = [dims.get(i, 0) for i in ins]
        op = node.op_type
        out_v = max(v, default=0)
        if op == "Constant":
            out_v = max((biggest(a.t) for a in node.attribute if a.HasField("t")), default=0)
        elif op == "Shape":
            out_v = d[0] if d else 0
        elif op == "Size":
            rank = known(ins[0])[2] if ins else None
            out_v = (d[0] ** rank if rank is not None else float("inf")) if d and d[0] else 0
        elif op in ("Add", "Sub", "Sum"):
            out_v = sum(v)
        elif op == "Mul":
            out_v = math.prod(v) if all(v) and v else 0
        elif op == "Pow" and v and v[0] > 1:
            out_v = float("inf")
        if out_v > _VAL_CAP:
            out_v = float("inf")
        out_d = max(d, default=0)
        k = _SHAPE_OPERAND.get(op)
        if k is not None and len(node.input) > k and node.input[k]:
            w = vals.get(node.input[k], 0)
            out_d = max(out_d, w * out_d if op == "Tile" else w)
        elif op == "Concat":
            out_d = sum(d)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                sub_vals, sub_dims = dict(vals), dict(dims)
                if not _data_prop_bounded(sub, sub_vals, sub_dims):
                    return False
                out_v = max(out_v, max((sub_vals.get(o.name, 0) for o in sub.output), default=0))
                out_d = max(out_d, max((sub_dims.get(o.name, 0) for o in sub.output), default=0))
        for o in node.output:
            biggest_dim, static, rank = known(o)
            dims[o] = biggest_dim if static else max(biggest_dim, out_d)
            vals[o] = out_v
            if rank in (None, 1) and dims[o] > _DATA_PROP_MAX_LEN:
                return False
    return True


def infer_types(graph: gs.Graph) -> TypeMap:
    """Run ONNX shape inference (with data propagation) on the graph as it is now.

    An inference failure is not fatal: the map is then built from the types
    the graph already declares, and ``error`` says why inference failed.
    Inside a ``PassManager`` run, a map computed by an earlier pass is reused
    while no pass has modified the graph since (each caller gets its own copy).
    """
    tm, _reused = cached_analysis(graph, "infer_types", lambda: _infer_types(graph),
                                  revalidate=lambda old: _kept_names(graph, old), disagreement=_disagreement)
    return TypeMap(dict(tm.elem), dict(tm.shapes), tm.error)


def _disagreement(kept: TypeMap, fresh: TypeMap) -> str | None:
    """Where a reused inference says something a fresh one does not: another
    element type, rank or static dim for a tensor (the fresh one may know more:
    a dim or a type the old one left open)."""
    for name, e in kept.elem.items():
        f = fresh.elem.get(name, 0)
        if e and f and e != f:
            return f"{name!r} is now of element type {f}, was {e}"
    for name, s in kept.shapes.items():
        f = fresh.shapes.get(name)
        if s is None or f is None:
            continue
        if len(s) != len(f) or any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(s, f)):
            return f"{name!r} now has shape {list(f)}, was {list(s)}"
    return None


def _kept_names(graph: gs.Graph, tm: TypeMap) -> TypeMap:
    """``tm`` without the tensors the graph no longer holds: what inference
    gives after a modification that kept every other tensor's type (a merge of
    identical constants removes names and changes nothing else)."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        names.update(t.name for t in g.inputs)
        names.update(t.name for t in g.outputs)
        for node in g.nodes:
            names.update(t.name for t in node.inputs)
            names.update(t.name for t in node.outputs)
    return TypeMap({k: v for k, v in tm.elem.items() if k in names},
                   {k: v for k, v in tm.shapes.items() if k in names}, tm.error)


def _infer_types(graph: gs.Graph) -> TypeMap:
    model = export_skeleton(graph, _PROBE_CONST_LIMIT)
    tm = TypeMap()
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        types = _value_types(inferred.graph)  # read once for both checks
        if not _has_long_1d(inferred.graph, types) and _data_prop_bounded(inferred.graph, types=types):
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # reported through TypeMap.error, counted by callers
        tm.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        inferred = model
    _collect(inferred.graph, tm)
    return tm


def replace_with_constant(graph: gs.Graph, node: gs.Node, out: gs.Tensor, value: np.ndarray, *,
                          remove: bool = True) -> bool:
    """Replace ``node`` (single live output ``out``) by the constant ``value``.

    A graph output keeps its name and becomes a ``Constant`` node; anything
    else becomes an initializer that takes over the output's name.  Returns
    whether ``node`` was detached (no inputs or outputs left); with ``remove``
    False it is left in ``graph.nodes`` for the caller to drop (a caller that
    folds many nodes drops them in one sweep instead of one list scan each).
    """
    _, out_ids = io_ids(graph)
    if id(out) in out_ids:
        node.op = "Constant"
        node.domain = ""
        node.inputs.clear()
        node.outputs = [out]
        node.attrs = {"value": gs.Constant(out.name + "_value", np.asarray(value))}
        return False
    const = gs.Constant(out.name, np.asarray(value))
    replace_uses(out, const)
    node.inputs.clear()
    node.outputs.clear()
    if remove:
        # remove_nodes(graph, [node]) for one node: an identity test per node
        # instead of a set lookup
        graph.nodes = [n for n in graph.nodes if n is not node]
    return True


def shape_slice(rank: int, start: int, end: int | None) -> range:
    """The dims ``Shape(start=start, end=end)`` picks of a rank-``rank`` tensor."""

    def clamp(x: int) -> int:
        if x < 0:
            x += rank
        return min(max(x, 0), rank)

    return range(clamp(start), clamp(rank if end is None else end))
