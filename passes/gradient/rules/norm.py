"""Gradient rules: normalizations and softmax (Softmax, LogSoftmax,
LayerNormalization, BatchNormalization in its inference form).

Softmax and LogSoftmax differentiate from their output ``y`` alone.
LayerNormalization stashes nothing the backward can rely on (Mean/InvStdDev are
optional outputs), so the statistics are recomputed from ``X``; the reductions
keep their dims, so leading (batch, sequence) dims stay symbolic.
BatchNormalization in inference form is an affine map per channel (axis 1).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from ..context import GradientError
from .base import Rule

__all__ = ["RULES"]


def _where(node) -> str:
    return f"{node.op} node {node.name!r}"


def _given(node, i):
    return i < len(node.inputs) and bool(node.inputs[i].name)


def _to(g, t, dtype):
    """``t`` cast to ``dtype`` (Cast with ``to``: legal at every opset >= 13)."""
    return g.op("Cast", [t], {"to": int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))})


def _sum_parts(g, parts):
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else g.op("Sum", parts)


# ---------------------------------------------------------------- softmax
def _softmax_axis(node) -> list[int]:
    # ReduceSum takes negative axes, so the rank need not be known.
    return [int(node.attrs.get("axis", -1))]


def _softmax(g, node, gys):
    # y = softmax(x): gx = y * (gy - sum(gy * y)) along the axis
    y, gy = node.outputs[0], gys[0]
    return [g.mul(y, g.sub(gy, g.reduce_sum(g.mul(gy, y), _softmax_axis(node))))]


def _log_softmax(g, node, gys):
    # y = x - logsumexp(x): gx = gy - softmax(x) * sum(gy), softmax(x) = exp(y)
    y, gy = node.outputs[0], gys[0]
    return [g.sub(gy, g.mul(g.op("Exp", [y]), g.reduce_sum(gy, _softmax_axis(node))))]


# ---------------------------------------------------------------- layer normalization
def _mean(g, t, axes):
    """ReduceMean over ``axes``, dims kept (axes an attribute before opset 18, an input from 18)."""
    if g.opset >= 18:
        return g.op("ReduceMean", [t, g.ints(axes)], {"keepdims": 1})
    return g.op("ReduceMean", [t], {"axes": list(axes), "keepdims": 1})


def _ln_dtype(g, node, x) -> np.dtype:
    """The backward's float type: X's, widened to the stash type (float16 X with the
    default stash_type=1 was normalized in float32 by the forward, so is its gradient)."""
    xt = g.dtype(x)
    try:
        st = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs.get("stash_type", 1))))
    except Exception:  # 0 (undefined) or not a float type: X's own
        return xt
    return st if st.kind == "f" and st.itemsize > xt.itemsize else xt


def _inv_count(g, x, axes, stat, dt):
    """1 / (elements per normalized group) as a ``dt`` scalar (read at run time when a dim is symbolic)."""
    s = g.shape(x)
    dims = [s[a] for a in axes]
    if all(isinstance(d, int) for d in dims):
        return g.const(np.asarray(1.0 / max(1, math.prod(dims)), dt), hint="scalar")
    return g.div(_to(g, g.op("Size", [stat]), dt), _to(g, g.op("Size", [x]), dt))


def _ln_stats(g, x, axes, eps):
    """The forward's statistics, recomputed: mean, istd = 1/sqrt(var + eps), xhat = (x - mean) * istd."""
    mean = _mean(g, x, axes)
    xc = g.sub(x, mean)
    istd = g.op("Reciprocal", [g.op("Sqrt", [g.add(_mean(g, g.mul(xc, xc), axes), eps)])])
    return mean, istd, g.mul(xc, istd)


def _ln_dx_from_y(g, gy, scale, axes, istd, xhat):
    # y = xhat * scale + b: dx = istd * (gxh - mean(gxh) - xhat * mean(gxh * xhat)), gxh = gy * scale
    gxh = g.mul(gy, scale)
    centered = g.sub(gxh, _mean(g, gxh, axes))
    return g.mul(istd, g.sub(centered, g.mul(xhat, _mean(g, g.mul(gxh, xhat), axes))))


def _ln_dx_from_stats(g, gmean, gistd, inv_n, istd, xhat):
    # Mean = mean(x): d/dx = 1/n;  InvStdDev = (var + eps)^-1/2: d/dx = -istd^2 * xhat / n
    t = gmean
    if gistd is not None:
        u = g.neg(g.mul(g.mul(gistd, g.mul(istd, istd)), xhat))
        t = u if t is None else g.add(t, u)
    return g.mul(t, inv_n)


def _layer_norm(g, node, gys):
    x, scale = node.inputs[:2]
    bias = node.inputs[2] if _given(node, 2) else None
    gy, gmean, gistd = (list(gys) + [None, None])[:3]
    r = g.rank(x)
    if r is None:
        raise GradientError(f"{_where(node)}: the rank of X is unknown (the normalized axes cannot be told)")
    axes = list(range(g.axis(node, default=-1), r))
    db = g.sum_to(gy, bias) if bias is not None and g.needs(2) else None
    need_x = g.needs(0) and (gy is not None or gmean is not None or gistd is not None)
    need_s = g.needs(1) and gy is not None
    if not (need_x or need_s):
        return [None, None, db]
    dt = _ln_dtype(g, node, x)

    def up(t, like):  # into the compute type (``like``: the forward tensor whose type ``t`` has)
        return t if t is None or g.dtype(like) == dt else _to(g, t, dt)

    def down(t, like):  # back to the forward tensor's type
        return t if t is None or g.dtype(like) == dt else _to(g, t, g.dtype(like))

    eps = g.const(np.asarray(float(node.attrs.get("epsilon", 1e-5)), dt), hint="scalar")
    mean, istd, xhat = _ln_stats(g, up(x, x), axes, eps)
    gyu = up(gy, node.outputs[0])
    ds = down(g.sum_to(g.mul(gyu, xhat), scale), scale) if need_s else None
    dx = None
    if need_x:
        parts = [_ln_dx_from_y(g, gyu, up(scale, scale), axes, istd, xhat) if gy is not None else None]
        if gmean is not None or gistd is not None:
            inv_n = _inv_count(g, x, axes, mean, dt)
            gm = up(gmean, node.outputs[1]) if gmean is not None else None
            gi = up(gistd, node.outputs[2]) if gistd is not None else None
            parts.append(_ln_dx_from_stats(g, gm, gi, inv_n, istd, xhat))
        dx = down(_sum_parts(g, parts), x)
    return [dx, ds, db]


# ---------------------------------------------------------------- batch normalization (inference)
def _batch_norm(g, node, gys):
    training = int(node.attrs.get("training_mode", 0))
    if g.opset < 14:  # BatchNormalization-9: the training form is told by its extra outputs
        training = training or any(o.name for o in node.outputs[1:])
    if training:
        raise GradientError(f"{_where(node)}: training mode (batch statistics, running-stat updates) has no "
                            "gradient rule; only the inference form (training_mode=0) is differentiated")
    x, scale, bias, mean, var = node.inputs[:5]
    r = g.rank(x)
    if r is None or r < 2:
        raise GradientError(f"{_where(node)}: X must have a known rank >= 2 (N, C, ...), got {r}")
    gy = gys[0]
    dt = g.dtype(x)

    def up(p):  # opset 15 lets scale/B (T1) and mean/var (T2) differ from X's type
        return p if g.dtype(p) == dt else _to(g, p, dt)

    def down(t, p):
        return t if g.dtype(p) == dt else _to(g, t, g.dtype(p))

    def col(p):  # [C] -> [C, 1, ...] against [N, C, ...]
        return g.unsqueeze(p, list(range(1, r - 1))) if r > 2 else p

    def per_channel(t):  # [N, C, ...] -> [C]
        return g.reduce_sum(t, [0, *range(2, r)], keepdims=False)

    eps = g.const(np.asarray(float(node.attrs.get("epsilon", 1e-5)), dt), hint="scalar")
    # y = (x - mean) * k + b, k = scale * inv, inv = (var + eps)^-1/2
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.add(up(var), eps)])])
    k = g.mul(up(scale), inv) if g.needs(0) or g.needs(3) or g.needs(4) else None
    dx = g.mul(gy, col(k)) if g.needs(0) else None
    sum_gy = per_channel(gy) if g.needs(2) or g.needs(3) else None
    sum_gy_xc = per_channel(g.mul(gy, g.sub(x, col(up(mean))))) if g.needs(1) or g.needs(4) else None
    ds = down(g.mul(sum_gy_xc, inv), scale) if g.needs(1) else None
    db = down(sum_gy, bias) if g.needs(2) else None
    dm = down(g.neg(g.mul(sum_gy, k)), mean) if g.needs(3) else None
    # d inv / d var = -inv^3 / 2
    dv = down(g.mul(g.mul(sum_gy_xc, k), g.mul(g.mul(inv, inv), g.const(np.asarray(-0.5, dt), hint="scalar"))),
              var) if g.needs(4) else None
    return [dx, ds, db, dm, dv]


RULES: dict[str, Rule] = {
    "Softmax": Rule(_softmax, inputs=(0,)),
    "LogSoftmax": Rule(_log_softmax, inputs=(0,)),
    "LayerNormalization": Rule(_layer_norm, inputs=(0, 1, 2)),
    "BatchNormalization": Rule(_batch_norm, inputs=(0, 1, 2, 3, 4)),
}
