"""fuse_matmul_add: MatMul + Add -> Gemm only where Gemm's rules allow it."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import FuseMatMulAdd
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node


def mm_add(a_shape, bias, *, bias_left=False, opset=17, elem=TensorProto.FLOAT, extra=()):
    k, n = 4, 5
    dt = np.float32 if elem == TensorProto.FLOAT else np.float64
    inits = {"w": f32(k, n, seed=1).astype(dt), "c": np.asarray(bias).astype(dt)}
    add_in = ["c", "m"] if bias_left else ["m", "c"]
    nodes = [H("MatMul", ["x", "w"], ["m"]), H("Add", add_in, ["y"]), *extra]
    out_shape = list(a_shape[:-1]) + [n]
    outs = [vi("y", out_shape, elem)] + [vi(e.output[0], out_shape, elem) for e in extra]
    return make_model(nodes, [vi("x", list(a_shape), elem)], outs, inits, opset=opset)


def fuse(m, feeds=None):
    out, (res,) = apply(m, FuseMatMulAdd())
    assert_same_on_ort(m, out, feeds, rtol=1e-5, atol=1e-5)
    _, (res2,) = apply(out, FuseMatMulAdd())
    assert not res2.modified
    return out, res


@pytest.mark.parametrize("bias", [f32(5), f32(1, 5), np.float32(0.5), f32(1), f32(1, 1)], ids=["n", "1n", "scalar", "1", "11"])
def test_rank2_fused(bias):
    out, res = fuse(mm_add([3, 4], bias))
    assert ops(out) == ["Gemm"] and res.stats == {"fused": 1}
    assert list(out.graph.node[0].input) == ["x", "w", "c"] and list(out.graph.node[0].output) == ["y"]
    assert init_names(out) == ["c", "w"]


def test_bias_on_the_left_fused():
    out, _ = fuse(mm_add([3, 4], f32(5), bias_left=True))
    assert ops(out) == ["Gemm"]


def test_dynamic_rows_fused():
    m = mm_add(["M", 4], f32(5))
    out, _ = fuse(m)
    assert ops(out) == ["Gemm"]
    assert_same_on_ort(m, out, {"x": f32(7, 4)}, rtol=1e-5, atol=1e-5)


def test_double_fused():
    m = mm_add([3, 4], f32(5), elem=TensorProto.DOUBLE)
    out, _ = fuse(m, {"x": f32(3, 4).astype(np.float64)})
    assert ops(out) == ["Gemm"]


@pytest.mark.parametrize("a_shape", [[2, 3, 4], [1, 3, 4], [4]], ids=["rank3", "batch1", "rank1"])
def test_other_ranks_not_fused(a_shape):
    out, res = fuse(mm_add(a_shape, f32(5)))
    assert ops(out) == ["MatMul", "Add"] and not res.modified


@pytest.mark.parametrize("bias", [f32(3, 1), f32(1, 1, 5), f32(3, 5)], ids=["m1", "rank3", "mn"])
def test_bias_shapes_not_matching_rule_not_fused(bias):
    out, res = fuse(mm_add([3, 4], bias))
    if bias.ndim == 3:  # would change the output's rank
        assert ops(out) == ["MatMul", "Add"] and not res.modified


def test_matmul_output_read_elsewhere_not_fused():
    out, res = fuse(mm_add([3, 4], f32(5), extra=[H("Relu", ["m"], ["z"])]))
    assert ops(out) == ["MatMul", "Add", "Relu"] and not res.modified


def test_non_constant_bias_not_fused():
    m = make_model([H("MatMul", ["x", "w"], ["m"]), H("Add", ["m", "c"], ["y"])],
                   [vi("x", [3, 4]), vi("c", [3, 5])], [vi("y", [3, 5])], {"w": f32(4, 5)})
    out, res = fuse(m)
    assert ops(out) == ["MatMul", "Add"] and not res.modified


def test_integer_matmul_not_fused():
    m = make_model([H("MatMul", ["x", "w"], ["m"]), H("Add", ["m", "c"], ["y"])],
                   [vi("x", [3, 4], TensorProto.INT32)], [vi("y", [3, 5], TensorProto.INT32)],
                   {"w": np.ones((4, 5), np.int32), "c": np.ones(5, np.int32)})
    out, res = fuse(m)
    assert ops(out) == ["MatMul", "Add"] and not res.modified


def test_old_opset_not_fused():
    out, res = fuse(mm_add([3, 4], f32(5), opset=10))
    assert ops(out) == ["MatMul", "Add"] and not res.modified


def test_matmul_output_is_graph_output_not_fused():
    m = make_model([H("MatMul", ["x", "w"], ["m"]), H("Add", ["m", "c"], ["y"])], [vi("x", [3, 4])],
                   [vi("y", [3, 5]), vi("m", [3, 5])], {"w": f32(4, 5), "c": f32(5)})
    out, res = fuse(m)
    assert ops(out) == ["MatMul", "Add"] and not res.modified
