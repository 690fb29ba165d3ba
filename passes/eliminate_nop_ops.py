"""Ops that compute their input unchanged, removed: Cast to the same type,
Reshape/Expand to the same shape, identity Transpose, zero Pad, full Slice,
single-input Concat."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import bypass, const_value, is_const, is_standard, walk_nodes
from .shapes import TypeMap, infer_types

__all__ = ["EliminateNopOps"]

_INT64_MAX_ISH = 2**31 - 1  # exporters write INT_MAX or INT64_MAX for "to the end"


class EliminateNopOps(Pass):
    """Cast to the same type, Reshape/Expand to the same shape, identity
    Transpose, zero Pad, full Slice, single-input Concat."""

    name = "eliminate_nop_ops"

    def call(self, graph: gs.Graph) -> PassResult:
        tm = infer_types(graph)
        stats: dict[str, int] = {}
        changed = True
        while changed:  # a bypass may rename a value to a graph output whose declared type proves an earlier node a nop
            changed = False
            for g, node in walk_nodes(graph):
                if not is_standard(node) or not node.inputs or len(node.outputs) != 1:
                    continue
                check = getattr(self, "_nop_" + node.op, None)
                if check is None or not node.inputs[0].name:
                    continue
                try:
                    nop = check(node, tm)
                except (ValueError, IndexError, TypeError):
                    nop = False
                if nop and bypass(g, node, node.inputs[0], node.outputs[0]):
                    stats[node.op] = stats.get(node.op, 0) + 1
                    changed = True
        # each removed node computed its input unchanged: readers now read a tensor of the same type
        return PassResult(bool(stats), stats, types_kept=True)

    @staticmethod
    def _nop_Cast(node, tm: TypeMap) -> bool:
        src = tm.dtype(node.inputs[0])
        dst = tm.dtype(node.outputs[0])
        return src is not None and dst is not None and src == dst

    @staticmethod
    def _nop_CastLike(node, tm: TypeMap) -> bool:
        src = tm.dtype(node.inputs[0])
        return src is not None and src == tm.dtype(node.inputs[1])

    @staticmethod
    def _nop_Reshape(node, tm: TypeMap) -> bool:
        if len(node.inputs) < 2 or not is_const(node.inputs[1]):
            return False
        shape = tm.shape(node.inputs[0])
        target = [int(v) for v in const_value(node.inputs[1]).ravel()]
        if shape is None or len(shape) != len(target):
            return False
        allowzero = node.attrs.get("allowzero", 0)
        minus_one = 0
        for have, want in zip(shape, target):
            if want == 0 and not allowzero:
                continue
            if want == -1:
                minus_one += 1
                continue
            if have != want:
                return False
        # A single -1 among dims that all match is the one remaining dim.
        return minus_one <= 1

    @staticmethod
    def _nop_Expand(node, tm: TypeMap) -> bool:
        if len(node.inputs) < 2 or not is_const(node.inputs[1]):
            return False
        shape = tm.shape(node.inputs[0])
        target = [int(v) for v in const_value(node.inputs[1]).ravel()]
        if shape is None or len(target) > len(shape):
            return False
        # Every target dim is 1 or equals the input's (static) dim.
        tail = shape[len(shape) - len(target):]
        return all(w == 1 or (isinstance(h, int) and h == w) for h, w in zip(tail, target))

    @staticmethod
    def _nop_Transpose(node, tm: TypeMap) -> bool:
        perm = node.attrs.get("perm")
        rank = tm.rank(node.inputs[0])
        if perm is None:
            return rank is not None and rank <= 1
        return list(perm) == list(range(len(perm)))

    @staticmethod
    def _nop_Pad(node, tm: TypeMap) -> bool:
        if "pads" in node.attrs:  # opset < 11
            return not any(node.attrs["pads"])
        if len(node.inputs) < 2 or not is_const(node.inputs[1]):
            return False
        return not np.any(const_value(node.inputs[1]))

    @staticmethod
    def _nop_Slice(node, tm: TypeMap) -> bool:
        if len(node.inputs) < 3:
            return False
        parts = node.inputs[1:5]
        if not all(is_const(t) for t in parts if t.name):
            return False
        starts = const_value(parts[0]).astype(np.int64).ravel()
        ends = const_value(parts[1]).astype(np.int64).ravel()
        shape = tm.shape(node.inputs[0])
        rank = None if shape is None else len(shape)
        if len(parts) > 2 and parts[2].name:
            axes = const_value(parts[2]).astype(np.int64).ravel()
        else:
            axes = np.arange(len(starts))
        steps = const_value(parts[3]).astype(np.int64).ravel() if len(parts) > 3 and parts[3].name else np.ones_like(starts)
        for s, e, a, st in zip(starts, ends, axes, steps):
            if st != 1 or s != 0:
                return False
            if e >= _INT64_MAX_ISH:
                continue
            if rank is None:
                return False
            dim = shape[int(a) % rank]
            if not (isinstance(dim, int) and e >= dim):
                return False
        return True

    @staticmethod
    def _nop_Concat(node, tm: TypeMap) -> bool:
        return len(node.inputs) == 1
