"""Unsqueeze(Unsqueeze(x, a1), a2) -> Unsqueeze(x, a): one node for a chain;
Unsqueeze(Squeeze(x, a), a) -> x (the squeezed dims come back where they were).

torch's dynamo exporter writes attention-mask broadcasting as chains of
Unsqueeze with constant axes.  Each outer Unsqueeze is rewritten to read x
directly with the combined axes (computed from x's rank); the inner one
goes when nothing else reads it.  Axes come from the ``axes`` input (opset
>= 13) or attribute (older opsets), and must be constants.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, NodeIndex, const_value, io_ids, is_const, is_standard, iter_graphs, producer
from .shapes import TypeMap, infer_types

__all__ = ["MergeUnsqueeze", "combine"]


def _axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) == 2 and is_const(node.inputs[1]):
        return [int(a) for a in const_value(node.inputs[1]).ravel()]
    return None


def combine(rank: int, a1: list[int], a2: list[int]) -> list[int] | None:
    """The axes of one Unsqueeze equal to unsqueezing a rank-``rank`` tensor by a1, then by a2."""
    r1 = rank + len(a1)
    r2 = r1 + len(a2)
    n1 = [a % r1 if -r1 <= a < r1 else None for a in a1]
    n2 = [a % r2 if -r2 <= a < r2 else None for a in a2]
    if None in n1 or None in n2 or len(set(n1)) != len(n1) or len(set(n2)) != len(n2):
        return None
    remaining = [p for p in range(r2) if p not in set(n2)]  # final positions of the intermediate's dims
    return sorted(set(n2) | {remaining[i] for i in n1})


class MergeUnsqueeze(Pass):
    name = "merge_unsqueeze"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        tm: TypeMap | None = None
        names: NameScope | None = None
        merged = cancelled = 0
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            alive = NodeIndex(g)
            for outer in list(g.nodes):
                if outer.op != "Unsqueeze" or not is_standard(outer) or len(outer.outputs) != 1:
                    continue
                inner = producer(outer.inputs[0])
                if (inner is not None and inner in alive and inner.op == "Squeeze" and is_standard(inner)
                        and len(inner.inputs) >= 1):
                    # Unsqueeze(Squeeze(x, a), a) == x: the squeezed dims were 1 and come back in place.
                    sq, usq = _axes(inner), _axes(outer)
                    tm = tm or infer_types(graph)
                    r = tm.rank(inner.inputs[0])
                    if sq and usq and r is not None and len(sq) == len(usq):
                        ns, nu = {a % r for a in sq if -r <= a < r}, {a % r for a in usq if -r <= a < r}
                        if len(ns) == len(sq) == len(nu) and ns == nu and alive.bypass(outer, inner.inputs[0],
                                                                                      outer.outputs[0]):
                            cancelled += 1
                    continue
                if inner is None or inner not in alive or inner.op != "Unsqueeze" or not is_standard(inner):
                    continue
                a1, a2 = _axes(inner), _axes(outer)
                if a1 is None or a2 is None:
                    continue
                x = inner.inputs[0]
                tm = tm or infer_types(graph)
                rank = tm.rank(x)
                if rank is None:
                    continue
                axes = combine(rank, a1, a2)
                if axes is None:
                    continue
                if "axes" in outer.attrs:
                    outer.attrs["axes"] = axes
                    outer.inputs[0] = x
                else:
                    names = names or NameScope(graph)
                    name = names.fresh((outer.name or outer.outputs[0].name) + "_axes")
                    outer.inputs[0] = x
                    outer.inputs[1] = gs.Constant(name, np.array(axes, np.int64))
                merged += 1
                mid = inner.outputs[0]
                if not mid.outputs and id(mid) not in out_ids:
                    alive.remove([inner])
        stats = {k: v for k, v in (("merged", merged), ("cancelled", cancelled)) if v}
        # a merged Unsqueeze keeps its output, a cancelled pair hands its readers x of the same type
        return PassResult(bool(stats), stats, types_kept=True)

