"""Exact numpy evaluation of the ops constant folding meets most often.

``fold_constants`` evaluates a foldable node with onnx's ``ReferenceEvaluator``
by default: a one-node model and a fresh evaluator per node (milliseconds
each), and the first fold imports ``onnx.reference.ops`` (~80 ms).  For the ops
below :func:`evaluate` computes the same result directly: each form it accepts
runs the very numpy calls the reference implementation (onnx 1.23,
``onnx/reference/ops/op_*.py``) runs for that opset, so dtype, shape and bytes
are the reference's.  Every other form -- an op not listed, an attribute or
input it does not know, a dtype outside plain numpy (bfloat16, float8, int4,
strings), an opset whose reference class differs -- returns None ("not
handled") and the caller falls back to the reference evaluator.  An exception
raised here is also a fallback (the reference then raises its own, or not).

Inputs are the node's input values in order (None for an omitted optional
input); attributes are plain Python (int, list of int) or, for tensor
attributes, numpy arrays -- as the reference sees them after the graph's
export.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["HANDLED_OPS", "evaluate"]

_BOOL = np.dtype(np.bool_)
_SIGNED = frozenset(np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64))
_UNSIGNED = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))
_INTS = _SIGNED | _UNSIGNED
_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))
_NUMERIC = _INTS | _FLOATS
_PLAIN = _NUMERIC | {_BOOL}
_INDEX = frozenset(np.dtype(t) for t in (np.int32, np.int64))
_I64 = np.dtype(np.int64)
_RANGE_TYPES = frozenset(np.dtype(t) for t in (np.int16, np.int32, np.int64, np.float32, np.float64))

# TensorProto data types a Cast may target here (plain numpy types only).
_CAST_TO = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: _BOOL,
    10: np.dtype(np.float16), 11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

_Impl = Callable[[int, dict[str, Any], list[Any]], "tuple[Any, ...] | None"]
_IMPLS: dict[str, _Impl] = {}


def _op(*names: str):
    def register(fn: _Impl) -> _Impl:
        for n in names:
            _IMPLS[n] = fn
        return fn

    return register


def evaluate(op: str, opset: int, attrs: dict[str, Any], inputs: Sequence[Any]) -> list[np.ndarray] | None:
    """The outputs of default-domain ``op`` at ``opset`` on constant ``inputs``,
    or None when this module does not handle that form (use the reference)."""
    impl = _IMPLS.get(op)
    if impl is None:
        return None
    args = list(inputs)
    for x in args:
        if x is not None and (not isinstance(x, np.ndarray) or x.dtype not in _PLAIN):
            return None
    norm: dict[str, Any] = {}
    for k, v in attrs.items():
        v = _attr(v)
        if v is None:
            return None
        norm[k] = v
    # inf/nan are results like any other (the reference runs under the same state)
    with np.errstate(all="ignore"):
        res = impl(opset, norm, args)
    if res is None:
        return None
    # the reference turns numpy scalars (a ufunc on 0-d arrays) into 0-d arrays
    out = [np.array(r) if np.isscalar(r) else r for r in res]
    if not all(isinstance(r, np.ndarray) and r.dtype in _PLAIN for r in out):
        return None
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and _INT64_MIN <= v <= _INT64_MAX


def _attr(v: Any) -> Any:
    """The value the reference sees for attribute ``v`` (INT: int, INTS: list of
    int, TENSOR: array), or None for any other kind (not handled here)."""
    if _is_int(v):
        return int(v)
    if isinstance(v, (list, tuple)) and v and all(_is_int(i) for i in v):
        return [int(i) for i in v]
    if isinstance(v, np.ndarray) and v.dtype in _PLAIN:
        return v
    return None


def _only(attrs: dict[str, Any], *allowed: str, ints: Sequence[str] = ()) -> bool:
    """Every attribute is one of ``allowed``; those in ``ints`` are single ints,
    the others lists of ints."""
    for k, v in attrs.items():
        if k not in allowed or not isinstance(v, int if k in ints else list):
            return False
    return True


def _all_given(args: list[Any], n: int) -> bool:
    return len(args) == n and all(a is not None for a in args)


# ---- shape and data movement ----


@_op("Identity")
def _identity(opset, attrs, args):
    if attrs or not _all_given(args, 1):
        return None
    return (args[0].copy(),)


@_op("Shape")
def _shape(opset, attrs, args):
    if not _all_given(args, 1):
        return None
    data = args[0]
    if opset < 15:  # Shape_1
        return None if attrs else (np.array(data.shape, dtype=np.int64),)
    if not _only(attrs, "start", "end", ints=("start", "end")):  # Shape_15
        return None
    start, end = attrs.get("start", 0), attrs.get("end")
    n = len(data.shape)
    if start == 0:
        if end is None:
            return (np.array(data.shape, dtype=np.int64),)
        ab = (0, n + end) if end < 0 else (0, end)
    elif end is None:
        ab = (start, n)
    else:
        ab = (start, n + end) if end < 0 else (start, end)
    return (np.array(data.shape[ab[0] : ab[1]], dtype=np.int64),)


@_op("Size")
def _size(opset, attrs, args):
    if attrs or not _all_given(args, 1):
        return None
    return (np.array(args[0].size, dtype=np.int64),)


@_op("Cast")
def _cast(opset, attrs, args):
    if not _all_given(args, 1):
        return None
    # Cast_1 (to), Cast_19 (to, saturate), Cast_24 (to, saturate, round_mode): the
    # extra attributes only matter for float8 targets, which are not handled here
    allowed = ("to",) if opset < 19 else ("to", "saturate")
    if "to" not in attrs or not _only(attrs, *allowed, ints=allowed):
        return None
    dtype = _CAST_TO.get(attrs["to"])
    if dtype is None:
        return None
    return (args[0].astype(dtype),)


@_op("Reshape")
def _reshape(opset, attrs, args):
    if opset < 5 or not _all_given(args, 2):
        return None
    data, shape = args
    if shape.dtype != _I64 or shape.ndim != 1:
        return None
    if opset < 14:  # Reshape_5
        if attrs:
            return None
        allowzero = 0
    else:  # Reshape_14
        if not _only(attrs, "allowzero", ints=("allowzero",)):
            return None
        allowzero = attrs.get("allowzero", 0) == 1
    # onnx.reference.ops.op_reshape.reshape_reference_implementation
    new_shape = np.copy(shape)
    if allowzero == 0:
        zeros_index = np.where(shape == 0)
        new_shape[zeros_index] = np.array(data.shape)[zeros_index]
    return (np.reshape(data, new_shape),)


@_op("Unsqueeze")
def _unsqueeze(opset, attrs, args):
    if opset < 13:  # Unsqueeze_1 / Unsqueeze_11: axes attribute, inserted one at a time in order
        if not _all_given(args, 1) or set(attrs) != {"axes"} or not _only(attrs, "axes"):
            return None
        sq = args[0]
        for a in attrs["axes"]:
            sq = np.expand_dims(sq, axis=a)
        return (sq,)
    if attrs or not _all_given(args, 2):  # Unsqueeze_13: axes input
        return None
    data, axes = args
    if axes.dtype != _I64 or axes.ndim != 1:
        return None
    return (np.expand_dims(data, axis=tuple(axes)),)


@_op("Squeeze")
def _squeeze(opset, attrs, args):
    if opset < 13:  # Squeeze_1 / Squeeze_11: optional axes attribute, removed last first
        if not _all_given(args, 1) or not _only(attrs, "axes"):
            return None
        if "axes" not in attrs:
            return (np.squeeze(args[0], axis=None),)
        sq = args[0]
        for a in reversed(attrs["axes"]):
            sq = np.squeeze(sq, axis=a)
        return (sq,)
    if attrs or not args or len(args) > 2 or args[0] is None:  # Squeeze_13: optional axes input
        return None
    data = args[0]
    axes = args[1] if len(args) == 2 else None
    if axes is None:
        return (np.squeeze(data),)
    if axes.dtype != _I64 or axes.ndim != 1:
        return None
    return (np.squeeze(data, axis=tuple(axes)),)


@_op("Concat")
def _concat(opset, attrs, args):
    if set(attrs) != {"axis"} or not _only(attrs, "axis", ints=("axis",)):
        return None
    if not args or any(a is None for a in args):
        return None
    dtype = args[0].dtype
    if any(a.dtype != dtype for a in args):  # mixed types (numpy would promote them): left to the reference
        return None
    axis = attrs["axis"]
    for a in args:
        rank = len(a.shape)
        if rank == 0 or not -rank <= axis < rank:
            return None  # the reference raises
    return (np.concatenate(tuple(args), axis),)


@_op("Gather")
def _gather(opset, attrs, args):
    if not _all_given(args, 2) or not _only(attrs, "axis", ints=("axis",)):
        return None
    x, indices = args
    if indices.dtype not in _INDEX:
        return None
    return (np.take(x, indices, axis=attrs.get("axis", 0)),)


@_op("Slice")
def _slice(opset, attrs, args):
    if opset < 10 or attrs or not 3 <= len(args) <= 5:  # Slice_10 only: inputs, no attributes
        return None
    data, starts, ends = args[:3]
    axes = args[3] if len(args) > 3 else None
    steps = args[4] if len(args) > 4 else None
    if data is None or starts is None or ends is None:
        return None
    for v in (starts, ends, axes, steps):
        if v is not None and (v.dtype not in _INDEX or v.ndim != 1):
            return None
    if len({len(v) for v in (starts, ends, axes, steps) if v is not None}) != 1:
        return None
    # onnx.reference.ops.op_slice._slice
    if axes is None:
        if steps is None:
            slices = [slice(s, e) for s, e in zip(starts, ends)]
        else:
            slices = [slice(s, e, d) for s, e, d in zip(starts, ends, steps)]
    else:
        slices = [slice(0, a) for a in data.shape]
        if steps is None:
            for s, e, a in zip(starts, ends, axes):
                slices[a] = slice(s, e)
        else:
            for s, e, a, d in zip(starts, ends, axes, steps):
                slices[a] = slice(s, e, d)
    return (data[tuple(slices)],)


@_op("Transpose")
def _transpose(opset, attrs, args):
    if not _all_given(args, 1) or not _only(attrs, "perm"):
        return None
    data = args[0]
    perm = attrs.get("perm")
    if perm is None:
        return (np.transpose(data),)
    if len(perm) != len(data.shape):
        return None  # the reference raises
    return (np.transpose(data, axes=perm),)


@_op("Expand")
def _expand(opset, attrs, args):
    if attrs or not _all_given(args, 2):
        return None
    data, shape = args
    if shape.dtype != _I64 or shape.ndim != 1:
        return None
    # onnx.reference.ops.op_expand.common_reference_implementation
    return (data * np.ones(shape, dtype=data.dtype),)


@_op("Tile")
def _tile(opset, attrs, args):
    if attrs or not _all_given(args, 2):
        return None
    x, repeats = args
    if repeats.dtype != _I64 or repeats.ndim != 1:
        return None
    return (np.tile(x, repeats),)


# ---- constants ----


@_op("ConstantOfShape")
def _constant_of_shape(opset, attrs, args):
    if not _all_given(args, 1) or not set(attrs) <= {"value"}:
        return None
    data = args[0]
    if data.dtype != _I64 or data.ndim != 1:
        return None
    if "value" not in attrs:
        value = np.array(0, dtype=np.float32)
    else:
        v = attrs["value"]
        if not isinstance(v, np.ndarray) or v.size != 1:
            return None
        value = v.flat[0]
    return (np.full(tuple(data), value),)


@_op("Range")
def _range(opset, attrs, args):
    if opset < 11 or attrs or not _all_given(args, 3):
        return None
    starts, ends, steps = args
    dtype = starts.dtype
    # the types Range takes, less float16 (the reference's stash_type path)
    if dtype not in _RANGE_TYPES:
        return None
    if any(a.dtype != dtype or a.size != 1 for a in args):
        return None
    return (np.arange(starts.item(), ends.item(), steps.item()).astype(dtype),)


# ---- elementwise ----


def _binary(args, dtypes) -> bool:
    return _all_given(args, 2) and args[0].dtype == args[1].dtype and args[0].dtype in dtypes


def _make_arith(ufunc):
    def impl(opset, attrs, args):
        if attrs or not _binary(args, _NUMERIC):
            return None
        res = ufunc(*args)
        return None if res.dtype != args[0].dtype else (res,)

    return impl


_IMPLS["Add"] = _make_arith(np.add)
_IMPLS["Sub"] = _make_arith(np.subtract)
_IMPLS["Mul"] = _make_arith(np.multiply)


@_op("Div")
def _div(opset, attrs, args):
    if attrs or not _binary(args, _NUMERIC):
        return None
    x, y = args
    if x.dtype in _INTS:
        # onnx.reference.ops.op_div: truncation toward zero
        q = np.floor_divide(x, y)
        r = np.remainder(x, y)
        needs_adjust = (r != 0) & ((x < 0) ^ (y < 0))
        res = q + needs_adjust.astype(q.dtype)
    else:
        res = np.divide(x, y)
    if res.dtype != x.dtype:
        res = res.astype(x.dtype)
    return (res,)


def _make_min_max(ufunc):
    def impl(opset, attrs, args):
        if attrs or not args or any(a is None for a in args):
            return None
        dtype = args[0].dtype
        if dtype not in _NUMERIC or any(a.dtype != dtype for a in args):
            return None
        if len(args) == 1:
            return (args[0].copy(),)
        a = args[0]
        for b in args[1:]:
            a = ufunc(a, b)
        return (a,) if a.dtype == dtype else None

    return impl


_IMPLS["Min"] = _make_min_max(np.minimum)
_IMPLS["Max"] = _make_min_max(np.maximum)


@_op("Neg")
def _neg(opset, attrs, args):
    if attrs or not _all_given(args, 1) or args[0].dtype not in (_SIGNED | _FLOATS):
        return None
    return (np.negative(args[0]),)


@_op("Abs")
def _abs(opset, attrs, args):
    if attrs or not _all_given(args, 1) or args[0].dtype not in _NUMERIC:
        return None
    return (np.absolute(args[0]),)


@_op("Sqrt")
def _sqrt(opset, attrs, args):
    if attrs or not _all_given(args, 1) or args[0].dtype not in _FLOATS:
        return None
    x = args[0]
    return (np.sqrt(x).astype(x.dtype),)


def _make_compare(ufunc, dtypes):
    def impl(opset, attrs, args):
        if attrs or not _binary(args, dtypes):
            return None
        return (ufunc(*args),)

    return impl


_IMPLS["Equal"] = _make_compare(np.equal, _PLAIN)
_IMPLS["Less"] = _make_compare(np.less, _NUMERIC)
_IMPLS["Greater"] = _make_compare(np.greater, _NUMERIC)
_IMPLS["And"] = _make_compare(np.logical_and, {_BOOL})
_IMPLS["Or"] = _make_compare(np.logical_or, {_BOOL})


@_op("Not")
def _not(opset, attrs, args):
    if attrs or not _all_given(args, 1) or args[0].dtype != _BOOL:
        return None
    return (np.logical_not(args[0]),)


@_op("Where")
def _where(opset, attrs, args):
    if attrs or not _all_given(args, 3):
        return None
    cond, x, y = args
    if cond.dtype != _BOOL or x.dtype != y.dtype:
        return None
    return (np.where(cond, x, y).astype(x.dtype),)


HANDLED_OPS = frozenset(_IMPLS)
