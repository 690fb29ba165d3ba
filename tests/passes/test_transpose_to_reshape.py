"""transpose_to_reshape: a Transpose moving only size-1 dims becomes a Reshape (npu)."""

import numpy as np
from onnx import TensorProto, helper

from passes import TransposeToReshape
from tests.helpers import assert_same_on_ort
from tests.passes.mask_models import apply_each

H = helper.make_node


def test_transpose_of_size_one_dims_becomes_reshape():
    """[1, C, 1, 1] -> [1, 1, 1, C] moves only size-1 dims: a Reshape (QNN aborts the
    process on that Transpose after a Gather); one that reorders data is kept."""
    nodes = [H("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1], name="layer_scale"),
             H("Transpose", ["z"], ["u"], perm=[1, 0], name="real_transpose")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 1, 1]),
                                       helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 1, 1, 6]),
                           helper.make_tensor_value_info("u", TensorProto.FLOAT, [3, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    stats, out = apply_each(m, TransposeToReshape())
    assert stats == [{"transposes_reshaped": 1}]
    assert {n.name: n.op_type for n in out.graph.node} == {"layer_scale": "Reshape", "real_transpose": "Transpose"}
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1), "z": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert_same_on_ort(m, out, feeds, rtol=0, atol=0)
    stats2, _ = apply_each(out, TransposeToReshape())
    assert stats2 == [{}]
