"""Gradient rules: convolutions and pooling (Conv, ConvTranspose, AveragePool,
GlobalAveragePool, MaxPool).

Conv and ConvTranspose are each other's adjoint: the input gradient of one is
the other applied to the output gradient with the same weight, strides,
dilations and group, then fitted to the input (the padding cropped off, rows
that no window reached zero-filled).  The weight gradient is one grouped Conv
that correlates the activations with the output gradient, strides and
dilations swapped.  AveragePool is a depthwise convolution with a ones kernel
scaled per window; MaxPool routes the gradient to the argmax through its
``Indices``.  Pads come from the attributes; ``auto_pad`` SAME (and
ConvTranspose's ``output_shape``) needs the static sizes that derive them.
Batch and spatial sizes stay symbolic: they are read from ``Shape`` at run time.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from ..context import GradientError
from .base import Rule

__all__ = ["RULES"]


# ---------------------------------------------------------------- helpers
def _where(node):
    return f"{node.op} node {node.name!r}"


def _rank(g, node, t):
    r = g.rank(t)
    if r is None or r < 3:
        raise GradientError(f"{_where(node)}: the rank of {t.name!r} is unknown (or below 3)")
    return r


def _str(v):
    return v.decode() if isinstance(v, bytes) else v


def _present(node, i):
    return len(node.inputs) > i and bool(node.inputs[i].name)


def _sizes(g, t, head=()):
    """``head`` then ``t``'s spatial sizes (dims 2...) as a 1-D int64 tensor (a constant when static)."""
    s = g.shape(t)
    if s is None:
        raise GradientError(f"{_where(g.node)}: the shape of {t.name!r} is unknown")
    if all(isinstance(v, int) for v in s[2:]):
        return g.ints(list(head) + list(s[2:]))
    sp = g.op("Slice", [g.shape_of(t), g.ints([2]), g.ints([len(s)])])
    return g.op("Concat", [g.ints(head), sp], {"axis": 0}) if head else sp


def _static_spatial(t_shape):
    sp = list(t_shape[2:]) if t_shape is not None else [None]
    return sp if all(isinstance(v, int) for v in sp) else None


def _fill(g, value, shape, like):
    """A tensor of ``value`` shaped by the 1-D int64 ``shape``, in ``like``'s element type."""
    v = gs.Constant(g.fresh("fill"), np.full((1,), value, dtype=g.dtype(like)))
    return g.op("ConstantOfShape", [shape], {"value": v})


def _fit(g, z, x, begins, lengths=None):
    """``z``'s spatial axes cropped to ``x``'s sizes from ``begins`` on and zero-filled
    at the end where ``z`` is shorter (positions no window reached).
    ``lengths``: ``z``'s spatial sizes when they are static, else None."""
    r = len(g.shape(x))
    axes = list(range(2, r))
    dims = _static_spatial(g.shape(x))
    if dims is not None and lengths is not None:  # everything known: emit only what is needed
        ends = [b + d for b, d in zip(begins, dims)]
        if any(begins) or any(n > e for n, e in zip(lengths, ends)):
            z = g.op("Slice", [z, g.ints(begins), g.ints(ends), g.ints(axes)])
        tail = [d - max(0, min(e, n) - min(b, n)) for d, b, e, n in zip(dims, begins, ends, lengths)]
        return g.op("Pad", [z, g.ints([0] * (r + 2) + tail)]) if any(tail) else z
    size = _sizes(g, x)
    z = g.op("Slice", [z, g.ints(begins), g.add(g.ints(begins), size), g.ints(axes)])
    tail = g.sub(size, g.op("Slice", [g.op("Shape", [z]), g.ints([2]), g.ints([r])]))
    return g.op("Pad", [z, g.op("Concat", [g.ints([0] * (r + 2)), tail], {"axis": 0})])


def _window(g, node, n, w=None):
    """Kernel, strides and dilations per spatial axis (static ints)."""
    k = node.attrs.get("kernel_shape")
    if k is None and w is not None:
        sw = g.shape(w)
        k = list(sw[2:]) if sw is not None and len(sw) == n + 2 else None
    if k is None or not all(isinstance(v, int) for v in k):
        raise GradientError(f"{_where(node)}: the kernel size is unknown (no kernel_shape, weight shape not static)")
    s = list(node.attrs.get("strides", [1] * n))
    d = list(node.attrs.get("dilations", [1] * n))
    return [int(v) for v in k], [int(v) for v in s], [int(v) for v in d]


def _split_total(total, upper):
    """(begin, end) of a SAME padding total: SAME_UPPER puts the odd one at the end."""
    return (total // 2, total - total // 2) if upper else (total - total // 2, total // 2)


def _forward_pads(g, node, x, k, s, d):
    """Begin and end pads of a Conv or pool node (auto_pad SAME derived from the static sizes)."""
    n = len(k)
    auto = _str(node.attrs.get("auto_pad", "NOTSET"))
    if auto == "VALID":
        return [0] * n, [0] * n
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        dims = _static_spatial(g.shape(x))
        if dims is None:
            raise GradientError(f"{_where(node)}: auto_pad {auto} on {x.name!r} with symbolic spatial dims "
                                f"{g.shape(x)[2:]}: the pads cannot be derived")
        totals = [max(0, (-(-D // st) - 1) * st + (kk - 1) * dd + 1 - D) for D, st, kk, dd in zip(dims, s, k, d)]
        pb, pe = zip(*(_split_total(t, auto == "SAME_UPPER") for t in totals))
        return list(pb), list(pe)
    pads = [int(v) for v in node.attrs.get("pads", [0] * (2 * n))]
    return pads[:n], pads[n:]


def _full_len(g, y, k, s, d):
    """Static length per axis of ConvTranspose(y) with no pads (None when y's sizes are symbolic)."""
    o = _static_spatial(g.shape(y))
    return None if o is None else [(oo - 1) * st + (kk - 1) * dd + 1 for oo, st, kk, dd in zip(o, s, k, d)]


def _weight_grad(g, a, b, a_like, group, k, s, d, pb, pe, r):
    """dW[g*Cb + m, c, j] = sum_{n,o} a[n, g*Ca + c, o*s + j*d - pb] * b[n, g*Cb + m, o]
    (``a`` the padded, strided operand, shaped like the forward tensor ``a_like``).
    One grouped Conv with the batch as its channels and ``b`` as its kernel, strides
    and dilations swapped, gives [Ca, G*Cb, >= k...]: sliced to k, transposed."""
    perm = [1, 0] + list(range(2, r))
    if group == 1:
        at = g.transpose(a, perm)  # [Ca, N, ...]
    else:  # [N, G, Ca, ...] -> [Ca, G, N, ...] -> [Ca, G*N, ...]: channel g*N + n for group g
        a5 = g.reshape(a, _sizes(g, a_like, [0, group, -1]))
        at = g.reshape(g.transpose(a5, [2, 1, 0] + list(range(3, r + 1))), _sizes(g, a_like, [0, -1]))
    bt = g.transpose(b, perm)  # [G*Cb, N, ...]: output channel g*Cb + m reads group g
    z = g.op("Conv", [at, bt], {"group": group, "strides": d, "dilations": s, "pads": pb + pe})
    z = g.op("Slice", [z, g.ints([0] * len(k)), g.ints(k), g.ints(range(2, r))])
    return g.transpose(z, perm)


def _bias_grad(g, gy, r):
    return g.reduce_sum(gy, [0] + list(range(2, r)), keepdims=False)


# ---------------------------------------------------------------- Conv
def _conv(g, node, gys):
    x, w = node.inputs[:2]
    gy, r = gys[0], _rank(g, node, x)
    k, s, d = _window(g, node, r - 2, w)
    pb, pe = _forward_pads(g, node, x, k, s, d)
    group = int(node.attrs.get("group", 1))
    out = [None] * len(node.inputs)
    if g.needs(0):  # ConvTranspose scatters each window back over the padded input; crop the padding
        z = g.op("ConvTranspose", [gy, w], {"strides": s, "dilations": d, "group": group})
        out[0] = _fit(g, z, x, pb, _full_len(g, node.outputs[0], k, s, d))
    if g.needs(1):
        out[1] = _weight_grad(g, x, gy, x, group, k, s, d, pb, pe, r)
    if _present(node, 2) and g.needs(2):
        out[2] = _bias_grad(g, gy, r)
    return out


# ---------------------------------------------------------------- ConvTranspose
def _transpose_pads(g, node, x, k, s, d, op):
    """Begin and end pads (what is cropped off the full output) of a ConvTranspose node."""
    n = len(k)
    auto = _str(node.attrs.get("auto_pad", "NOTSET"))
    shape = node.attrs.get("output_shape")
    if shape is None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * n) if auto == "VALID" else [int(v) for v in node.attrs.get("pads", [0] * (2 * n))]
        return pads[:n], pads[n:]
    if shape is not None:  # total = full length - requested length; needs x's sizes
        dims = _static_spatial(g.shape(x))
        if dims is None:
            raise GradientError(f"{_where(node)}: output_shape with symbolic spatial dims {g.shape(x)[2:]} "
                                f"on {x.name!r}: the pads cannot be derived")
        totals = [st * (D - 1) + p + (kk - 1) * dd + 1 - int(o)
                  for D, st, p, kk, dd, o in zip(dims, s, op, k, d, list(shape)[-n:])]
    else:  # SAME: output = input * stride, whatever the input size
        totals = [p + (kk - 1) * dd + 1 - st for st, p, kk, dd in zip(s, op, k, d)]
    if any(t < 0 for t in totals):  # runtimes disagree on growing the output past its full size
        raise GradientError(f"{_where(node)}: the requested output is larger than the full one (pads {totals})")
    pb, pe = zip(*(_split_total(t, auto == "SAME_UPPER") for t in totals))
    return list(pb), list(pe)


def _conv_transpose(g, node, gys):
    x, w = node.inputs[:2]
    gy, r = gys[0], _rank(g, node, x)
    k, s, d = _window(g, node, r - 2, w)
    op = [int(v) for v in node.attrs.get("output_padding", [0] * (r - 2))]
    pb, pe = _transpose_pads(g, node, x, k, s, d, op)
    group = int(node.attrs.get("group", 1))
    # y[i*s + j*d - pb] += x[i] * w[j]: the Conv with the same pads reads it back (with
    # output_padding >= stride it has windows past x's end: cut off).
    out = [None] * len(node.inputs)
    if g.needs(0):
        z = g.op("Conv", [gy, w], {"strides": s, "dilations": d, "group": group, "pads": pb + pe})
        if any(p >= st for p, st in zip(op, s)):
            z = g.op("Slice", [z, g.ints([0] * (r - 2)), _sizes(g, x), g.ints(range(2, r))])
        out[0] = z
    if g.needs(1):  # the Conv weight gradient with x and gy in swapped roles
        out[1] = _weight_grad(g, gy, x, node.outputs[0], group, k, s, d, pb, pe, r)
    if _present(node, 2) and g.needs(2):
        out[2] = _bias_grad(g, gy, r)
    return out


# ---------------------------------------------------------------- pooling
def _average_pool(g, node, gys):
    x, y = node.inputs[0], node.outputs[0]
    r = _rank(g, node, x)
    k, s, d = _window(g, node, r - 2)
    pb, pe = _forward_pads(g, node, x, k, s, d)
    ceil = int(node.attrs.get("ceil_mode", 0))
    axes = g.ints(range(2, r))
    # y[o] = scale[o] * sum of window o.  scale = AveragePool(ones) / (real elements in
    # window o): the runtime's own divisor, whichever count_include_pad / ceil_mode clipping.
    ones = _fill(g, 1.0, _sizes(g, x, [1, 1]), x)
    kernel = g.const(np.ones([1, 1] + k, dtype=g.dtype(x)), hint="ones_kernel")
    ends = [e + st - 1 if ceil else e for e, st in zip(pe, s)]  # ceil_mode: room for a last, partial window
    real = g.op("Conv", [ones, kernel], {"strides": s, "dilations": d, "pads": pb + ends})
    if ceil:
        real = g.op("Slice", [real, g.ints([0] * (r - 2)), _sizes(g, y), axes])
    real = g.op("Max", [real, g.scalar(1.0, x)])  # windows over padding only
    if int(node.attrs.get("count_include_pad", 0)):
        scale = g.div(g.op("AveragePool", [ones], dict(node.attrs)), real)
    else:
        scale = g.op("Reciprocal", [real])
    # Every (n, c) as its own image: one ones-kernel ConvTranspose spreads each window's share.
    z = g.reshape(g.mul(gys[0], scale), _sizes(g, y, [-1, 1]))
    z = g.op("ConvTranspose", [z, kernel], {"strides": s, "dilations": d})
    z = _fit(g, z, x, pb, _full_len(g, y, k, s, d))
    return [g.reshape(z, g.shape_of(x))]


def _global_average_pool(g, node, gys):
    x = node.inputs[0]
    _rank(g, node, x)
    dims = _static_spatial(g.shape(x))
    if dims is not None:
        count = g.scalar(float(math.prod(dims)), x)
    else:
        n = g.op("ReduceProd", [_sizes(g, x)], {"keepdims": 0})
        count = g.op("Cast", [n], {"to": int(helper.np_dtype_to_tensor_dtype(g.dtype(x)))})
    return [g.op("Expand", [g.div(gys[0], count), g.shape_of(x)])]


def _max_pool(g, node, gys):
    x = node.inputs[0]
    r = _rank(g, node, x)
    if g.opset < 16:  # no scatter-add: each input element may be the argmax of one window only
        k, s, d = _window(g, node, r - 2)
        if any(st < (kk - 1) * dd + 1 for kk, st, dd in zip(k, s, d)):
            raise GradientError(f"{_where(node)}: overlapping windows need ScatterElements reduction='add' "
                                f"(opset >= 16, the model has {g.opset})")
    if len(node.outputs) > 1 and node.outputs[1].name and not int(node.attrs.get("storage_order", 0)):
        idx = node.outputs[1]
    else:  # re-run for row-major flat indices over N*C*H*W
        attrs = {**node.attrs, "storage_order": 0}
        idx = g.op("MaxPool", [x], attrs, n_out=2)[1]
    st = g.static_shape(x)
    size = g.ints([math.prod(st)]) if st is not None else g.reshape(g.op("Size", [x]), g.ints([1]))
    flat = [g.reshape(t, g.ints([-1])) for t in (idx, gys[0])]
    attrs = {"axis": 0, "reduction": "add"} if g.opset >= 16 else {"axis": 0}
    gx = g.op("ScatterElements", [_fill(g, 0.0, size, x), *flat], attrs)
    return [g.reshape(gx, g.shape_of(x))]


RULES: dict[str, Rule] = {
    "Conv": Rule(_conv, inputs=(0, 1, 2)),
    "ConvTranspose": Rule(_conv_transpose, inputs=(0, 1, 2)),
    "AveragePool": Rule(_average_pool, inputs=(0,)),
    "GlobalAveragePool": Rule(_global_average_pool, inputs=(0,)),
    "MaxPool": Rule(_max_pool, inputs=(0,)),
}
