"""An attention-mask model (Where fill, Softmax, NaN guard) for the npu preparation passes' tests."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes import to_graph, to_model

H = helper.make_node


def mask_model(fill: float, zero_first: bool = True) -> onnx.ModelProto:
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


def apply_each(m, *passes):
    g, env = to_graph(m)
    stats = [p(g).stats for p in passes]
    return stats, to_model(g, env)
