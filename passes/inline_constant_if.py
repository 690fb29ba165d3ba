"""If with a constant condition is replaced by the branch it always takes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import NameScope, const_value, index_of, is_const, is_standard, walk_nodes

__all__ = ["InlineConstantIf"]


class InlineConstantIf(Pass):
    name = "inline_constant_if"

    def call(self, graph: gs.Graph) -> PassResult:
        inlined = 0
        names = None
        changed = True
        while changed:  # an inlined branch may hold further constant Ifs
            changed = False
            for g, node in walk_nodes(graph):
                if node.op != "If" or not is_standard(node) or not node.inputs or not is_const(node.inputs[0]):
                    continue
                cond = const_value(node.inputs[0])
                if cond.size != 1:
                    continue
                branch: gs.Graph = node.attrs["then_branch" if bool(cond.ravel()[0]) else "else_branch"]
                if len(branch.outputs) != len(node.outputs) or branch.inputs:
                    continue
                names = names or NameScope(graph)
                glue = []
                for src, dst in zip(branch.outputs, node.outputs):
                    if not dst.name:
                        continue
                    glue.append(gs.Node("Identity", name=names.fresh(f"{node.name or 'if'}_out"), inputs=[src], outputs=[]))
                idx = index_of(g, node)
                outs = [t for t in node.outputs if t.name]
                node.inputs.clear()
                node.outputs.clear()
                for ident, dst in zip(glue, outs):
                    ident.outputs = [dst]
                g.nodes[idx:idx + 1] = list(branch.nodes) + glue
                inlined += 1
                changed = True
                break
        return PassResult(inlined > 0, {"inlined": inlined})
