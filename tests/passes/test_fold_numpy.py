"""fold_numpy: the numpy evaluation of common ops that fold_constants tries
before onnx's reference evaluator.  Every handled form is compared, bit for
bit (dtype, shape, bytes), with ``reference_evaluator`` on the same one-node
model; forms it does not handle return None; FoldConstants uses it only with
the default evaluator."""

import ml_dtypes
import numpy as np
import onnx.reference
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import FoldConstants
from passes.fold_constants import reference_evaluator
from passes.fold_numpy import HANDLED_OPS, evaluate
from tests.helpers import apply, make_model, ops, vi

H = helper.make_node
RNG = np.random.default_rng(17)
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
I32 = lambda *v: np.array(v, dtype=np.int32)  # noqa: E731

BOOL = np.dtype(np.bool_)
SIGNED = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64)]
UNSIGNED = [np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64)]
FLOATS = [np.dtype(t) for t in (np.float16, np.float32, np.float64)]
NUMERIC = SIGNED + UNSIGNED + FLOATS
PLAIN = [BOOL, *NUMERIC]
SHAPES = [(), (0,), (5,), (2, 3), (3, 0, 2)]
PAIRS = [((), ()), ((3, 4), (4,)), ((2, 1, 3), (1, 4, 1)), ((0, 3), (3,)), ((2, 3), ())]


def arr(shape, dtype, *, low=None, high=None) -> np.ndarray:
    """Random values with the edge cases of the type mixed in (nan, +-inf, -0.0,
    the integer extremes)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype == BOOL:
        return np.asarray(RNG.random(shape) < 0.5)
    if dtype in FLOATS:
        v = RNG.normal(size=n) * 10 if low is None else RNG.uniform(low, high, n)
        if low is None and n >= 4:
            v[RNG.choice(n, 4, replace=False)] = [np.nan, np.inf, -np.inf, -0.0]
        return v.astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    lo = max(info.min, -100 if low is None else low)
    hi = min(info.max, 100 if high is None else high)
    v = RNG.integers(lo, hi, size=n, endpoint=True, dtype=dtype)
    if low is None and n >= 2:
        v[RNG.choice(n, 2, replace=False)] = [info.min, info.max]
    return v.reshape(shape)


def reference(op, inputs, opset, attrs):
    """What fold_constants gets today: the reference evaluator on a one-node model."""
    names = [f"x{i}" if x is not None else "" for i, x in enumerate(inputs)]
    proto_attrs = {k: numpy_helper.from_array(v, k) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    node = H(op, names, ["y"], **proto_attrs)
    feeds = {n: x for n, x in zip(names, inputs) if n}
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape)) for n, x in feeds.items()]
    g = helper.make_graph([node], "fold", vis, [helper.make_empty_tensor_value_info("y")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return reference_evaluator(m, feeds)


def check(op, inputs, opset=17, handled=True, **attrs):
    """fold_numpy's result is the reference's, bit for bit; where the reference
    fails, fold_numpy gives none (None, or an exception the pass treats as None)."""
    try:
        expected = reference(op, inputs, opset, attrs)
    except Exception:
        expected = None
    try:
        got = evaluate(op, opset, attrs, inputs)
    except Exception:
        got = None
    if expected is None:
        assert got is None, f"{op}: the reference fails, fold_numpy gave {got}"
        return None
    if not handled:
        assert got is None
        return expected
    assert got is not None, f"{op} opset {opset} {[getattr(x, 'dtype', None) for x in inputs]} {attrs}: not handled"
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert isinstance(g, np.ndarray)
        assert g.dtype == e.dtype and g.shape == e.shape, (op, g.dtype, e.dtype, g.shape, e.shape)
        assert g.tobytes() == np.ascontiguousarray(e).tobytes(), (op, g, e)
    return got


# --- elementwise ----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Min", "Max", "Equal", "Less", "Greater"])
@pytest.mark.parametrize("dtype", NUMERIC)
def test_binary_matches_reference(op, dtype):
    for sa, sb in PAIRS:
        check(op, [arr(sa, dtype), arr(sb, dtype)])
        check(op, [arr(sb, dtype), arr(sa, dtype)])


def test_integer_div_truncates_like_the_reference_and_divides_by_zero_like_it():
    for dtype in SIGNED + UNSIGNED:
        x = arr((50,), dtype)
        y = arr((50,), dtype)
        y[:3] = 0
        check("Div", [x, y])
    check("Div", [I64(-7, 7, -7, 7, -1, 0), I64(2, -2, -2, 2, 3, 5)])
    info = np.iinfo(np.int32)
    check("Div", [I32(info.min, info.min), I32(-1, 1)])


def test_bool_equal_and_logic_match_reference():
    for sa, sb in PAIRS:
        a, b = arr(sa, BOOL), arr(sb, BOOL)
        for op in ("Equal", "And", "Or"):
            check(op, [a, b])
        check("Not", [a])


def test_min_max_variadic_matches_reference():
    for dtype in (np.int32, np.float32, np.float16):
        check("Min", [arr((3,), dtype)])
        check("Max", [arr((2, 3), dtype), arr((3,), dtype), arr((1, 1), dtype)])
        check("Min", [arr((4,), dtype), arr((4,), dtype), arr((), dtype)])


@pytest.mark.parametrize("dtype", NUMERIC)
def test_unary_matches_reference(dtype):
    for shape in SHAPES:
        x = arr(shape, dtype)
        check("Abs", [x])
        check("Identity", [x])
        if dtype in SIGNED or dtype in FLOATS:
            check("Neg", [x])
        if dtype in FLOATS:
            check("Sqrt", [x])
            check("Sqrt", [np.asarray(np.abs(x))])


def test_where_matches_reference():
    for dtype in PLAIN:
        check("Where", [arr((2, 3), BOOL), arr((3,), dtype), arr((2, 1), dtype)])
        check("Where", [arr((), BOOL), arr((), dtype), arr((), dtype)])
        check("Where", [arr((0, 3), BOOL), arr((3,), dtype), arr((), dtype)])


# --- Cast -------------------------------------------------------------------------------

CAST_TO = {np.dtype(helper.tensor_dtype_to_np_dtype(t)): t for t in (
    TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
    TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.FLOAT16, TensorProto.FLOAT,
    TensorProto.DOUBLE)}


@pytest.mark.parametrize("src", PLAIN)
def test_cast_matches_reference(src):
    for shape in ((7, 3), (), (0,)):
        x = arr(shape, src)
        for dst, to in CAST_TO.items():
            check("Cast", [x], opset=13, to=to)
            check("Cast", [x], opset=21, to=to, saturate=0)
    if src in FLOATS:  # out of range for the narrow types, fractions, huge
        with np.errstate(over="ignore"):
            x = np.array([0.5, -0.5, 1.5, 300.7, -300.7, 70000.0, 1e30, -1e30], np.float64).astype(src)
        for to in CAST_TO.values():
            check("Cast", [x], to=to)


# --- shapes and data movement ------------------------------------------------------------


def test_shape_and_size_match_reference():
    for shape in SHAPES + [(2, 3, 4, 5)]:
        x = arr(shape, np.float32)
        check("Shape", [x], opset=13)
        check("Size", [x])
        for start in (None, 0, 1, -1, -3, 7):
            for end in (None, 0, 2, -1, -5, 9):
                attrs = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
                check("Shape", [x], opset=15, **attrs)
    check("Shape", [arr((2, 3), np.int8)], opset=13, start=1, handled=False)  # no attributes before opset 15


def test_reshape_matches_reference():
    x = arr((2, 3, 4), np.float16)
    for shape in (I64(6, 4), I64(-1), I64(0, -1), I64(0, 0, 4), I64(4, 0, 2, -1), I64(24), I64(5, -1), I64(2, 3, 0)):
        check("Reshape", [x, shape], opset=13)
        check("Reshape", [x, shape], opset=14)
        check("Reshape", [x, shape], opset=19, allowzero=0)
    z = arr((0, 3), np.int64)
    check("Reshape", [z, I64(3, 0)], opset=19, allowzero=1)
    check("Reshape", [z, I64(0, 3)], opset=14, allowzero=1)
    check("Reshape", [arr((), np.bool_), I64(1, 1)], opset=13)
    check("Reshape", [arr((1,), np.int32), I64()], opset=13)


def test_unsqueeze_matches_reference_in_both_forms():
    for shape in ((), (3,), (2, 3)):
        x = arr(shape, np.int32)
        r = len(shape)
        for axes in ([0], [-1], [0, 1], [r + 1, 0], [-1, -2], [1, 0]):
            check("Unsqueeze", [x], opset=11, axes=axes)
            check("Unsqueeze", [x, np.array(axes, np.int64)], opset=13)
        check("Unsqueeze", [x, I64(0, 0)], opset=13)  # duplicate: the reference fails
    check("Unsqueeze", [arr((2,), np.float32)], opset=13, axes=[0], handled=False)


def test_squeeze_matches_reference_in_both_forms():
    for shape in ((1,), (1, 3, 1), (2, 1), (1, 1, 1), (0, 1)):
        x = arr(shape, np.float32)
        check("Squeeze", [x], opset=11)
        check("Squeeze", [x], opset=13)
        check("Squeeze", [x, None], opset=13)
        for axes in ([0], [-1], [0, -1], [0, 2], [2, 0]):  # the attribute form removes the last axis first
            check("Squeeze", [x], opset=11, axes=axes)
            check("Squeeze", [x, np.array(axes, np.int64)], opset=13)
    check("Squeeze", [arr((1, 3), np.float32), I64()], opset=13)


def test_concat_matches_reference():
    for dtype in (np.int64, np.float32, np.bool_):
        a, b, c = arr((2, 3), dtype), arr((2, 0), dtype), arr((2, 1), dtype)
        for axis in (1, -1):
            check("Concat", [a, b, c], axis=axis)
        check("Concat", [a, arr((4, 3), dtype)], axis=0)
        check("Concat", [a], axis=-2)
        check("Concat", [arr((), dtype), arr((), dtype)], axis=0)  # 0-d: the reference fails
        check("Concat", [a, c], axis=2)
    check("Concat", [I64(1), I32(2)], axis=0, handled=False)  # mixed types


def test_gather_matches_reference():
    data = arr((4, 5, 3), np.float32)
    for idx_type in (np.int32, np.int64):
        for axis in (None, 0, 1, -1, 2):
            dim = data.shape[axis or 0]
            for ind in (arr((2, 3), idx_type, low=-dim, high=dim - 1), np.array(1, idx_type), np.array([], idx_type),
                        np.array(-1, idx_type), np.array([dim], idx_type)):
                attrs = {} if axis is None else {"axis": axis}
                check("Gather", [data, ind], **attrs)
    check("Gather", [I64(5, 6, 7), I64(-1)])
    check("Gather", [I64(5, 6, 7), np.array(2, np.int64)])


def test_slice_matches_reference():
    x = arr((5, 6, 4), np.float64)
    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    cases = [
        (I64(1), I64(3), None, None),
        (I64(0, 1), I64(big, -1), I64(0, 2), None),
        (I64(-2), I64(small), I64(-1), I64(-1)),
        (I64(4, 0), I64(small, 6), I64(0, 1), I64(-2, 3)),
        (I64(1, 1), I64(3, 4), None, I64(1, 2)),
        (I64(3), I64(1), I64(1), None),
        (I32(0), I32(2), I32(-2), I32(1)),
        (I64(0), I64(2), I64(0), I64(0)),  # step 0: the reference fails
    ]
    for starts, ends, axes, steps in cases:
        ins = [x, starts, ends, axes, steps]
        while ins[-1] is None:
            ins.pop()
        check("Slice", ins, opset=13)
    check("Slice", [I64(1, 2, 3), I64(1), I64(2)], opset=9, handled=False)


def test_transpose_expand_tile_match_reference():
    for dtype in (np.float16, np.int8, np.bool_):
        x = arr((2, 3, 4), dtype)
        check("Transpose", [x])
        check("Transpose", [x], perm=[1, 2, 0])
        check("Transpose", [x], perm=[0, 2, 1])
        check("Transpose", [arr((), dtype)])
        check("Transpose", [x], perm=[1, 0])  # wrong length: the reference fails
        for shape in (I64(2, 3, 4), I64(3, 2, 1, 4), I64(4), I64(1, 1), I64(), I64(2, 0, 1, 4)):
            check("Expand", [x, shape])
        check("Expand", [arr((3, 1), dtype), I64(2, 1, 5)])
        for reps in (I64(1, 2, 1), I64(0, 1, 3), I64(2, 2, 2)):
            check("Tile", [x, reps])


def test_constant_of_shape_matches_reference():
    for shape in (I64(2, 3), I64(), I64(0, 4), I64(5)):
        check("ConstantOfShape", [shape])
        for value in (np.array([7], np.int64), np.array([-0.0], np.float32), np.array([np.nan], np.float16),
                      np.array([True]), np.array([3], np.uint8), np.array([1.5], np.float64)):
            check("ConstantOfShape", [shape], value=value)
    check("ConstantOfShape", [I64(2)], value=np.array([1, 2], np.int64))  # not a single value: the reference fails


def test_range_matches_reference():
    for dtype in (np.int16, np.int32, np.int64, np.float32, np.float64):
        for start, limit, delta in ((0, 10, 1), (10, 0, -3), (5, 5, 1), (-4, 7, 2), (3, 0, 1)):
            check("Range", [np.array(v, dtype) for v in (start, limit, delta)])
    for start, limit, delta in ((0.1, 1.0, 0.1), (1.0, -1.0, -0.3), (0.0, 1.0, 1 / 3)):
        for dtype in (np.float32, np.float64):
            check("Range", [np.array(v, dtype) for v in (start, limit, delta)])
    check("Range", [np.array(v, np.float16) for v in (0, 3, 1)], handled=False)  # the reference's stash_type path


# --- forms not handled ---------------------------------------------------------------------


def test_unhandled_forms_return_none():
    f = arr((2, 3), np.float32)
    bf16 = np.ones((2,), ml_dtypes.bfloat16)
    assert "Exp" not in HANDLED_OPS and evaluate("Exp", 17, {}, [f]) is None
    assert evaluate("Cast", 17, {"to": TensorProto.BFLOAT16}, [f]) is None
    assert evaluate("Cast", 17, {"to": TensorProto.STRING}, [f]) is None
    assert evaluate("Cast", 17, {"to": TensorProto.FLOAT}, [bf16]) is None  # ml_dtypes input
    assert evaluate("Cast", 17, {"to": TensorProto.FLOAT, "saturate": 1}, [f]) is None  # saturate before opset 19
    assert evaluate("Cast", 25, {"to": TensorProto.FLOAT, "round_mode": "up"}, [f]) is None
    assert evaluate("Add", 17, {}, [f, f.astype(np.float64)]) is None  # mixed types
    assert evaluate("Add", 17, {}, [np.array([True]), np.array([False])]) is None  # bool arithmetic
    assert evaluate("Add", 17, {"alpha": 1.0}, [f, f]) is None  # an attribute the op does not have
    assert evaluate("Gather", 17, {"axis": 1.0}, [f, I64(0)]) is None  # a FLOAT where an INT belongs
    assert evaluate("Transpose", 17, {"perm": []}, [f]) is None  # an empty list (the export fails today)
    assert evaluate("Transpose", 17, {"perm": I64(1, 0)}, [f]) is None  # a TENSOR where INTS belong
    assert evaluate("Squeeze", 13, {"axes": [0]}, [f]) is None  # attribute form after opset 13
    assert evaluate("Unsqueeze", 11, {}, [f, I64(0)]) is None  # input form before opset 13
    assert evaluate("Reshape", 4, {}, [f, I64(6)]) is None
    assert evaluate("Reshape", 13, {"allowzero": 1}, [f, I64(6)]) is None  # allowzero before opset 14
    assert evaluate("Sqrt", 17, {}, [I64(4)]) is None
    assert evaluate("Neg", 17, {}, [np.array([1], np.uint8)]) is None
    assert evaluate("Identity", 17, {}, [np.array(["a"], object)]) is None
    assert evaluate("Where", 17, {}, [I64(1), f, f]) is None  # non-bool condition


# --- FoldConstants --------------------------------------------------------------------------


class CountingReference(onnx.reference.ReferenceEvaluator):
    made = 0

    def __init__(self, *args, **kwargs):
        type(self).made += 1
        super().__init__(*args, **kwargs)


@pytest.fixture
def counted_reference(monkeypatch):
    """Counts the reference evaluators the default evaluator makes."""
    CountingReference.made = 0
    monkeypatch.setattr(onnx.reference, "ReferenceEvaluator", CountingReference)
    return CountingReference


def _shape_chain_model():
    """A TorchScript-style shape computation on constants: every node folds."""
    nodes = [
        H("Shape", ["w"], ["s"]),
        H("Gather", ["s", "i1"], ["d1"], axis=0),
        H("Unsqueeze", ["d1", "ax0"], ["u"]),
        H("Concat", ["m1", "u"], ["shape"], axis=0),
        H("Reshape", ["w", "shape"], ["w2"]),
        H("Cast", ["d1"], ["d1f"], to=TensorProto.FLOAT),
        H("Sqrt", ["d1f"], ["r"]),
        H("Div", ["w2", "r"], ["w3"]),
        H("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(np.array([1.5], np.float32), "v")),
        H("Mul", ["w3", "ones"], ["w4"]),
        H("Range", ["z", "d1", "one"], ["rg"]),
        H("Equal", ["rg", "z"], ["eq"]),
        H("Where", ["eq", "m1", "rg"], ["wh"]),
        H("Squeeze", ["u", "ax0"], ["sq"]),
        H("Slice", ["wh", "ax0", "u"], ["sl"]),
        H("Transpose", ["w4"], ["wt"], perm=[1, 0]),
        H("MatMul", ["x", "wt"], ["y0"]),
        H("Cast", ["sl"], ["slf"], to=TensorProto.FLOAT),
        H("ReduceSum", ["slf"], ["rs"], keepdims=0),
        H("Add", ["y0", "rs"], ["y"]),
    ]
    inits = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0, "i1": np.array(1, np.int64), "ax0": I64(0), "m1": I64(-1),
             "z": np.array(0, np.int64), "one": np.array(1, np.int64)}
    return make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 3])], inits, opset=17)


def test_default_evaluator_folds_handled_ops_without_the_reference(counted_reference):
    m = _shape_chain_model()
    out, (res,) = apply(m, FoldConstants())
    assert ops(out) == ["MatMul", "Add"]
    # ReduceSum is not handled: the one reference evaluator made
    assert counted_reference.made == 1 and res.stats["op_ReduceSum"] == 1


def test_numpy_folds_equal_the_reference_folds():
    m = _shape_chain_model()
    via_reference = lambda model, feeds: reference_evaluator(model, feeds)  # noqa: E731  (not the default: no numpy path)
    out_np, (res_np,) = apply(m, FoldConstants())
    out_ref, (res_ref,) = apply(m, FoldConstants(evaluator=via_reference))
    assert res_np.stats == res_ref.stats
    assert out_np.SerializeToString() == out_ref.SerializeToString()


def test_custom_evaluator_is_still_called(counted_reference):
    seen = []

    def custom(model, feeds):
        seen.extend(n.op_type for n in model.graph.node)
        return reference_evaluator(model, feeds)

    m = make_model([H("Mul", ["a", "b"], ["c"]), H("Add", ["x", "c"], ["y"])], [vi("x", [3])], [vi("y", [3])],
                   {"a": arr((3,), np.float32), "b": arr((3,), np.float32)})
    out, (res,) = apply(m, FoldConstants(evaluator=custom))
    assert seen == ["Mul"] and ops(out) == ["Add"] and res.stats["op_Mul"] == 1
    assert counted_reference.made == 1  # through the custom evaluator, which calls the reference


def test_unhandled_node_falls_back_to_the_reference(counted_reference):
    m = make_model([H("Exp", ["a"], ["c"]), H("Add", ["x", "c"], ["y"])], [vi("x", [3])], [vi("y", [3])],
                   {"a": arr((3,), np.float32)})
    out, (res,) = apply(m, FoldConstants())
    assert ops(out) == ["Add"] and res.stats["op_Exp"] == 1 and counted_reference.made == 1


def test_numpy_failure_falls_back_and_is_counted_like_the_reference(counted_reference):
    # Reshape to an impossible shape: numpy raises, the reference raises too: skipped, counted
    m = make_model([H("Reshape", ["a", "s"], ["c"]), H("Add", ["x", "c"], ["y"])], [vi("x", [5])], [vi("y", [5])],
                   {"a": arr((6,), np.float32), "s": I64(5)})
    out, (res,) = apply(m, FoldConstants())
    assert ops(out) == ["Reshape", "Add"] and res.stats.get("skipped_evaluator_error") == 1
    assert counted_reference.made == 1
