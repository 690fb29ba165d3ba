"""fuse_transposed_gemm: MatMul(A, Transpose(B)) [+ C] -> Gemm(A, B[, C], transB=1)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import EliminateDeadCode
from passes.fusions import FuseTransposedGemm
from tests.helpers import (
    apply,
    assert_same_on_ort,
    f32,
    init_names,
    make_model,
    ops,
    vi,
)

H = helper.make_node
K, N = 4, 5


def linear(a_shape, *, bias=None, perm=(1, 0), elem=TensorProto.FLOAT, extra=(), w_input=False, opset=17):
    dt = np.float32 if elem == TensorProto.FLOAT else np.float64
    inits = {"w": f32(N, K, seed=1).astype(dt)}
    tr = H("Transpose", ["w"], ["wt"], perm=list(perm)) if perm is not None else H("Transpose", ["w"], ["wt"])
    nodes = [tr, H("MatMul", ["x", "wt"], ["m" if bias is not None else "y"])]
    if bias is not None:
        inits["c"] = np.asarray(bias).astype(dt)
        nodes.append(H("Add", ["m", "c"], ["y"]))
    nodes += list(extra)
    out_shape = list(a_shape[:-1]) + [N]
    outs = [vi("y", out_shape, elem)] + [vi(e.output[0], [K, N], elem) for e in extra]
    ins = [vi("x", list(a_shape), elem)]
    if w_input:
        ins.append(vi("w", [N, K], elem))
        del inits["w"]
    return make_model(nodes, ins, outs, inits, opset=opset)


def fuse(m, feeds=None):
    out, (res, _) = apply(m, FuseTransposedGemm(), EliminateDeadCode())
    assert_same_on_ort(m, out, feeds, rtol=1e-5, atol=1e-5)
    again, (res2,) = apply(out, FuseTransposedGemm())
    assert not res2.modified and ops(again) == ops(out)  # idempotent
    return out, res


def gemm_attrs(m):
    (g,) = [n for n in m.graph.node if n.op_type == "Gemm"]
    return list(g.input), {a.name: helper.get_attribute_value(a) for a in g.attribute}


@pytest.mark.parametrize("bias", [f32(N), f32(1, N), np.float32(0.5)], ids=["n", "1n", "scalar"])
def test_linear_with_bias_fused(bias):
    out, res = fuse(linear([3, K], bias=bias))
    assert ops(out) == ["Gemm"] and res.stats == {"fused": 1, "with_bias": 1}
    assert gemm_attrs(out) == (["x", "w", "c"], {"transB": 1})
    assert init_names(out) == ["c", "w"]  # the weight as stored: no transposed copy


def test_without_bias_fused():
    out, res = fuse(linear([3, K]))
    assert ops(out) == ["Gemm"] and gemm_attrs(out) == (["x", "w"], {"transB": 1})


def test_transpose_without_perm_fused():
    out, _ = fuse(linear([3, K], bias=f32(N), perm=None))
    assert ops(out) == ["Gemm"]


def test_dynamic_rows_and_double():
    m = linear(["M", K], bias=f32(N), elem=TensorProto.DOUBLE)
    out, _ = fuse(m, {"x": f32(7, K).astype(np.float64)})
    assert ops(out) == ["Gemm"]


def test_non_constant_weight_fused():
    m = linear([3, K], bias=f32(N), w_input=True)
    out, _ = fuse(m)
    assert ops(out) == ["Gemm"]


def test_shared_transpose_each_consumer_fused():
    extra = [H("MatMul", ["x2", "wt"], ["z"])]
    m = make_model([H("Transpose", ["w"], ["wt"], perm=[1, 0]), H("MatMul", ["x", "wt"], ["y"]), *extra],
                   [vi("x", [3, K]), vi("x2", [2, K])], [vi("y", [3, N]), vi("z", [2, N])], {"w": f32(N, K)})
    out, res = fuse(m)
    assert ops(out) == ["Gemm", "Gemm"] and res.stats["fused"] == 2


def test_transposed_output_read_elsewhere_keeps_transpose():
    extra = [H("Relu", ["wt"], ["r"])]
    out, _ = fuse(linear([3, K], bias=f32(N), extra=extra))
    assert sorted(ops(out)) == ["Gemm", "Relu", "Transpose"]


@pytest.mark.parametrize("a_shape", [[2, 3, K], [K]], ids=["rank3", "rank1"])
def test_other_ranks_not_fused(a_shape):
    out, res = fuse(linear(a_shape, bias=f32(N)))
    assert "Gemm" not in ops(out) and not res.modified


def test_other_perm_not_fused():
    m = make_model([H("Transpose", ["w"], ["wt"], perm=[0, 1]), H("MatMul", ["x", "wt"], ["y"])],
                   [vi("x", [3, K])], [vi("y", [3, K])], {"w": f32(K, K)})
    out, res = fuse(m)
    assert not res.modified


def test_integer_not_fused():
    m = make_model([H("Transpose", ["w"], ["wt"], perm=[1, 0]), H("MatMul", ["x", "wt"], ["y"])],
                   [vi("x", [3, K], TensorProto.INT32)], [vi("y", [3, N], TensorProto.INT32)],
                   {"w": np.ones((N, K), np.int32)})
    out, res = fuse(m, {"x": np.ones((3, K), np.int32)})
    assert not res.modified


def test_bias_of_wrong_shape_kept_as_add():
    out, res = fuse(linear([3, K], bias=f32(3, N)))
    assert ops(out) == ["Gemm", "Add"] and res.stats == {"fused": 1, "with_bias": 0}


def test_old_opset_skipped():
    out, res = fuse(linear([3, K], bias=f32(N), opset=9))
    assert not res.modified
