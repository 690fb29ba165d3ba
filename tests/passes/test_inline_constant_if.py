"""inline_constant_if: an If whose condition is a constant becomes the branch
it always takes."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import EliminateIdentity, InlineConstantIf
from tests.helpers import all_ops, apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node


def branch(name, nodes, outputs):
    return helper.make_graph(nodes, name, [], outputs)


def if_node(cond, out, then_nodes, then_out, else_nodes, else_out, name="if0"):
    return H("If", [cond], [out], name=name,
             then_branch=branch(f"{name}_then", then_nodes, [vi(then_out, [2, 3])]),
             else_branch=branch(f"{name}_else", else_nodes, [vi(else_out, [2, 3])]))


def inline(m, feeds=None):
    out, (res,) = apply(m, InlineConstantIf())
    assert_same_on_ort(m, out, feeds)
    _, (res2,) = apply(out, InlineConstantIf())
    assert not res2.modified
    return out, res


@pytest.mark.parametrize("cond,kept_op", [(True, "Relu"), (False, "Neg")])
def test_constant_condition_inlined(cond, kept_op):
    m = make_model(
        [H("Abs", ["x"], ["a"]),
         if_node("c", "b", [H("Relu", ["a"], ["t"])], "t", [H("Neg", ["a"], ["e"])], "e"),
         H("Sigmoid", ["b"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 3])], {"c": np.array(cond)})
    out, res = inline(m)
    assert "If" not in all_ops(out)
    assert ops(out) == ["Abs", kept_op, "Identity", "Sigmoid"]
    assert res.stats == {"inlined": 1}
    cleaned, _ = apply(out, EliminateIdentity())
    assert ops(cleaned) == ["Abs", kept_op, "Sigmoid"]
    assert_same_on_ort(m, cleaned)


def test_condition_from_input_kept():
    m = make_model(
        [if_node("c", "y", [H("Relu", ["x"], ["t"])], "t", [H("Neg", ["x"], ["e"])], "e")],
        [vi("x", [2, 3]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 3])])
    out, (res,) = apply(m, InlineConstantIf())
    assert ops(out) == ["If"] and not res.modified
    for c in (True, False):
        assert_same_on_ort(m, out, {"x": f32(2, 3), "c": np.array(c)})


def test_branch_output_is_graph_output():
    m = make_model(
        [if_node("c", "y", [H("Relu", ["x"], ["t"])], "t", [H("Neg", ["x"], ["e"])], "e")],
        [vi("x", [2, 3])], [vi("y", [2, 3])], {"c": np.array(False)})
    out, _ = inline(m)
    assert ops(out) == ["Neg", "Identity"]
    assert [o.name for o in out.graph.output] == ["y"]
    cleaned, _ = apply(out, EliminateIdentity())
    assert ops(cleaned) == ["Neg"] and list(cleaned.graph.node[0].output) == ["y"]
    assert_same_on_ort(m, cleaned)


def test_branch_reading_outer_initializer():
    m = make_model(
        [if_node("c", "b", [H("Add", ["x", "w"], ["t"])], "t", [H("Neg", ["x"], ["e"])], "e"),
         H("Sigmoid", ["b"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 3])], {"c": np.array(True), "w": f32(2, 3, seed=4)})
    out, _ = inline(m)
    assert ops(out) == ["Add", "Identity", "Sigmoid"]
    assert sorted(t.name for t in out.graph.initializer) == ["w"]


def test_nested_constant_ifs_inlined():
    inner = if_node("c2", "t", [H("Relu", ["x"], ["t1"])], "t1", [H("Neg", ["x"], ["t2"])], "t2", name="inner")
    m = make_model(
        [if_node("c1", "b", [inner], "t", [H("Abs", ["x"], ["e"])], "e", name="outer"), H("Sigmoid", ["b"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 3])], {"c1": np.array(True), "c2": np.array(False)})
    out, res = inline(m)
    assert "If" not in all_ops(out)
    assert [op for op in ops(out) if op != "Identity"] == ["Neg", "Sigmoid"]
    assert res.stats == {"inlined": 2}


def test_constant_if_inside_dynamic_if_inlined():
    inner = if_node("c2", "t", [H("Relu", ["x"], ["t1"])], "t1", [H("Neg", ["x"], ["t2"])], "t2", name="inner")
    m = make_model(
        [if_node("c1", "y", [inner], "t", [H("Abs", ["x"], ["e"])], "e", name="outer")],
        [vi("x", [2, 3]), vi("c1", [], TensorProto.BOOL)], [vi("y", [2, 3])], {"c2": np.array(True)})
    out, (res,) = apply(m, InlineConstantIf())
    assert ops(out) == ["If"] and res.stats == {"inlined": 1}
    assert all_ops(out).count("If") == 1 and "Relu" in all_ops(out) and "Neg" not in all_ops(out)
    for c in (True, False):
        assert_same_on_ort(m, out, {"x": f32(2, 3), "c1": np.array(c)})


def test_two_outputs_and_name_clash_with_branch_values():
    # Branch-local names that clash with nothing outside, and two outputs.
    then_g = helper.make_graph([H("Relu", ["x"], ["p"]), H("Neg", ["x"], ["q"])], "then", [],
                               [vi("p", [2, 3]), vi("q", [2, 3])])
    else_g = helper.make_graph([H("Abs", ["x"], ["p2"]), H("Exp", ["x"], ["q2"])], "else", [],
                               [vi("p2", [2, 3]), vi("q2", [2, 3])])
    m = make_model([H("If", ["c"], ["y", "z"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3])], {"c": np.array(True)})
    out, _ = inline(m)
    assert [op for op in ops(out) if op != "Identity"] == ["Relu", "Neg"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
