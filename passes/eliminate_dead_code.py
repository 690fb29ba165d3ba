"""Nodes that no graph output depends on, removed (unused initializers go with them)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import count_nodes

__all__ = ["EliminateDeadCode"]


class EliminateDeadCode(Pass):
    """Nodes that no graph output depends on (unused initializers go with them)."""

    name = "eliminate_dead_code"

    def call(self, graph: gs.Graph) -> PassResult:
        before = count_nodes(graph)
        graph.cleanup(remove_unused_node_outputs=False, recurse_subgraphs=True, remove_unused_graph_inputs=False)
        removed = before - count_nodes(graph)
        return PassResult(removed > 0, {"nodes_removed": removed})
