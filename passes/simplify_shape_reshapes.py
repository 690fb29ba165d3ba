"""simplify_shape_reshapes: Reshapes whose target shape is computed from Shape
ops, proved no-ops, Flattens or constant targets from the symbolic dims of shape inference.

torch's TorchScript exporter writes ``x.view(x.size(0), -1)`` as
``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))``; with a dynamic
batch nothing folds it.  The target is read piece by piece: an int constant,
or dim i of a tensor t (``Unsqueeze(Gather(Shape(t), i))``, ``Gather(Shape(t),
[i..])``, ``Slice(Shape(t), i, j)``, ``Shape(t)``).  A piece matches the
data's dim k when it is dim k of the data itself, or when inference gives both
the same int or the same dim_param (so it holds for every binding).

- every dim matches (one -1 allowed: it is then forced): the Reshape goes;
- ``[dim 0 of data, -1]`` on data of rank >= 3: ``Flatten(data, axis=1)``;
- otherwise, when every piece that is not an int matches the data's dim AT ITS
  OWN POSITION, those pieces become 0 (allowzero=0: copy the input's dim at
  that index, exact also when the dim is 0) and the target one int64
  initializer: ``x.view(x.size(0), x.size(1), heads, -1)`` -> ``[0, 0, heads, -1]``
  (onnxslim does the same).  A piece equal to a data dim at another position
  cannot be a 0: then, and when any other piece is not an int, nothing changes.

Nothing else: unknown dims, different dim_params, allowzero=1 are left alone.
Constant target shapes are eliminate_nop_ops' business.  The Shape chains are
left for eliminate_dead_code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, bypass, const_ints, is_const, is_standard, std_producer, walk_nodes
from .shapes import TypeMap, infer_types, shape_slice

__all__ = ["Piece", "SimplifyShapeReshapes", "pieces"]

# A piece of a target shape: an int constant, or (tensor, i) = dim i of tensor.
Piece = int | tuple[gs.Tensor, int]

_MAX_PIECES = 64  # longer targets (ranks) and deeper Concat nests are not read
_MAX_DEPTH = 8
# Element types Flatten takes from opset 9 on (bfloat16 from 13; float8/int4 only from 21).
_FLATTEN_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                             "float16", "float32", "float64", "complex64", "complex128"})


def _shape_dims(t: gs.Tensor, tm: TypeMap) -> list[Piece] | None:
    """Pieces of ``t`` when it is ``Shape(x)`` (start/end honoured): dims of x."""
    node = std_producer(t, "Shape")
    if node is None or len(node.inputs) != 1:
        return None
    x = node.inputs[0]
    rank = tm.rank(x)
    if rank is None:
        return None
    return [(x, i) for i in shape_slice(rank, int(node.attrs.get("start", 0)), node.attrs.get("end"))]


def _pick(t: gs.Tensor, tm: TypeMap, scalar: bool) -> list[Piece] | None:
    """Pieces of a Gather/Slice of a Shape (a 0-d Gather when ``scalar``)."""
    node = std_producer(t, "Gather", "Slice")
    if node is None or not node.inputs:
        return None
    dims = _shape_dims(node.inputs[0], tm)
    if dims is None:
        return None
    n = len(dims)
    if node.op == "Gather":
        if len(node.inputs) != 2 or int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        idx = const_ints(node.inputs[1], 0 if scalar else 1)
        if idx is None or not all(-n <= i < n for i in idx):
            return None
        return [dims[i] for i in idx]
    if scalar or "starts" in node.attrs:  # opset < 10 Slice: attributes, not taken
        return None
    parts = node.inputs[1:5]
    if len(parts) < 2 or not all(is_const(p) for p in parts if p.name):
        return None
    starts, ends = const_ints(parts[0], 1), const_ints(parts[1], 1)
    axes = const_ints(parts[2], 1) if len(parts) > 2 and parts[2].name else [0]
    steps = const_ints(parts[3], 1) if len(parts) > 3 and parts[3].name else [1]
    if not (starts and ends and axes and steps) or not len(starts) == len(ends) == len(axes) == len(steps) == 1:
        return None
    if axes[0] not in (0, -1) or steps[0] != 1:
        return None
    return [dims[i] for i in shape_slice(n, starts[0], ends[0])]


def pieces(t: gs.Tensor, tm: TypeMap, depth: int = 0) -> list[Piece] | None:
    """The 1-D int tensor ``t`` as pieces, or None when some element is not one."""
    if depth > _MAX_DEPTH:
        return None
    const = const_ints(t, 1)
    if const is not None:
        return const
    node = std_producer(t, "Concat", "Unsqueeze", "Gather", "Slice", "Shape")
    if node is None:
        return None
    if node.op == "Concat":
        if int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        out: list[Piece] = []
        for part in node.inputs:
            got = pieces(part, tm, depth + 1)
            if got is None or len(out) + len(got) > _MAX_PIECES:
                return None
            out.extend(got)
        return out
    if node.op == "Unsqueeze":
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) == 2:
            axes = const_ints(node.inputs[1], 1)
        if axes is None or [int(a) for a in axes] not in ([0], [-1]):
            return None
        src = node.inputs[0]
        return const_ints(src, 0) or _pick(src, tm, scalar=True)
    if node.op == "Shape":
        return _shape_dims(t, tm)
    return _pick(t, tm, scalar=False)


def _matches(piece: Piece, data: gs.Tensor, k: int, shape: tuple, tm: TypeMap) -> bool:
    """Whether ``piece`` (not -1) gives data's dim k for every binding of the symbolic dims."""
    if isinstance(piece, int):
        return piece == 0 or (piece > 0 and shape[k] == piece)  # 0: copy the dim (allowzero=0)
    t, i = piece
    if t is data and i == k:
        return True
    other = tm.shape(t)
    if other is None:
        return False
    a, b = other[i], shape[k]
    return a is not None and type(a) is type(b) and a == b


class SimplifyShapeReshapes(Pass):
    """Reshape to a shape computed from Shape ops: no-op -> removed,
    ``[dim 0, -1]`` -> Flatten(axis=1), dims copied in place -> a constant
    target with 0s."""

    name = "simplify_shape_reshapes"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        tm: TypeMap | None = None
        scope: list[NameScope] = []  # made on first use

        def fresh(base: str) -> str:
            if not scope:
                scope.append(NameScope(graph))
            return scope[0].fresh(base)

        stats: dict[str, int] = {}
        for g, node in walk_nodes(graph):
            if (node.op != "Reshape" or not is_standard(node) or len(node.inputs) != 2
                    or len(node.outputs) != 1 or int(node.attrs.get("allowzero", 0)) != 0):
                continue
            data, target_t = node.inputs
            if not data.name or is_const(target_t):
                continue
            if tm is None:
                tm = infer_types(graph)
                if tm.error:
                    stats["inference_failed"] = 1
            try:
                kind = self._rewrite(g, node, tm, graph.opset, fresh)
            except (ValueError, IndexError, TypeError):  # a malformed shape chain is left as it is
                kind = None
            if kind:
                stats[kind] = stats.get(kind, 0) + 1
        return PassResult(any(k != "inference_failed" for k in stats), stats)

    @staticmethod
    def _rewrite(g: gs.Graph, node: gs.Node, tm: TypeMap, opset: int | None,
                 fresh: Callable[[str], str]) -> str | None:
        data, target_t = node.inputs
        out = node.outputs[0]
        target = pieces(target_t, tm)
        shape = tm.shape(data)
        if target is None or shape is None or all(isinstance(p, int) for p in target):
            return None  # a constant target is eliminate_nop_ops' business
        rank = len(shape)
        if sum(1 for p in target if isinstance(p, int) and p == -1) > 1:
            return None
        if any(isinstance(p, int) and p < -1 for p in target):
            return None
        if len(target) == rank and all(p == -1 or _matches(p, data, k, shape, tm) for k, p in enumerate(target)):
            # every dim but at most one matches, the ranks are equal: the -1 is the remaining dim
            if bypass(g, node, data, out):
                return "noop"
            # data is a graph input (or constant) and out a graph output: both names must stay
            del node.inputs[1]
            node.op, node.attrs = "Identity", {}
            return "identity"
        if (rank >= 3 and len(target) == 2 and target[1] == -1 and _matches(target[0], data, 0, shape, tm)
                and (opset or 0) >= 9):
            dt = tm.dtype(data)
            name = None if dt is None else dt.name
            if name in _FLATTEN_DTYPES or (name == "bfloat16" and opset >= 13):
                node.op, node.attrs = "Flatten", {"axis": 1}
                del node.inputs[1]
                return "flatten"
        zeros = _copy_as_zero(target, data, shape, tm)
        if zeros is not None:
            node.inputs[1] = gs.Constant(fresh(f"{target_t.name or 'shape'}_const"), np.array(zeros, np.int64))
            return "zero_copied_dims"
        return None


def _copy_as_zero(target: list[Piece], data: gs.Tensor, shape: tuple, tm: TypeMap) -> list[int] | None:
    """The target with every dim piece replaced by 0 when each matches the data's
    dim at its own index (allowzero=0 copies exactly that dim); None when one
    does not (a dim of the data at another index cannot be written as 0)."""
    out: list[int] = []
    for k, p in enumerate(target):
        if isinstance(p, int):
            out.append(p)
        elif k < len(shape) and _matches(p, data, k, shape, tm):
            out.append(0)
        else:
            return None
    return out
