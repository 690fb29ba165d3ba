"""Helpers shared by the passes: the node walk, the node index, constant ints,
and the one access to gs's unloaded constant values."""

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from passes import to_graph
from passes.graph import NodeIndex, const_ints, const_value, index_of, remove_nodes, walk_nodes
from passes.gs_adapter import LazyValues, lazy_values, set_lazy_values
from tests.helpers import make_model, vi

H = helper.make_node


def _with_if():
    then = helper.make_graph([H("Neg", ["a"], ["t"], name="neg")], "then", [], [vi("t", [2])])
    other = helper.make_graph([H("Abs", ["a"], ["e"], name="abs")], "else", [], [vi("e", [2])])
    m = make_model([H("Relu", ["x"], ["a"], name="relu"), H("If", ["c"], ["y"], name="if", then_branch=then,
                                                             else_branch=other)],
                   [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])])
    g, _ = to_graph(m)
    return g


def test_walk_nodes_visits_every_graph_in_order():
    g = _with_if()
    seen = [(sub is g, node.name) for sub, node in walk_nodes(g)]
    assert seen[:2] == [(True, "relu"), (True, "if")]  # the graph, then its subgraphs
    assert sorted(seen[2:]) == [(False, "abs"), (False, "neg")]


def test_walk_nodes_lets_the_caller_remove_nodes():
    g = _with_if()
    names = []
    for sub, node in walk_nodes(g):
        names.append(node.name)
        if node.name == "relu":
            remove_nodes(sub, [node])
    assert names[:2] == ["relu", "if"] and sorted(names[2:]) == ["abs", "neg"]
    assert [n.name for n in g.nodes] == ["if"]


def test_node_index_follows_removals_and_bypasses():
    g = _with_if()
    relu, cond = g.nodes
    inner = cond.attrs["then_branch"].nodes[0]
    alive = NodeIndex(g)
    assert relu in alive and cond in alive and inner not in alive and None not in alive
    assert alive.bypass(relu, relu.inputs[0], relu.outputs[0])
    assert relu not in alive and [n.name for n in g.nodes] == ["if"]
    extra = gs.Node("Identity", name="extra")
    g.nodes.append(extra)
    alive.add(extra)
    assert extra in alive and index_of(g, extra) == 1
    alive.remove([extra])
    assert extra not in alive and [n.name for n in g.nodes] == ["if"]


def test_const_ints_from_initializers_and_constant_nodes():
    m = make_model([H("Constant", [], ["k"], value=numpy_helper.from_array(np.array([2, -1], np.int64))),
                    H("Constant", [], ["s"], value_int=3), H("Reshape", ["x", "k"], ["y"]), H("Shape", ["i"], ["n"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3])], {"i": np.arange(70, dtype=np.int64)})
    g, _ = to_graph(m)
    t = g.tensors()
    assert const_ints(t["k"], 1) == [2, -1] and const_ints(t["k"], 0) is None
    assert const_ints(t["s"], 0) == [3]
    assert const_ints(t["i"], 1) is None and const_ints(t["i"], 1, limit=70) == list(range(70))
    assert const_ints(t["x"], 1) is None


def test_lazy_values_are_read_and_swapped_without_loading():
    m = make_model([H("Add", ["x", "w"], ["y"])], [vi("x", [3])], [vi("y", [3])], {"w": np.ones(3, np.float32)})
    g, _ = to_graph(m)
    w = g.tensors()["w"]
    assert isinstance(lazy_values(w), LazyValues) and lazy_values(g.tensors()["x"]) is None
    set_lazy_values(w, LazyValues(numpy_helper.from_array(np.full(3, 2, np.float32), "w")))
    assert const_value(w).tolist() == [2.0, 2.0, 2.0]
