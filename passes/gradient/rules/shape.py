"""Gradient rules: shape ops (data movement, no arithmetic on values).

Reshape-like ops reshape the gradient back to ``Shape(x)``; Concat/Split swap
into each other; Slice, Gather, GatherElements and Pad scatter the gradient
into zeros (repeated Gather indices accumulate); Expand and Tile sum the
copies.  Every size that is symbolic in the forward graph is read at run time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..context import GradientError
from .base import Rule

__all__ = ["BIG", "I64", "RULES"]

I64 = onnx.TensorProto.INT64
BIG = np.iinfo(np.int64).max  # "to the end" for Slice


def _present(node, i):
    return node.inputs[i] if len(node.inputs) > i and node.inputs[i].name else None


def _rank(g, node, t=None):
    r = g.rank(t if t is not None else node.inputs[0])
    if r is None:
        raise GradientError(f"{node.op} node {node.name!r}: input rank unknown")
    return r


def _dims(g, dims):
    """A 1-D int64 shape from ``[(forward tensor, axis), ...]`` (a constant when all are static)."""
    vals = []
    for t, i in dims:
        s = g.shape(t)
        vals.append(s[i] if s is not None else None)
    if all(isinstance(v, int) for v in vals):
        return g.ints(vals)
    return g.op("Concat", [g.dim_of(t, i) for t, i in dims], {"axis": 0})


def _dim_scalar(g, t, axis):
    s = g.shape(t)
    if s is not None and isinstance(s[axis], int):
        return g.const(np.asarray(s[axis], np.int64), hint="dim")
    return g.op("Squeeze", [g.dim_of(t, axis), g.ints([0])])


def _zeros(g, shape, like):
    zero = np.zeros((1,), dtype=g.dtype(like))
    return g.op("ConstantOfShape", [shape], {"value": gs.Constant(g.fresh("zero"), zero)})


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _transpose(g, t, perm):
    return t if list(perm) == sorted(perm) else g.transpose(t, perm)


def _to_i64(g, t):
    return t if g.dtype(t) == np.int64 else g.op("Cast", [t], {"to": I64})


def _index(g, idx, x, axis):
    """Gather-style indices as int64 in [0, dim) (negative ones count from the end)."""
    v = g.value(idx)
    s = g.shape(x)
    if v is not None:
        v = np.asarray(v).astype(np.int64)
        if not (v < 0).any():
            return g.const(v, hint="indices")
        if s is not None and isinstance(s[axis], int):
            return g.const(np.where(v < 0, v + s[axis], v), hint="indices")
    i = _to_i64(g, idx) if v is None else g.const(v, hint="indices")
    return g.op("Where", [g.op("Less", [i, g.const(np.asarray(0, np.int64))]), g.add(i, _dim_scalar(g, x, axis)), i])


def _arange(g, x, axis):
    """``[0, 1, ..., dim - 1]`` for dim ``axis`` of ``x`` (int64)."""
    return g.op("Range", [g.const(np.asarray(0, np.int64)), _dim_scalar(g, x, axis), g.const(np.asarray(1, np.int64))])


def _element(g, t, k):
    """Element ``k`` of the 1-D int tensor ``t`` as a 1-element int64 tensor."""
    v = g.value(t)
    return g.ints([int(v.reshape(-1)[k])]) if v is not None else g.op("Gather", [_to_i64(g, t), g.ints([k])])


def _onehot(g, i, x, axis):
    """``i[..., None] == arange(dim)`` in ``x``'s float type (for opsets without scatter-add)."""
    eq = g.op("Equal", [g.unsqueeze(i, [-1]), _arange(g, x, axis)])
    return g.op("Cast", [eq], {"to": onnx.helper.np_dtype_to_tensor_dtype(g.dtype(x))})


# ---------------------------------------------------------------- reshape-like
def _back_to(g, gy, x):
    """``gy`` reshaped to the forward tensor ``x``'s (run-time) shape."""
    s = g.static_shape(x)
    attrs = {"allowzero": 1} if g.opset >= 14 and (s is None or 0 in s) else {}  # a 0 dim is a size, not "copy"
    return g.op("Reshape", [gy, g.shape_of(x)], attrs)


def _reshape_like(g, node, gys):
    # Reshape/Flatten/Squeeze/Unsqueeze keep the elements in order: whatever
    # the attribute form (axes, allowzero, axis), reshape back to Shape(x).
    return [_back_to(g, gys[0], node.inputs[0])] + [None] * (len(node.inputs) - 1)


def _transpose_rule(g, node, gys):
    perm = node.attrs.get("perm")
    if perm is None:  # default: reversed axes, its own inverse
        return [g.op("Transpose", [gys[0]])]
    return [g.transpose(gys[0], _inverse([int(p) for p in perm]))]


# ---------------------------------------------------------------- concat / split
def _concat(g, node, gys):
    xs = node.inputs
    if len(xs) == 1:
        return [gys[0]]
    a = g.axis(node, "axis", 0)
    sizes = _dims(g, [(x, a) for x in xs])  # sizes along the axis, read at run time where symbolic
    return list(g.op("Split", [gys[0], sizes], {"axis": a}, n_out=len(xs)))


def _split(g, node, gys):
    a = g.axis(node, "axis", 0)
    parts = [gy if gy is not None else g.zeros_like(y) for gy, y in zip(gys, node.outputs)]
    gx = parts[0] if len(parts) == 1 else g.op("Concat", parts, {"axis": a})
    return [gx] + [None] * (len(node.inputs) - 1)


# ---------------------------------------------------------------- slice
def _slice(g, node, gys):
    x, y = node.inputs[0], node.outputs[0]
    r = _rank(g, node)
    starts, ends = node.inputs[1], node.inputs[2]
    axes_t, steps_t = _present(node, 3), _present(node, 4)
    sv, ev = g.value(starts), g.value(ends)
    n = len(sv.reshape(-1)) if sv is not None else (g.static_shape(starts) or (None,))[0]
    if n is None:
        raise GradientError(f"Slice node {node.name!r}: the number of sliced axes is unknown")
    axes = [a + r if a < 0 else a for a in (g.ints_of(axes_t, "Slice axes") if axes_t is not None else range(n))]
    stv = np.ones(n, np.int64) if steps_t is None else g.value(steps_t)
    xs = g.shape(x)
    pads = [0] * (2 * r)
    scatter = []  # (axis, positions along it: a constant or a run-time tensor)
    for j, a in enumerate(axes):
        if sv is not None and ev is not None and stv is not None and isinstance(xs[a], int):
            pos = range(xs[a])[slice(int(sv.reshape(-1)[j]), int(ev.reshape(-1)[j]), int(stv.reshape(-1)[j]))]
            if len(pos) == 0:
                return [g.zeros_like(x)] + [None] * (len(node.inputs) - 1)
            if pos.step == 1 or len(pos) == 1:  # a contiguous run: zero-pad around it
                pads[a], pads[r + a] = pos[0], xs[a] - 1 - pos[-1]
            else:
                scatter.append((a, g.ints(list(pos))))
        else:  # the positions are Slice applied to arange(dim): ONNX's own clamping, at run time
            step = g.ints([1]) if steps_t is None else _element(g, steps_t, j)
            scatter.append((a, g.op("Slice", [_arange(g, x, a), _element(g, starts, j), _element(g, ends, j),
                                              g.ints([0]), step])))
    cur = g.op("Pad", [gys[0], g.ints(pads)]) if any(pads) else gys[0]
    sliced = {a for a, _ in scatter}
    done = set(range(r)) - sliced  # axes where cur already has x's size
    for a, pos in scatter:
        cur_shape = _dims(g, [(x if i in done else y, i) for i in range(r)])
        done.add(a)
        target = _dims(g, [(x if i in done else y, i) for i in range(r)])
        idx = g.op("Expand", [g.reshape(pos, g.ints([1] * a + [-1] + [1] * (r - a - 1))), cur_shape])
        cur = g.op("ScatterElements", [_zeros(g, target, x), idx, cur], {"axis": a})
    return [cur] + [None] * (len(node.inputs) - 1)


# ---------------------------------------------------------------- gather
def _gather(g, node, gys):
    x, idx = node.inputs[:2]
    gy = gys[0]
    r, q = _rank(g, node), _rank(g, node, idx)
    a = g.axis(node, "axis", 0)
    i = _index(g, idx, x, a)
    # Work with x's axis `a` moved to the front: gy then is idx.shape + the other dims of x.
    perm_x = [a] + list(range(a)) + list(range(a + 1, r))
    gyt = _transpose(g, gy, list(range(a, a + q)) + list(range(a)) + list(range(a + q, r - 1 + q)))
    shape_t = _dims(g, [(x, p) for p in perm_x])
    if g.opset >= 16:  # repeated indices accumulate
        out = g.op("ScatterND", [_zeros(g, shape_t, x), g.unsqueeze(i, [-1]), gyt], {"reduction": "add"})
    else:  # one-hot^T @ gy: [dim, N] x [N, rest]
        n = g.ints([int(np.prod(g.static_shape(idx)))]) if g.static_shape(idx) is not None else \
            g.reshape(g.op("Size", [idx]), g.ints([1]))
        oh = _onehot(g, g.reshape(i, g.ints([-1])), x, a)
        g2 = g.reshape(gyt, g.op("Concat", [n, g.ints([-1])], {"axis": 0}))
        out = g.reshape(g.op("Gemm", [oh, g2], {"transA": 1}), shape_t)
    return [_transpose(g, out, _inverse(perm_x)), None]


def _gather_elements(g, node, gys):
    x, idx = node.inputs[:2]
    gy = gys[0]
    r = _rank(g, node)
    a = g.axis(node, "axis", 0)
    i = _index(g, idx, x, a)
    if g.opset >= 16:
        return [g.op("ScatterElements", [g.zeros_like(x), i, gy], {"axis": a, "reduction": "add"}), None]
    # No scatter-add before opset 16: sum gy * onehot(i) over the axis, move the one-hot axis there.
    s = g.reduce_sum(g.mul(g.unsqueeze(gy, [-1]), _onehot(g, i, x, a)), [a], keepdims=False)
    out = g.transpose(s, list(range(a)) + [r - 1] + list(range(a, r - 1))) if a != r - 1 else s
    sx, si = g.shape(x), g.shape(idx)
    if si is None or any(k != a and (sx[k] != si[k] or sx[k] is None) for k in range(r)):
        # idx may be smaller than x on the other axes: zero-pad at the end
        mask = g.ints([0 if k == a else 1 for k in range(r)])
        tail = g.mul(g.sub(g.shape_of(x), g.shape_of(idx)), mask)
        out = g.op("Pad", [out, g.op("Concat", [g.ints([0] * r), tail], {"axis": 0})])
    return [out, None]


# ---------------------------------------------------------------- broadcasting copies
def _expand(g, node, gys):
    return [g.sum_to(gys[0], node.inputs[0]), None]


def _tile(g, node, gys):
    x, reps = node.inputs[:2]
    r = _rank(g, node)
    rv = g.value(reps)
    # y = x repeated as whole blocks: view each tiled axis (k*d) as [k, d] and sum over the k's.
    if rv is not None:
        parts, red = [], []  # parts: a repeat count (int) or the axis of x (str "k")
        for k, rep in enumerate(int(v) for v in np.asarray(rv).reshape(-1)):
            if rep != 1:
                red.append(len(parts))
                parts.append(rep)
            parts.append(str(k))
        if not red:
            return [gys[0], None]
        sx = g.static_shape(x)
        if sx is not None:
            target = g.ints([p if isinstance(p, int) else sx[int(p)] for p in parts])
        else:
            target = g.op("Concat", [g.ints([p]) if isinstance(p, int) else g.dim_of(x, int(p)) for p in parts],
                          {"axis": 0})
    else:  # run-time repeats: interleave [k0, d0, k1, d1, ...]
        inter = g.op("Concat", [g.unsqueeze(_to_i64(g, reps), [1]), g.unsqueeze(g.shape_of(x), [1])], {"axis": 1})
        target, red = g.reshape(inter, g.ints([-1])), list(range(0, 2 * r, 2))
    return [g.reduce_sum(g.reshape(gys[0], target), red, keepdims=False), None]


# ---------------------------------------------------------------- pad
def _pad(g, node, gys):
    x, pads = node.inputs[:2]
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise GradientError(f"Pad node {node.name!r}: no gradient for mode {mode!r} (only 'constant' is supported)")
    gy = gys[0]
    axes = _present(node, 3)  # opset 18+: pads name these axes only
    if axes is None:
        n = _rank(g, node)
    else:
        n = len(g.value(axes).reshape(-1)) if g.value(axes) is not None else (g.static_shape(axes) or (None,))[0]
    if n is None:
        raise GradientError(f"Pad node {node.name!r}: the number of padded axes is unknown")
    ax = g.ints(range(n)) if axes is None else axes
    # Pad(p) = zero-pad by max(p, 0) after cropping by max(-p, 0): undo it as
    # Slice off the padding, then zero-fill what the negative pads cropped.
    pv = g.value(pads)
    if pv is not None:
        pv = [int(p) for p in np.asarray(pv).reshape(-1)]
        pb, pe = pv[:n], pv[n:]
        starts = [max(p, 0) for p in pb]
        ends = [-p if p > 0 else BIG for p in pe]
        gx = gy if not any(starts) and all(e == BIG for e in ends) else \
            g.op("Slice", [gy, g.ints(starts), g.ints(ends), ax])
        crop = [max(-p, 0) for p in pv]
        if any(crop):
            gx = g.op("Pad", [gx, g.ints(crop)] + ([None, axes] if axes is not None else []))
    else:
        p = _to_i64(g, pads)
        zero = g.ints([0])
        pb = g.op("Slice", [p, zero, g.ints([n])])
        pe = g.op("Slice", [p, g.ints([n]), g.ints([2 * n])])
        ends = g.op("Where", [g.op("Greater", [pe, zero]), g.neg(pe), g.ints([BIG])])
        gx = g.op("Slice", [gy, g.op("Max", [pb, zero]), ends, ax])
        gx = g.op("Pad", [gx, g.op("Max", [g.neg(p), zero])] + ([None, axes] if axes is not None else []))
    gc = None
    cv = _present(node, 2)
    if cv is not None and g.needs(2):  # constant_value fills every element of y not taken from x
        total = g.sub(g.op("ReduceSum", [gy], {"keepdims": 0}), g.op("ReduceSum", [gx], {"keepdims": 0}))
        gc = total if g.rank(cv) == 0 else g.reshape(total, g.shape_of(cv))
    return [gx if g.needs(0) else None, None, gc] + [None] * (len(node.inputs) - 3)


RULES: dict[str, Rule] = {
    "Reshape": Rule(_reshape_like, inputs=(0,)),
    "Flatten": Rule(_reshape_like, inputs=(0,)),
    "Squeeze": Rule(_reshape_like, inputs=(0,)),
    "Unsqueeze": Rule(_reshape_like, inputs=(0,)),
    "Transpose": Rule(_transpose_rule, inputs=(0,)),
    "Concat": Rule(_concat),
    "Split": Rule(_split, inputs=(0,)),
    "Slice": Rule(_slice, inputs=(0,)),
    "Gather": Rule(_gather, inputs=(0,)),
    "GatherElements": Rule(_gather_elements, inputs=(0,)),
    "Expand": Rule(_expand, inputs=(0,)),
    "Tile": Rule(_tile, inputs=(0,)),
    "Pad": Rule(_pad, inputs=(0, 2)),
    # Shape and Size give integers: never on a gradient path, no rule.
}
