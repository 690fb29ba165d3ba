"""Gradient rules: element-wise arithmetic and activations.

Binary ops broadcast: each operand's gradient is summed back to its shape by
``g.sum_to``.  ``x`` below is the node's first input, ``y`` its output.
"""

from __future__ import annotations

from .base import Rule


def _add(g, node, gys):
    gy = gys[0]
    return [g.sum_to(gy, node.inputs[0]) if g.needs(0) else None,
            g.sum_to(gy, node.inputs[1]) if g.needs(1) else None]


def _sub(g, node, gys):
    gy = gys[0]
    return [g.sum_to(gy, node.inputs[0]) if g.needs(0) else None,
            g.sum_to(g.neg(gy), node.inputs[1]) if g.needs(1) else None]


def _mul(g, node, gys):
    gy = gys[0]
    a, b = node.inputs[:2]
    return [g.sum_to(g.mul(gy, b), a) if g.needs(0) else None,
            g.sum_to(g.mul(gy, a), b) if g.needs(1) else None]


def _div(g, node, gys):
    # y = a / b: da = gy / b, db = -gy * y / b
    gy = gys[0]
    a, b = node.inputs[:2]
    y = node.outputs[0]
    return [g.sum_to(g.div(gy, b), a) if g.needs(0) else None,
            g.sum_to(g.neg(g.div(g.mul(gy, y), b)), b) if g.needs(1) else None]


def _neg(g, node, gys):
    return [g.neg(gys[0])]


def _identity(g, node, gys):
    return [gys[0]]


def _sum(g, node, gys):
    return [g.sum_to(gys[0], x) if g.needs(i) else None for i, x in enumerate(node.inputs)]


RULES: dict[str, Rule] = {
    "Add": Rule(_add),
    "Sub": Rule(_sub),
    "Mul": Rule(_mul),
    "Div": Rule(_div),
    "Neg": Rule(_neg),
    "Identity": Rule(_identity),
    "Sum": Rule(_sum),
}
