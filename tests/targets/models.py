"""Small graphs for the gpu/npu target tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

H = helper.make_node


def _w(shape, seed, scale=0.3):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def classifier(batch="N", fmod_tail: bool = False, size: int = 16) -> onnx.ModelProto:
    """Conv-ReLU-pool-flatten-MatMul-Softmax with a dynamic batch; with
    ``fmod_tail`` the head ends in Mod(fmod=1), which the QNN HTP rejects."""
    inits = [numpy_helper.from_array(_w((8, 3, 3, 3), 1), "W"), numpy_helper.from_array(_w((8,), 2), "B"),
             numpy_helper.from_array(_w((8, 5), 3, 1.0), "FW")]
    nodes = [H("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             H("Relu", ["c"], ["r"], name="relu"),
             H("GlobalAveragePool", ["r"], ["g"], name="gap"),
             H("Flatten", ["g"], ["f"], name="flat"),
             H("MatMul", ["f", "FW"], ["logits"], name="fc")]
    if fmod_tail:
        nodes.append(H("Mod", ["logits", "logits"], ["y"], fmod=1, name="fmod"))
    else:
        nodes.append(H("Softmax", ["logits"], ["y"], axis=-1, name="softmax"))
    g = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def mixed_io() -> onnx.ModelProto:
    """float32 and int64 inputs, float32 and int64 outputs; a Softmax and a
    ReduceMean (block list) between two MatMuls, and a Cast of the model's own."""
    inits = [numpy_helper.from_array(_w((6, 6), 4), "A"), numpy_helper.from_array(_w((6, 6), 5), "C")]
    nodes = [H("MatMul", ["x", "A"], ["h"], name="mm1"),
             H("Softmax", ["h"], ["s"], axis=-1, name="softmax"),
             H("ReduceMean", ["s"], ["rm"], axes=[-1], keepdims=1, name="reduce"),
             H("Sub", ["s", "rm"], ["d"], name="sub"),
             H("MatMul", ["d", "C"], ["y"], name="mm2"),
             H("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT, name="own_cast"),
             H("Add", ["y", "idsf"], ["z"], name="add"),
             H("ArgMax", ["z"], ["k"], axis=-1, keepdims=0, name="argmax")]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 6]),
                           helper.make_tensor_value_info("k", TensorProto.INT64, ["N"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def cast_chain(first: int, mid: int, names=("c1", "c2")) -> onnx.ModelProto:
    """x -> Cast(mid) -> Cast(back to x's type) -> Neg -> y."""
    np_first = helper.tensor_dtype_to_np_dtype(first)
    nodes = [H("Cast", ["x"], ["a"], to=mid, name=names[0]),
             H("Cast", ["a"], ["b"], to=first, name=names[1]),
             H("Neg", ["b"], ["y"], name="neg")]
    g = helper.make_graph(nodes, "casts", [helper.make_tensor_value_info("x", first, [4])],
                          [helper.make_tensor_value_info("y", first, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    del np_first
    return m


def calib_npz(path, n: int = 8, size: int = 16, seed: int = 5):
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((n, 1, 3, size, size)).astype(np.float32))
    return path
