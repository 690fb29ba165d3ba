"""eliminate_neutral_elementwise: x + 0, x - 0, x * 1, x / 1, x ** 1 -> x where shape and type are kept."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import EliminateDeadCode, EliminateNeutralElementwise
from tests.helpers import apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node


def model(op, c, *, const_first=False, x_shape=(2, 3, 4), elem=TensorProto.FLOAT, tail=True):
    ins = ["c", "x"] if const_first else ["x", "c"]
    nodes = [H(op, ins, ["y"])]
    out = "y"
    if tail:  # the neutral op feeds another node, and the graph output comes after it
        nodes.append(H("Neg", ["y"], ["z"]))
        out = "z"
    return make_model(nodes, [vi("x", list(x_shape), elem)], [vi(out, list(x_shape), elem)], {"c": np.asarray(c)})


def run(m, feeds=None):
    out, (res, _) = apply(m, EliminateNeutralElementwise(), EliminateDeadCode())
    assert_same_on_ort(m, out, feeds, rtol=0, atol=0)
    again, (res2,) = apply(out, EliminateNeutralElementwise())
    assert not res2.modified and ops(again) == ops(out)  # idempotent
    return out, res


@pytest.mark.parametrize("op,c,first", [
    ("Add", np.zeros(4, np.float32), False), ("Add", np.zeros((1, 1, 4), np.float32), True),
    ("Sub", np.float32(0), False), ("Mul", np.ones(4, np.float32), False), ("Mul", np.float32(1), True),
    ("Div", np.ones((3, 1), np.float32), False), ("Pow", np.float32(1), False),
], ids=["add", "add-first", "sub", "mul", "mul-first", "div", "pow"])
def test_neutral_removed(op, c, first):
    out, res = run(model(op, c, const_first=first))
    assert ops(out) == ["Neg"] and res.stats == {op: 1}


def test_graph_output_name_kept():
    m = model("Add", np.zeros(4, np.float32), tail=False)
    m2 = make_model([H("Relu", ["x"], ["r"]), H("Add", ["r", "c"], ["y"])], [vi("x", [2, 3, 4])],
                    [vi("y", [2, 3, 4])], {"c": np.zeros(4, np.float32)})
    out, _ = run(m2)
    assert ops(out) == ["Relu"] and [o.name for o in out.graph.output] == ["y"]
    out, res = run(m)  # graph input straight to the graph output: must stay a node
    assert ops(out) == ["Add"] and not res.modified


def test_integer_add_zero_removed():
    m = model("Add", np.zeros(4, np.int64), elem=TensorProto.INT64, tail=False)
    m = make_model([H("Add", ["x", "c"], ["y"]), H("Mul", ["y", "y"], ["z"])], [vi("x", [2, 4], TensorProto.INT64)],
                   [vi("z", [2, 4], TensorProto.INT64)], {"c": np.zeros(4, np.int64)})
    out, _ = run(m, {"x": np.arange(8, dtype=np.int64).reshape(2, 4)})
    assert ops(out) == ["Mul"]


def test_symbolic_dims_with_ones_removed():
    m = make_model([H("Add", ["x", "c"], ["y"]), H("Neg", ["y"], ["z"])], [vi("x", ["B", "S", 4])],
                   [vi("z", ["B", "S", 4])], {"c": np.zeros((1, 1, 4), np.float32)})
    out, _ = run(m, {"x": f32(3, 5, 4)})
    assert ops(out) == ["Neg"]


@pytest.mark.parametrize("op,c,first", [
    ("Add", np.array([0, 0, 0, 1e-30], np.float32), False),  # not all neutral
    ("Add", np.zeros((3, 2, 3, 4), np.float32), False),  # broadcasting grows the rank
    ("Add", np.zeros((2, 3, 4), np.float32)[:, :, :1], False),  # [2,3,1] into [2,3,4]: fine, see below
    ("Sub", np.float32(0), True),  # 0 - x = -x
    ("Div", np.float32(1), True),  # 1 / x
    ("Mul", np.zeros(4, np.float32), False),  # x * 0 is not x (NaN, inf, -0)
    ("Pow", np.float32(1), True),  # 1 ** x
], ids=["not-all-zero", "rank-grows", "ones-dim", "zero-minus-x", "one-over-x", "times-zero", "one-pow-x"])
def test_not_neutral_kept(op, c, first):
    out, res = run(model(op, c, const_first=first))
    if op == "Add" and c.shape == (2, 3, 1):
        assert ops(out) == ["Neg"]  # dims 2 and 3 equal x's static dims, 1 broadcasts: x itself
    else:
        assert op in ops(out) and not res.modified


def test_dim_mismatch_with_unknown_dim_kept():
    m = make_model([H("Add", ["x", "c"], ["y"]), H("Neg", ["y"], ["z"])], [vi("x", ["B", 1])],
                   [vi("z", ["B", 4])], {"c": np.zeros((1, 4), np.float32)})
    out, res = run(m, {"x": f32(3, 1)})
    assert ops(out) == ["Add", "Neg"] and not res.modified  # [B,1] + [1,4] -> [B,4]


@pytest.mark.parametrize("op,value", [("And", True), ("Or", False)])
def test_boolean_neutral_removed(op, value):
    m = make_model([H(op, ["c", "x"], ["y"]), H("Not", ["y"], ["z"])], [vi("x", [2, 4], TensorProto.BOOL)],
                   [vi("z", [2, 4], TensorProto.BOOL)], {"c": np.full((1, 4), value)})
    out, res = run(m, {"x": np.array([[True, False, True, False]] * 2)})
    assert ops(out) == ["Not"] and res.stats == {op: 1}


@pytest.mark.parametrize("op,value", [("And", False), ("Or", True)])
def test_boolean_absorbing_kept(op, value):
    m = make_model([H(op, ["c", "x"], ["y"]), H("Not", ["y"], ["z"])], [vi("x", [2, 4], TensorProto.BOOL)],
                   [vi("z", [2, 4], TensorProto.BOOL)], {"c": np.full((1, 4), value)})
    out, res = run(m, {"x": np.array([[True, False, True, False]] * 2)})
    assert op in ops(out) and not res.modified
