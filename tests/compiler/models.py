"""Small models shared by the compiler tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import f32, make_model, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731


def rich_model() -> onnx.ModelProto:
    """Something for every CPU pass to do, with a dynamic batch dim."""
    rng = np.random.default_rng(0)
    bias = f32(4, seed=3)
    then_g = helper.make_graph([H("Relu", ["mm"], ["t_out"])], "then", [], [vi("t_out", ["N", 4])])
    else_g = helper.make_graph([H("Neg", ["mm"], ["e_out"])], "else", [], [vi("e_out", ["N", 4])])
    nodes = [
        H("Identity", ["img"], ["img1"]),
        H("Conv", ["img1", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        H("BatchNormalization", ["c", "sc", "be", "mu", "va"], ["bn0"]),
        H("Mul", ["bn0", "chs"], ["bn"]),  # fuse_conv_affine, once the BatchNormalization is fused
        H("Relu", ["bn"], ["r1"]),
        H("Relu", ["bn"], ["r2"]),
        H("Add", ["r1", "r2"], ["img_out"]),
        H("Transpose", ["w"], ["wt"], perm=[1, 0]),
        H("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.5, np.float32), "kv")),
        H("MatMul", ["vec", "wt"], ["m"]),
        H("Add", ["m", "b"], ["mb"]),
        H("Mul", ["mb", "k"], ["mm0"]),
        H("Shape", ["vec"], ["vs"]),
        H("Gather", ["vs", "last"], ["vk"], axis=0),
        H("Cast", ["vk"], ["vkf"], to=TensorProto.FLOAT),
        H("Div", ["mm0", "vkf"], ["mm1"]),
        H("Add", ["mm1", "b2"], ["mm"]),
        H("If", ["cond"], ["iff"], then_branch=then_g, else_branch=else_g),
        H("Shape", ["iff"], ["s"]),
        H("Reshape", ["iff", "s"], ["rr"]),
        H("Cast", ["rr"], ["cast"], to=TensorProto.FLOAT),
        H("Dropout", ["cast"], ["d"]),
        # fuse_matmul_add, eliminate_neutral_elementwise, eliminate_schema_typed_casts, merge_unsqueeze
        H("MatMul", ["d", "w2"], ["q"]),
        H("Add", ["q", "b3"], ["q1"]),
        H("Add", ["q1", "zero4"], ["q2"]),
        # eliminate_reshape_pairs: view -> element-wise with a scalar -> view back
        H("Reshape", ["q2", "r14"], ["q2r"]),
        H("Mul", ["q2r", "k"], ["q2m"]),
        H("Reshape", ["q2m", "m14"], ["q2b"]),
        H("Unsqueeze", ["q2b", "ax0"], ["u1"]),
        H("Unsqueeze", ["u1", "ax0"], ["u2"]),
        H("Squeeze", ["u2", "ax01"], ["q3"]),
        H("Scaler", ["q3"], ["scl"], domain="ai.onnx.ml", offset=[0.1, 0.2, 0.3, 0.4], scale=[1.0, 2.0, 0.5, 1.5]),
        H("Cast", ["scl"], ["vec_out"], to=TensorProto.FLOAT),
        H("Exp", ["vec"], ["dead"]),
    ]
    inits = {
        "cw": f32(2, 3, 3, 3, seed=1), "cb": f32(2, seed=2),
        "sc": rng.uniform(0.5, 2, 2).astype(np.float32), "be": f32(2, seed=4), "mu": f32(2, seed=5),
        "va": rng.uniform(0.5, 2, 2).astype(np.float32),
        "w": f32(4, 4, seed=6), "b": bias, "b2": bias.copy(), "cond": np.array(True),
        "last": np.array(-1, np.int64),
        "w2": f32(4, 4, seed=7), "b3": f32(4, seed=8), "zero4": np.zeros(4, np.float32),
        "ax0": np.array([0], np.int64), "ax01": np.array([0, 1], np.int64),
        "r14": I64(1, -1, 4), "m14": I64(-1, 4),
        "chs": np.array([0.5, 2.0], np.float32).reshape(2, 1, 1),
    }
    g = helper.make_graph(nodes, "test", [vi("img", [1, 3, 6, 6]), vi("vec", ["N", 4])],
                          [vi("img_out", [1, 2, 6, 6]), vi("vec_out", ["N", 4])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.checker.check_model(m)
    return m


def bomb_model() -> onnx.ModelProto:
    """Constants that would fold to terabytes (ConstantOfShape, Expand, Tile,
    Range, a shape that is a product of constants), at the top level and
    inside a Loop body, feeding a cheap result.
    Never meant to run: compile it with verify=False."""
    one = numpy_helper.from_array(np.ones(1, np.float32))
    body = helper.make_graph(
        [H("ConstantOfShape", ["big2"], ["lb"], value=one), H("ReduceMax", ["lb"], ["lr"], keepdims=0),
         H("Add", ["v", "lr"], ["v_out"]), H("Identity", ["c_in"], ["c_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("v", [])],
        [vi("c_out", [], TensorProto.BOOL), vi("v_out", [])])
    nodes = [
        H("ConstantOfShape", ["big2"], ["a"], value=one),
        H("Expand", ["one", "big2"], ["b"]),
        H("Tile", ["row", "reps"], ["t"]),
        H("Range", ["zero", "huge", "step"], ["r"]),
        H("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        H("ReduceMax", ["a"], ["ra"], keepdims=0),
        H("ReduceMax", ["b"], ["rb"], keepdims=0),
        H("ReduceMax", ["t"], ["rt"], keepdims=0),
        H("ReduceMax", ["rf"], ["rr"], keepdims=0),
        # 2**20 * 2**20: only data propagation would see the length, and spell it out
        H("Mul", ["k20", "k20"], ["n40"]),
        H("ConstantOfShape", ["n40"], ["p"], value=one),
        H("Cast", ["p"], ["pc"], to=TensorProto.FLOAT),
        H("ReduceMax", ["pc"], ["rp"], keepdims=0),
        H("Sum", ["x", "ra", "rb", "rt", "rr", "rp"], ["s"]),
        H("Loop", ["trips", "", "s"], ["y"], body=body),
    ]
    inits = {
        "big2": I64(1 << 20, 1 << 20), "one": np.ones(1, np.float32), "row": np.ones((1, 1024), np.float32),
        "reps": I64(1 << 30, 1), "zero": np.array(0, np.int64), "huge": np.array(1 << 40, np.int64),
        "step": np.array(1, np.int64), "trips": np.array(2, np.int64), "k20": I64(1 << 20),
    }
    return make_model(nodes, [vi("x", [])], [vi("y", [])], inits)


def custom_domain_model() -> onnx.ModelProto:
    """Metadata, doc strings, a custom-domain op and symbolic dims to keep."""
    nodes = [
        H("Identity", ["x"], ["a"], doc_string="node doc"),
        H("MyOp", ["a"], ["b"], domain="com.example", alpha=0.5, tag="keep"),
        H("Relu", ["b"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [vi("x", ["batch", "seq", 8])], [vi("y", ["batch", "seq", 8])],
                          doc_string="graph doc")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                          producer_name="unit-test", producer_version="9.9", doc_string="model doc",
                          model_version=7, domain="org.test")
    helper.set_model_props(m, {"author": "tests", "license": "MIT"})
    onnx.checker.check_model(m)
    return m
