"""eliminate_reshape_pairs: ``Reshape(E(Reshape(x, s1)), t) -> E(x)`` when E is a
chain of element-wise ops whose other operands are one-element constants and
``t`` is a constant that gives x's own shape.

Hugging Face's Conv1D (GPT-2) is ``x.view(-1, n) -> addmm -> view(size_out)``;
torch's dynamo exporter then writes the MLP as
``Gemm -> Reshape([B, S, 3072]) -> GELU chain -> Reshape([-1, 3072]) -> Gemm``.
Element-wise ops on one-element operands do not care about the layout, and a
Reshape keeps the row-major order, so the chain can run on x directly:

- ``t`` is a constant (initializer or Constant node) of x's rank r, with at most
  one -1 and every other entry > 0 and equal to x's static dim there: then
  ``Reshape(anything with x's element count, t)`` has exactly x's shape
  (allowzero does not matter, no entry is 0);
- E is a DAG of the ops in ``_UNARY``/``_BINARY`` from the inner Reshape's
  output to the outer Reshape's input; each node has one output and reads at
  least one tensor of E (or the inner Reshape's output); every other operand is
  a constant with one element and rank <= r (broadcasting it keeps x's shape
  and, on the reshaped data, the element count);
- every tensor of E, and the inner Reshape's output, is read only inside E (the
  last one only by the outer Reshape) and none is a graph output.

s1 is never read (it may be computed from Shape ops; the inner Reshape's
allowzero does not matter).  The inner Reshape is the one node that could fail
at run time on a bad s1; the result no longer does.  An empty E
(``Reshape(Reshape(x, s1), t)``) makes the outer Reshape go.  The outer
Reshape's output keeps its name when it is a graph output.  The Shape chains
of s1 are left for eliminate_dead_code.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from .base import Pass, PassResult
from .graph import (
    NodeIndex,
    const_ints,
    const_shape,
    io_ids,
    is_const,
    is_standard,
    iter_graphs,
    producer,
)
from .shapes import TypeMap, infer_types

__all__ = ["EliminateReshapePairs"]

_UNARY = frozenset({
    "Abs", "Neg", "Sqrt", "Exp", "Log", "Tanh", "Erf", "Sigmoid", "Relu", "Gelu", "Reciprocal",
    "Floor", "Ceil", "Sign", "Softplus", "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid",
    "Sin", "Cos", "Not", "Identity", "Cast",
})
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
_MAX_CHAIN = 64  # element-wise nodes followed back from one outer Reshape


def _scalar_rank(t: gs.Tensor) -> int | None:
    """The rank of ``t`` when it is a one-element constant (an initializer or a
    standard Constant node's output), else None."""
    if is_const(t):
        shape = const_shape(t)
        return len(shape) if math.prod(shape) == 1 else None
    node = producer(t)
    if node is None or node.op != "Constant" or not is_standard(node) or len(node.outputs) != 1:
        return None
    if "value_float" in node.attrs or "value_int" in node.attrs:
        return 0
    value = node.attrs.get("value")
    if is_const(value) and math.prod(const_shape(value)) == 1:
        return len(const_shape(value))
    return None


def _is_reshape(node: gs.Node | None) -> bool:
    return (node is not None and node.op == "Reshape" and is_standard(node)
            and len(node.inputs) == 2 and len(node.outputs) == 1)


class EliminateReshapePairs(Pass):
    """Reshape -> element-wise chain with one-element constants -> Reshape
    back to the input's shape: the chain runs on the input, both Reshapes go."""

    name = "eliminate_reshape_pairs"
    idempotent = True

    def call(self, graph: gs.Graph) -> PassResult:
        tm: TypeMap | None = None
        stats: dict[str, int] = {}
        for g in iter_graphs(graph):
            _, out_ids = io_ids(g)
            alive = NodeIndex(g)
            for node in list(g.nodes):
                if node not in alive or not _is_reshape(node) or not node.inputs[0].name:
                    continue
                target = const_ints(node.inputs[1], 1)
                if target is None or sum(1 for v in target if v == -1) > 1 or any(v == 0 or v < -1 for v in target):
                    continue
                match = _match(node, len(target), alive, out_ids)
                if match is None:
                    continue
                tm = tm or infer_types(graph)  # only once a candidate is found
                inner, chain = match
                kind = _rewrite(alive, node, target, inner, chain, tm, out_ids)
                if kind:
                    stats[kind] = stats.get(kind, 0) + 1
        return PassResult(bool(stats), stats)


def _match(outer: gs.Node, rank: int, alive: NodeIndex, out_ids: set[int]) -> tuple[gs.Node, list[gs.Node]] | None:
    """(inner Reshape, element-wise nodes in graph order of discovery) between
    ``outer`` and an inner Reshape, with the operand and reader conditions
    checked; None when there is no such chain."""
    chain: dict[int, gs.Node] = {}
    inner: gs.Node | None = None
    stack = [outer.inputs[0]]
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        node = producer(t)
        if node not in alive or not is_standard(node) or len(node.outputs) != 1:
            return None
        if _is_reshape(node):
            if inner is not None and node is not inner:
                return None
            inner = node
            continue
        if node.op not in (_UNARY if len(node.inputs) == 1 else _BINARY if len(node.inputs) == 2 else ()):
            return None
        if len(chain) >= _MAX_CHAIN:
            return None
        chain[id(node)] = node
        data = 0
        for i in node.inputs:
            r = _scalar_rank(i) if i.name else -1
            if r is None:  # data: followed back
                stack.append(i)
                data += 1
            elif not 0 <= r <= rank:
                return None
        if not data:  # a constant sub-expression: fold_constants' business
            return None
    if inner is None or not inner.inputs[0].name:
        return None
    if not chain:
        return inner, []
    # The inner Reshape's output and every tensor of the chain are read only
    # inside the chain, the last one only by the outer Reshape; none is a graph output.
    last = outer.inputs[0]
    for t in (inner.outputs[0], *(n.outputs[0] for n in chain.values())):
        if id(t) in out_ids:
            return None
        if t is last:
            if any(c is not outer for c in t.outputs):
                return None
        elif any(id(c) not in chain for c in t.outputs):
            return None
    return inner, list(chain.values())


def _rewrite(alive: NodeIndex, outer: gs.Node, target: list[int], inner: gs.Node, chain: list[gs.Node],
             tm: TypeMap, out_ids: set[int]) -> str | None:
    x = inner.inputs[0]
    shape = tm.shape(x)
    if shape is None or len(shape) != len(target):
        return None
    if not all(v == -1 or (isinstance(d, int) and d == v) for d, v in zip(shape, target)):
        return None
    mid, last, out = inner.outputs[0], outer.inputs[0], outer.outputs[0]
    if not chain:  # Reshape(Reshape(x, s1), t) == x
        if not alive.bypass(outer, x, out):
            return None
        if not mid.outputs and id(mid) not in out_ids:
            alive.remove([inner])
        return "reshape_of_reshape"
    if not alive.bypass(outer, last, out):  # keeps out's name when it is a graph output
        return None
    for node in chain:
        for i, t in enumerate(node.inputs):
            if t is mid:
                node.inputs[i] = x
        res = node.outputs[0]
        if id(res) not in out_ids:  # now x's shape: the declared one is stale
            res.shape = None
        tm.shapes[res.name] = tuple(shape)
    alive.remove([inner])
    return "chain"
