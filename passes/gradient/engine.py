"""Reverse-mode differentiation of an ONNX graph: the walk.

Given a graph, a scalar loss tensor and the tensors to differentiate (the
trainables), ``build_gradient`` appends the backward nodes to the graph and
returns the gradient tensor of each trainable.  Only nodes on a path from a
trainable to the loss get gradient work: a value is *live* when it depends on
a trainable through a differentiable edge (a float tensor in an input slot the
op's rule declares differentiable), and a node is differentiated when it reads
a live value and its output reaches the loss.  Frozen weights, integer and
shape paths get nothing.  The walk visits those nodes in reverse topological
order, sums the contributions of a value's readers, and hands each node's
output gradients to the rule of its op (``rules.RULES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import onnx_graphsurgeon as gs

from ..graph import has_subgraphs, is_standard
from ..shapes import TypeMap, infer_types
from .context import GradContext, GradientError
from .rules import RULES, Rule

FLOAT_KINDS = "f"
MIN_OPSET = 13


@dataclass
class GradientPlan:
    """The nodes on the path from the trainables to the loss, and what is missing."""

    path: list[gs.Node]
    live: set[str]  # tensor names that carry a gradient
    missing: dict[str, list[str]] = field(default_factory=dict)  # op -> node names without a rule
    unreached: list[str] = field(default_factory=list)  # trainables the loss does not depend on


@dataclass
class GradientResult:
    grads: dict[str, gs.Tensor]  # trainable name -> its gradient in the graph
    nodes_added: int
    path_nodes: int
    unreached: list[str]


def _is_float(types: TypeMap, t: gs.Tensor) -> bool:
    dt = types.dtype(t)
    return dt is not None and dt.kind in FLOAT_KINDS


def rule_for(node: gs.Node) -> Rule | None:
    if not is_standard(node) or has_subgraphs(node):
        return None
    return RULES.get(node.op)


def _diff_slots(node: gs.Node) -> Sequence[int]:
    r = rule_for(node)
    if r is None or r.inputs is None:
        return range(len(node.inputs))
    return [i for i in r.inputs if i < len(node.inputs)]


def plan(graph: gs.Graph, loss: str, wrt: Sequence[str], types: TypeMap | None = None) -> GradientPlan:
    """Which nodes need a gradient rule (networkx over the node graph)."""
    types = types if types is not None else infer_types(graph)
    tensors = graph.tensors()
    if loss not in tensors:
        raise GradientError(f"no tensor named {loss!r} in the graph")
    for w in wrt:
        if w not in tensors:
            raise GradientError(f"no tensor named {w!r} in the graph")
    # Forward: values that depend on a trainable through differentiable edges.
    live = set(wrt)
    for node in graph.nodes:
        slots = _diff_slots(node) if rule_for(node) is not None else range(len(node.inputs))
        if any(node.inputs[i].name in live for i in slots if node.inputs[i].name):
            for o in node.outputs:
                # an op without a rule whose output type is unknown (a custom op) stays on the
                # path, so the pre-flight names it instead of a later rule failing on it
                if o.name and (_is_float(types, o) or (rule_for(node) is None and types.dtype(o) is None)):
                    live.add(o.name)
    # Backward: the loss's ancestors on the tensor/node graph.
    import networkx as nx  # here, not at the top: the pass registry imports this module on every compile

    g = nx.DiGraph()
    for k, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t.name:
                g.add_edge(("t", t.name), ("n", k))
        for t in node.outputs:
            if t.name:
                g.add_edge(("n", k), ("t", t.name))
    anc = nx.ancestors(g, ("t", loss)) if ("t", loss) in g else set()
    path = [n for k, n in enumerate(graph.nodes)
            if ("n", k) in anc and any(t.name in live for t in n.inputs if t.name)
            and any(t.name in live for t in n.outputs if t.name)]
    missing: dict[str, list[str]] = {}
    for n in path:
        if rule_for(n) is None:
            label = n.op if is_standard(n) else f"{n.domain}:{n.op}"
            missing.setdefault(label, []).append(n.name or "(unnamed)")
    unreached = [w for w in wrt if w != loss and ("t", w) not in anc]
    return GradientPlan(path, live, missing, unreached)


def build_gradient(graph: gs.Graph, loss: str, wrt: Sequence[str], *, types: TypeMap | None = None,
                   prefix: str = "grad") -> GradientResult:
    """Append d loss / d w for every ``w`` in ``wrt`` to ``graph`` (in place).

    ``loss`` names a scalar (or any-shaped: the seed is ones) float tensor.
    Raises ``GradientError`` naming every op on the path without a rule."""
    opset = int(graph.opset)
    if opset < MIN_OPSET:
        raise GradientError(f"opset {opset}: the gradient pass needs opset >= {MIN_OPSET} (convert the model first)")
    types = types if types is not None else infer_types(graph)
    p = plan(graph, loss, wrt, types)
    if p.missing:
        raise GradientError("no gradient rule for " + "; ".join(
            f"{op} ({len(names)} node{'s' if len(names) > 1 else ''}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for op, names in sorted(p.missing.items())))
    tensors = graph.tensors()
    g = GradContext(graph, types, opset, prefix)
    contrib: dict[str, list[gs.Tensor]] = {}
    loss_t = tensors[loss]
    contrib[loss] = [g.ones_like(loss_t)]

    def total(name: str, like: gs.Tensor) -> gs.Tensor | None:
        parts = contrib.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            s = g.op("Sum", parts)
            contrib[name] = [s]
            return s
        return parts[0]

    for node in reversed(p.path):
        gys = [total(o.name, o) if o.name else None for o in node.outputs]
        if all(y is None for y in gys):
            continue
        slots = set(_diff_slots(node))
        needed = [i in slots and t.name in p.live and _is_float(types, t) for i, t in enumerate(node.inputs)]
        if not any(needed):
            continue
        g.node, g.needed = node, needed
        gxs = rule_for(node).fn(g, node, gys)
        for i, (t, gx) in enumerate(zip(node.inputs, gxs)):
            if gx is not None and needed[i]:
                contrib.setdefault(t.name, []).append(gx)
    grads: dict[str, gs.Tensor] = {}
    taken: set[int] = set()
    for w in wrt:
        t = tensors[w]
        gx = total(w, t)
        gx = gx if gx is not None else g.zeros_like(t)
        if id(gx) in taken or not gx.inputs or gx.inputs[0] not in g.nodes:  # one distinct tensor per trainable
            gx = g.op("Identity", [gx])
        taken.add(id(gx))
        grads[w] = gx
    return GradientResult(grads, len(g.nodes), len(p.path), p.unreached)


__all__ = ["GradientError", "GradientPlan", "GradientResult", "build_gradient", "plan", "rule_for", "MIN_OPSET"]
