"""Gradient rules: element-wise arithmetic and activations.

Binary ops broadcast: each operand's gradient is summed back to its shape by
``g.sum_to``.  ``x`` below is the node's first input, ``y`` its output.
"""

from __future__ import annotations

import math

import numpy as np

from ..context import GradientError
from .base import Rule

__all__ = ["RULES"]


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



# ---------------------------------------------------------------- helpers
def _cast(g, a, like):
    return g.cast_like(a, like)


def _given(node, i):
    return i < len(node.inputs) and bool(node.inputs[i].name)


def _mask(g, cond, gy, like):
    """gy where ``cond``, else 0."""
    return g.op("Where", [cond, gy, g.scalar(0.0, like)])


# ---------------------------------------------------------------- powers, exp, log
def _pow(g, node, gys):
    gy = gys[0]
    a, b = node.inputs[:2]
    y = node.outputs[0]
    da = db = None
    if g.needs(0):
        bv = g.value(b)
        if bv is not None and bv.size == 1 and float(bv.reshape(-1)[0]) == 2.0:
            da = g.mul(gy, g.mul(a, g.scalar(2.0, a)))
        elif bv is not None:  # constant exponent: b and b - 1 folded
            bf = np.asarray(bv, dtype=g.dtype(a))
            da = g.mul(gy, g.mul(g.op("Pow", [a, g.const(bf - 1)]), g.const(bf)))
        else:
            bb = b if g.dtype(b) == g.dtype(a) else _cast(g, b, a)
            da = g.mul(gy, g.mul(g.op("Pow", [a, g.sub(bb, g.scalar(1.0, a))]), bb))
        da = g.sum_to(da, a)
    if g.needs(1):
        # d/db a^b = a^b log a (a > 0)
        db = g.mul(g.mul(gy, y), g.op("Log", [a]))
        if g.dtype(b) != g.dtype(a):
            db = _cast(g, db, b)
        db = g.sum_to(db, b)
    return [da, db]


def _sqrt(g, node, gys):
    y = node.outputs[0]
    return [g.div(g.mul(gys[0], g.scalar(0.5, y)), y)]


def _exp(g, node, gys):
    return [g.mul(gys[0], node.outputs[0])]


def _log(g, node, gys):
    return [g.div(gys[0], node.inputs[0])]


def _reciprocal(g, node, gys):
    # y = 1/x: dy/dx = -y^2
    y = node.outputs[0]
    return [g.mul(g.neg(gys[0]), g.mul(y, y))]


def _abs(g, node, gys):
    return [g.mul(gys[0], g.op("Sign", [node.inputs[0]]))]


# ---------------------------------------------------------------- activations
def _relu(g, node, gys):
    y = node.outputs[0]
    return [_mask(g, g.op("Greater", [y, g.scalar(0.0, y)]), gys[0], y)]


def _leaky_relu(g, node, gys):
    alpha = float(node.attrs.get("alpha", 0.01))
    x, y = node.inputs[0], node.outputs[0]
    t = y if alpha >= 0 else x  # sign(y) == sign(x) unless alpha < 0
    gy = gys[0]
    return [g.op("Where", [g.op("Greater", [t, g.scalar(0.0, t)]), gy, g.mul(gy, g.scalar(alpha, x))])]


def _prelu(g, node, gys):
    x, slope = node.inputs[:2]
    gy = gys[0]
    neg = g.op("Less", [x, g.scalar(0.0, x)])
    dx = g.op("Where", [neg, g.mul(gy, slope), gy]) if g.needs(0) else None
    ds = g.sum_to(_mask(g, neg, g.mul(gy, x), x), slope, src=x) if g.needs(1) else None
    return [dx, ds]


def _gelu(g, node, gys):
    x = node.inputs[0]
    gy = gys[0]
    c = lambda v: g.scalar(v, x)  # noqa: E731
    x2 = g.mul(x, x)
    if node.attrs.get("approximate", "none") == "tanh":
        # y = x/2 (1 + t), t = tanh(k (x + 0.044715 x^3)): y' = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3*0.044715 x^2)
        k = math.sqrt(2.0 / math.pi)
        t = g.op("Tanh", [g.mul(g.mul(x, g.add(g.mul(x2, c(0.044715)), c(1.0))), c(k))])
        du = g.add(g.mul(x2, c(3 * 0.044715 * k)), c(k))
        half_x = g.mul(x, c(0.5))
        d = g.add(g.add(g.mul(t, c(0.5)), c(0.5)), g.mul(g.mul(half_x, g.sub(c(1.0), g.mul(t, t))), du))
    else:
        # y = x Phi(x): y' = Phi(x) + x phi(x)
        cdf = g.add(g.mul(g.op("Erf", [g.mul(x, c(1 / math.sqrt(2.0)))]), c(0.5)), c(0.5))
        pdf = g.mul(g.op("Exp", [g.mul(x2, c(-0.5))]), c(1 / math.sqrt(2 * math.pi)))
        d = g.add(cdf, g.mul(x, pdf))
    return [g.mul(gy, d)]


def _erf(g, node, gys):
    x = node.inputs[0]
    return [g.mul(gys[0], g.mul(g.op("Exp", [g.neg(g.mul(x, x))]), g.scalar(2 / math.sqrt(math.pi), x)))]


def _tanh(g, node, gys):
    y = node.outputs[0]
    return [g.mul(gys[0], g.sub(g.scalar(1.0, y), g.mul(y, y)))]


def _sigmoid(g, node, gys):
    y = node.outputs[0]
    return [g.mul(gys[0], g.mul(y, g.sub(g.scalar(1.0, y), y)))]


def _hard_swish(g, node, gys):
    # y = x * clip(x/6 + 1/2, 0, 1): y' = 0 (x < -3), 1 (x > 3), x/3 + 1/2 between
    x = node.inputs[0]
    c = lambda v: g.scalar(v, x)  # noqa: E731
    mid = g.add(g.mul(x, c(1 / 3)), c(0.5))
    d = g.op("Where", [g.op("Greater", [x, c(3.0)]), c(1.0),
                       g.op("Where", [g.op("Less", [x, c(-3.0)]), c(0.0), mid])])
    return [g.mul(gys[0], d)]


def _hard_sigmoid(g, node, gys):
    alpha = float(node.attrs.get("alpha", 0.2))
    y = node.outputs[0]
    inside = g.op("And", [g.op("Greater", [y, g.scalar(0.0, y)]), g.op("Less", [y, g.scalar(1.0, y)])])
    return [_mask(g, inside, g.mul(gys[0], g.scalar(alpha, y)), y)]


def _softplus(g, node, gys):
    return [g.mul(gys[0], g.op("Sigmoid", [node.inputs[0]]))]


def _sin(g, node, gys):
    return [g.mul(gys[0], g.op("Cos", [node.inputs[0]]))]


def _cos(g, node, gys):
    return [g.neg(g.mul(gys[0], g.op("Sin", [node.inputs[0]])))]


# ---------------------------------------------------------------- clip, cast, dropout, selection
def _clip(g, node, gys):
    x, y = node.inputs[0], node.outputs[0]
    gy = gys[0]
    lo = node.inputs[1] if _given(node, 1) else None
    hi = node.inputs[2] if _given(node, 2) else None
    dx = dlo = dhi = None
    if g.needs(0):
        # unclipped elements are passed through exactly
        dx = gy if lo is None and hi is None else _mask(g, g.op("Equal", [x, y]), gy, x)
    if lo is not None and g.needs(1):
        dlo = g.sum_to(_mask(g, g.op("Less", [x, lo]), gy, x), lo, src=x)
    if hi is not None and g.needs(2):
        dhi = g.sum_to(_mask(g, g.op("Greater", [x, hi]), gy, x), hi, src=x)
    return [dx, dlo, dhi]


def _cast_rule(g, node, gys):
    x, y = node.inputs[0], node.outputs[0]
    return [gys[0] if g.dtype(x) == g.dtype(y) else _cast(g, gys[0], x)]


def _dropout(g, node, gys):
    x = node.inputs[0]
    gy = gys[0]
    if gy is None:
        return [None]
    tm = node.inputs[2] if _given(node, 2) else None
    training = g.value(tm) if tm is not None else np.asarray(False)
    ratio = node.inputs[1] if _given(node, 1) else None
    rv = g.value(ratio) if ratio is not None else np.asarray(0.5)
    if (training is not None and not bool(np.asarray(training).reshape(-1)[0])) or \
            (rv is not None and float(np.asarray(rv).reshape(-1)[0]) == 0.0):
        return [gy]  # inference mode (or nothing dropped): identity
    if len(node.outputs) < 2 or not node.outputs[1].name:
        raise GradientError(f"Dropout node {node.name!r} in training mode: its gradient needs the mask output")
    # training: y = x * mask / (1 - ratio)
    if rv is not None:
        scale = g.scalar(1.0 / (1.0 - float(np.asarray(rv).reshape(-1)[0])), x)
    else:
        scale = g.div(g.scalar(1.0, x), g.sub(g.scalar(1.0, x), _cast(g, ratio, x)))
    if training is None:  # training_mode decided at run time
        scale = g.op("Where", [tm, scale, g.scalar(1.0, x)])
    return [g.mul(gy, g.mul(_cast(g, node.outputs[1], x), scale))]


def _where(g, node, gys):
    cond, a, b = node.inputs[:3]
    gy = gys[0]
    zero = g.scalar(0.0, node.outputs[0])
    da = g.sum_to(g.op("Where", [cond, gy, zero]), a) if g.needs(1) else None
    db = g.sum_to(g.op("Where", [cond, zero, gy]), b) if g.needs(2) else None
    return [None, da, db]


def _max_min(g, node, gys):
    # the gradient goes to the operand(s) equal to the result
    y, gy = node.outputs[0], gys[0]
    if len(node.inputs) == 1:
        return [gy]
    return [g.sum_to(_mask(g, g.op("Equal", [x, y]), gy, y), x) if g.needs(i) else None
            for i, x in enumerate(node.inputs)]


def _mean(g, node, gys):
    n = len(node.inputs)
    gm = g.mul(gys[0], g.scalar(1.0 / n, node.outputs[0])) if n > 1 else gys[0]
    return [g.sum_to(gm, x) if g.needs(i) else None for i, x in enumerate(node.inputs)]


RULES: dict[str, Rule] = {
    "Add": Rule(_add),
    "Sub": Rule(_sub),
    "Mul": Rule(_mul),
    "Div": Rule(_div),
    "Neg": Rule(_neg),
    "Identity": Rule(_identity),
    "Sum": Rule(_sum),
    "Pow": Rule(_pow),
    "Sqrt": Rule(_sqrt),
    "Exp": Rule(_exp),
    "Log": Rule(_log),
    "Abs": Rule(_abs),
    "Reciprocal": Rule(_reciprocal),
    "Relu": Rule(_relu),
    "LeakyRelu": Rule(_leaky_relu),
    "PRelu": Rule(_prelu),
    "Gelu": Rule(_gelu),
    "Erf": Rule(_erf),
    "Tanh": Rule(_tanh),
    "Sigmoid": Rule(_sigmoid),
    "HardSwish": Rule(_hard_swish),
    "HardSigmoid": Rule(_hard_sigmoid),
    "Softplus": Rule(_softplus),
    "Clip": Rule(_clip),
    "Cast": Rule(_cast_rule, inputs=(0,)),
    "Dropout": Rule(_dropout, inputs=(0,)),
    "Where": Rule(_where, inputs=(1, 2)),
    "Max": Rule(_max_min),
    "Min": Rule(_max_min),
    "Sin": Rule(_sin),
    "Cos": Rule(_cos),
    "Mean": Rule(_mean),
}
