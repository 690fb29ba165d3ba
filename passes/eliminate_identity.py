"""Identity, and Dropout at inference (mask unused, not in training mode), removed."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import bypass, const_value, io_ids, is_const, is_standard, walk_nodes

__all__ = ["EliminateIdentity"]


class EliminateIdentity(Pass):
    """Identity, and Dropout at inference (mask unused, not in training mode)."""

    name = "eliminate_identity"

    def call(self, graph: gs.Graph) -> PassResult:
        stats: dict[str, int] = {}
        for g, node in walk_nodes(graph):
            if not is_standard(node) or not node.inputs or not node.outputs:
                continue
            if node.op == "Identity":
                pass
            elif node.op == "Dropout":
                if any(t.name and (t.outputs or id(t) in io_ids(g)[1]) for t in node.outputs[1:]):
                    continue
                if len(node.inputs) > 2 and node.inputs[2].name:
                    mode = node.inputs[2]
                    if not is_const(mode) or bool(const_value(mode).ravel()[0]):
                        continue
            else:
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if not src.name:
                continue
            while len(node.outputs) > 1:
                node.outputs.pop()
            if bypass(g, node, src, dst):
                stats[node.op] = stats.get(node.op, 0) + 1
        return PassResult(bool(stats), stats)
