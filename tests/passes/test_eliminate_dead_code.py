"""eliminate_dead_code: nodes no output depends on, and their initializers."""

import numpy as np
from onnx import helper

from passes import EliminateDeadCode
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node


def dce(m, feeds=None):
    out, (res,) = apply(m, EliminateDeadCode())
    assert_same_on_ort(m, out, feeds)
    _, (res2,) = apply(out, EliminateDeadCode())
    assert not res2.modified
    return out, res


def test_dead_chain_and_its_initializers_removed():
    m = make_model([H("Relu", ["x"], ["y"]), H("Add", ["x", "w"], ["d1"]), H("Exp", ["d1"], ["d2"])],
                   [vi("x", [2])], [vi("y", [2])], {"w": f32(2)})
    out, res = dce(m)
    assert ops(out) == ["Relu"] and init_names(out) == []
    assert res.stats == {"nodes_removed": 2}


def test_unused_graph_inputs_kept():
    m = make_model([H("Relu", ["x"], ["y"]), H("Neg", ["unused"], ["d"])], [vi("x", [2]), vi("unused", [3])],
                   [vi("y", [2])])
    out, _ = dce(m, {"x": f32(2), "unused": f32(3)})
    assert [i.name for i in out.graph.input] == ["x", "unused"] and ops(out) == ["Relu"]


def test_node_with_one_used_output_kept_whole():
    m = make_model([H("TopK", ["x", "k"], ["v", "i"])], [vi("x", [5])], [vi("v", [2])], {"k": np.array([2], np.int64)})
    out, res = dce(m)
    assert ops(out) == ["TopK"] and not res.modified
    assert list(out.graph.node[0].output) == ["v", "i"]


def test_nothing_dead_unchanged():
    m = make_model([H("Relu", ["x"], ["a"]), H("Neg", ["a"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    out, res = dce(m)
    assert ops(out) == ["Relu", "Neg"] and not res.modified and res.stats == {"nodes_removed": 0}
