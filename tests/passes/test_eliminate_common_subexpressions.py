"""eliminate_common_subexpressions: equal nodes on equal inputs become one."""

import numpy as np
from onnx import TensorProto, helper

from passes import EliminateCommonSubexpressions as CSE
from tests.helpers import apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node


def cse(m, feeds=None):
    out, (res,) = apply(m, CSE())
    assert_same_on_ort(m, out, feeds)
    _, (res2,) = apply(out, CSE())
    assert not res2.modified
    return out, res


def test_duplicate_nodes_merged():
    m = make_model([H("Relu", ["x"], ["a"]), H("Relu", ["x"], ["b"]), H("Add", ["a", "b"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = cse(m)
    assert ops(out) == ["Relu", "Add"] and list(out.graph.node[1].input) == ["a", "a"]
    assert res.stats == {"merged": 1}


def test_merge_cascades_in_one_run():
    m = make_model([H("Relu", ["x"], ["a"]), H("Relu", ["x"], ["b"]), H("Exp", ["a"], ["c"]), H("Exp", ["b"], ["d"]),
                    H("Add", ["c", "d"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = cse(m)
    assert ops(out) == ["Relu", "Exp", "Add"] and res.stats == {"merged": 2}


def test_different_attributes_kept():
    m = make_model([H("LeakyRelu", ["x"], ["a"], alpha=0.1), H("LeakyRelu", ["x"], ["b"], alpha=0.2),
                    H("Add", ["a", "b"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = cse(m)
    assert ops(out) == ["LeakyRelu", "LeakyRelu", "Add"] and not res.modified


def test_float_attributes_equal_in_float32_merged():
    # 0.1 and 0.1 + 1e-12 are the same float32 attribute.
    m = make_model([H("LeakyRelu", ["x"], ["a"], alpha=0.1), H("LeakyRelu", ["x"], ["b"], alpha=0.1 + 1e-12),
                    H("Add", ["a", "b"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = cse(m)
    assert ops(out) == ["LeakyRelu", "Add"]


def test_different_input_order_kept():
    m = make_model([H("Sub", ["x", "z"], ["a"]), H("Sub", ["z", "x"], ["b"]), H("Add", ["a", "b"], ["y"])],
                   [vi("x", [2]), vi("z", [2])], [vi("y", [2])])
    out, res = cse(m)
    assert ops(out) == ["Sub", "Sub", "Add"] and not res.modified


def test_random_ops_never_merged():
    m = make_model([H("RandomUniformLike", ["x"], ["a"]), H("RandomUniformLike", ["x"], ["b"]),
                    H("Sub", ["a", "b"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    out, (res,) = apply(m, CSE())
    assert ops(out) == ["RandomUniformLike", "RandomUniformLike", "Sub"] and not res.modified


def test_both_graph_outputs_kept():
    m = make_model([H("Relu", ["x"], ["y"]), H("Relu", ["x"], ["z"])], [vi("x", [2])], [vi("y", [2]), vi("z", [2])])
    out, res = cse(m)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert len(out.graph.node) == 2


def test_duplicate_feeding_graph_output_merged_other_way():
    # The second duplicate is interior, the first is a graph output: the
    # interior one goes and its readers read the graph output.
    m = make_model([H("Relu", ["x"], ["y"]), H("Relu", ["x"], ["b"]), H("Neg", ["b"], ["z"])],
                   [vi("x", [2])], [vi("y", [2]), vi("z", [2])])
    out, res = cse(m)
    assert ops(out) == ["Relu", "Neg"] and list(out.graph.node[1].input) == ["y"]


def test_multi_output_nodes_merged():
    m = make_model([H("TopK", ["x", "k"], ["v1", "i1"]), H("TopK", ["x", "k"], ["v2", "i2"]),
                    H("Add", ["v1", "v2"], ["y"]), H("Add", ["i1", "i2"], ["z"])],
                   [vi("x", [2, 5])], [vi("y", [2, 2]), vi("z", [2, 2], TensorProto.INT64)], {"k": np.array([2], np.int64)})
    out, res = cse(m)
    assert ops(out) == ["TopK", "Add", "Add"] and res.stats == {"merged": 1}


def test_constants_with_equal_values_but_different_tensors_kept():
    # CSE compares input tensors by identity; equal constants are dedupe's job.
    m = make_model([H("Add", ["x", "w1"], ["a"]), H("Add", ["x", "w2"], ["b"]), H("Mul", ["a", "b"], ["y"])],
                   [vi("x", [2])], [vi("y", [2])], {"w1": f32(2), "w2": f32(2)})
    out, res = cse(m)
    assert ops(out) == ["Add", "Add", "Mul"] and not res.modified
