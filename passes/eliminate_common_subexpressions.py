"""Two nodes with the same op, attributes and input tensors become one."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import (
    NONDETERMINISTIC_OPS,
    attr_key,
    has_subgraphs,
    io_ids,
    is_standard,
    iter_graphs,
    remove_nodes,
    replace_uses,
)

__all__ = ["EliminateCommonSubexpressions"]


class EliminateCommonSubexpressions(Pass):
    """Two nodes with the same op, attributes and input tensors become one."""

    name = "eliminate_common_subexpressions"

    def call(self, graph: gs.Graph) -> PassResult:
        merged = 0
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            seen: dict[tuple, gs.Node] = {}
            dead = []
            for node in g.nodes:
                if not is_standard(node) or node.op in NONDETERMINISTIC_OPS or has_subgraphs(node):
                    continue
                key = (
                    node.op,
                    tuple(id(t) if t.name else None for t in node.inputs),
                    tuple(sorted((k, attr_key(v)) for k, v in node.attrs.items())),
                    tuple(bool(t.name) for t in node.outputs),
                )
                first = seen.get(key)
                if first is None:
                    seen[key] = node
                    continue
                if any(id(t) in out_ids for t in node.outputs):
                    continue
                for mine, theirs in zip(node.outputs, first.outputs):
                    if mine.name:
                        replace_uses(mine, theirs)
                dead.append(node)
            if dead:
                remove_nodes(g, dead)
                merged += len(dead)
        return PassResult(merged > 0, {"merged": merged})
