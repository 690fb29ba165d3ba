"""The npu pipeline's graph preparation: -inf mask fill values bounded,
Where(c, 0, k) lowered exactly, NaN guards dropped."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes import to_graph, to_model
from passes.npu_prep import BoundInfiniteConstants, DropNanGuards, LowerMaskWhere
from tests.helpers import assert_same_on_ort, run

H = helper.make_node


def _mask_model(fill: float, zero_first: bool = True) -> onnx.ModelProto:
    a, b = ("zero", "fill") if zero_first else ("fill", "zero")
    nodes = [H("Cast", ["m"], ["mb"], to=TensorProto.BOOL), H("Where", ["mb", a, b], ["w"], name="where"),
             H("Add", ["x", "w"], ["s"]), H("Softmax", ["s"], ["p"], axis=-1),
             H("IsNaN", ["p"], ["nan"]), H("Where", ["nan", "zero", "p"], ["y"], name="guard")]
    inits = [numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
             numpy_helper.from_array(np.array([fill], np.float32), "fill")]
    g = helper.make_graph(nodes, "mask", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                                          helper.make_tensor_value_info("m", TensorProto.INT64, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32) * 3,
         "m": np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)}


def _apply(m, *passes):
    g, env = to_graph(m)
    stats = [p(g).stats for p in passes]
    return stats, to_model(g, env)


def test_lower_mask_where_is_exact():
    for zero_first in (True, False):
        m = _mask_model(-1e4, zero_first)
        stats, out = _apply(m, LowerMaskWhere())
        assert stats == [{"where_lowered": 1}]
        assert [n.op_type for n in out.graph.node].count("Where") == 1  # only the guard is left
        assert_same_on_ort(m, out, FEEDS, rtol=0, atol=0)


def test_bound_infinite_fill_value_keeps_softmax():
    m = _mask_model(-np.inf)
    stats, out = _apply(m, BoundInfiniteConstants())
    assert stats == [{"constants_bounded": 1}]
    fill = next(t for t in out.graph.initializer if t.name == "fill")
    assert numpy_helper.to_array(fill).tolist() == [-100.0]
    # masked weights stay ~0: exp(-100) is below fp32's normal range
    assert_same_on_ort(m, out, FEEDS, rtol=1e-6, atol=1e-30)


def test_finite_stand_ins_for_minus_inf_are_bounded_too():
    """float32's lowest value (Llama dynamo exports), fp16's -65504 and -10000 act
    as -inf and would spend the quantized range: bounded like -inf; -50 is kept."""
    for fill in (float(np.finfo(np.float32).min), -65504.0, -1e4):
        m = _mask_model(fill)
        stats, out = _apply(m, BoundInfiniteConstants())
        assert stats == [{"constants_bounded": 1}], fill
        fill_t = next(t for t in out.graph.initializer if t.name == "fill")
        assert numpy_helper.to_array(fill_t).tolist() == [-100.0]
        assert_same_on_ort(m, out, FEEDS, rtol=1e-6, atol=1e-30)
    stats, _ = _apply(_mask_model(-50.0), BoundInfiniteConstants())
    assert stats == [{}]


def test_drop_nan_guard():
    m = _mask_model(-1e4)
    stats, out = _apply(m, DropNanGuards())
    assert stats == [{"nan_guards_dropped": 1}]
    assert not any(n.name == "guard" for n in out.graph.node)
    assert_same_on_ort(m, out, FEEDS, rtol=0, atol=0)
    np.testing.assert_array_equal(run(out, FEEDS)[0], run(m, FEEDS)[0])


def test_transpose_of_size_one_dims_becomes_reshape():
    """[1, C, 1, 1] -> [1, 1, 1, C] moves only size-1 dims: a Reshape (QNN aborts the
    process on that Transpose after a Gather); one that reorders data is kept."""
    from passes.npu_prep import TransposeToReshape

    nodes = [H("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1], name="layer_scale"),
             H("Transpose", ["z"], ["u"], perm=[1, 0], name="real_transpose")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 1, 1]),
                                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 1, 1, 6]),
                           helper.make_tensor_value_info("u", TensorProto.FLOAT, [3, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    stats, out = _apply(m, TransposeToReshape())
    assert stats == [{"transposes_reshaped": 1}]
    assert {n.name: n.op_type for n in out.graph.node} == {"layer_scale": "Reshape", "real_transpose": "Transpose"}
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1), "z": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert_same_on_ort(m, out, feeds, rtol=0, atol=0)
    stats2, _ = _apply(out, TransposeToReshape())
    assert stats2 == [{}]
