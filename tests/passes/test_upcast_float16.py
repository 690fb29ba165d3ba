"""upcast_float16 (npu target): an fp16 model computes in fp32 inside, its fp16
inputs and outputs kept through one Cast at each edge; idempotent."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from passes import UpcastFloat16
from tests.helpers import apply, vi

H = helper.make_node


def fp16_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float16), "w")
    nodes = [
        H("MatMul", ["x", "w"], ["a"]),
        H("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.5, np.float16))),
        H("Mul", ["a", "k"], ["b"]),
        H("Shape", ["b"], ["s"]),
        H("ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float16))),
        H("Add", ["b", "ones"], ["c"]),
        H("Cast", ["ids"], ["idf"], to=TensorProto.FLOAT16),  # an integer input cast to fp16 inside
        H("Add", ["c", "idf"], ["y"]),
        H("Relu", ["c"], ["z"]),
    ]
    g = helper.make_graph(nodes, "half", [vi("x", [2, 4], TensorProto.FLOAT16), vi("ids", [2, 3], TensorProto.INT64)],
                          [vi("y", [2, 3], TensorProto.FLOAT16), vi("z", [2, 3], TensorProto.FLOAT16)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_model_computes_in_fp32_with_its_io_types_kept():
    m = fp16_model()
    out, (res,) = apply(m, UpcastFloat16())
    assert res.modified and res.stats["edge_casts"] == 3  # x in; y and z out
    assert [i.type.tensor_type.elem_type for i in out.graph.input] == [TensorProto.FLOAT16, TensorProto.INT64]
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [TensorProto.FLOAT16] * 2
    assert all(t.data_type != TensorProto.FLOAT16 for t in out.graph.initializer)
    inner_half = [n for n in out.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    assert sorted(o for n in inner_half for o in n.output) == ["y", "z"]  # only the edge casts make fp16
    for n in out.graph.node:
        for a in n.attribute:
            assert not a.HasField("t") or a.t.data_type != TensorProto.FLOAT16, n.op_type
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float16),
             "ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    want = ort.InferenceSession(m.SerializeToString()).run(None, feeds)
    got = ort.InferenceSession(out.SerializeToString()).run(None, feeds)
    for a, b in zip(want, got):
        assert b.dtype == np.float16 and np.allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3)
    again, (res2,) = apply(out, UpcastFloat16())
    assert not res2.modified and len(again.graph.node) == len(out.graph.node)


def test_fp32_model_is_left_alone():
    g = helper.make_graph([H("Relu", ["x"], ["y"])], "f", [vi("x", [2])], [vi("y", [2])])
    out, (res,) = apply(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), UpcastFloat16())
    assert not res.modified and [n.op_type for n in out.graph.node] == ["Relu"]
