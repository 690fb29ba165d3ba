"""io.serialized_size counts large initializers from their length instead of
encoding them (upb sizes a message by encoding it); the result is exact."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import io


def _model(sizes):
    inits = [numpy_helper.from_array(np.random.default_rng(i).standard_normal(n).astype(np.float32), f"w{i}")
             for i, n in enumerate(sizes)]
    inits.append(helper.make_tensor("ints", TensorProto.INT64, [3], [1, 2, 3]))  # not raw_data
    nodes = [helper.make_node("Identity", [t.name], [f"o{i}"]) for i, t in enumerate(inits)]
    g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(f"o{i}", t.data_type, list(t.dims))
                                           for i, t in enumerate(inits)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.doc_string = "x" * 300
    return m


def test_size_by_parts_is_byte_size():
    for sizes in ([10], [2000, 5], [1 << 20, 33, 1 << 16], [(1 << 22) + 7]):
        m = _model(sizes)
        assert io._size_by_parts(m) == m.ByteSize() == len(m.SerializeToString())


def test_serialized_size_large_model_exact():
    m = _model([(16 << 20) // 4 + 100, 1000])  # over the threshold: counted by parts
    assert io.serialized_size(m) == m.ByteSize()
