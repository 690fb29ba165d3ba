"""eliminate_identity: Identity, and Dropout at inference."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import EliminateIdentity
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node


def run(m):
    out, (res,) = apply(m, EliminateIdentity())
    assert_same_on_ort(m, out)
    again, (res2,) = apply(out, EliminateIdentity())
    assert not res2.modified, "eliminate_identity is not idempotent"
    return out, res


def test_identity_between_nodes_removed():
    m = make_model([H("Relu", ["x"], ["a"]), H("Identity", ["a"], ["b"]), H("Neg", ["b"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = run(m)
    assert ops(out) == ["Relu", "Neg"]
    assert res.modified and res.stats == {"Identity": 1}
    assert out.graph.node[1].input[0] == "a"


def test_identity_output_is_graph_output_keeps_name():
    m = make_model([H("Relu", ["x"], ["a"]), H("Identity", ["a"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = run(m)
    assert ops(out) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert list(out.graph.node[0].output) == ["y"]


def test_identity_output_is_graph_output_other_readers_follow_rename():
    m = make_model([H("Relu", ["x"], ["a"]), H("Identity", ["a"], ["y"]), H("Neg", ["a"], ["z"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3])])
    out, _ = run(m)
    assert ops(out) == ["Relu", "Neg"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert list(out.graph.node[1].input) == ["y"]


def test_chain_of_identities_to_graph_output():
    m = make_model([H("Relu", ["x"], ["a"]), H("Identity", ["a"], ["b"]), H("Identity", ["b"], ["c"]),
                    H("Identity", ["c"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = run(m)
    assert ops(out) == ["Relu"]
    assert res.stats == {"Identity": 3}


def test_identity_graph_input_to_graph_output_kept():
    # x -> Identity -> y: both names are part of the interface, nothing can go.
    m = make_model([H("Identity", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = run(m)
    assert ops(out) == ["Identity"] and not res.modified
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_identity_between_two_graph_outputs_kept():
    m = make_model([H("Relu", ["x"], ["a"]), H("Identity", ["a"], ["y"])], [vi("x", [2, 3])],
                   [vi("a", [2, 3]), vi("y", [2, 3])])
    out, res = run(m)
    assert ops(out) == ["Relu", "Identity"] and not res.modified
    assert [o.name for o in out.graph.output] == ["a", "y"]


def test_identity_of_initializer_to_graph_output_kept():
    m = make_model([H("Identity", ["w"], ["y"])], [], [vi("y", [2, 3])], {"w": f32(2, 3)})
    out, res = run(m)
    assert ops(out) == ["Identity"] and init_names(out) == ["w"] and not res.modified


def test_identity_of_initializer_inside_removed():
    m = make_model([H("Identity", ["w"], ["b"]), H("Add", ["x", "b"], ["y"])], [vi("x", [2, 3])],
                   [vi("y", [2, 3])], {"w": f32(2, 3)})
    out, _ = run(m)
    assert ops(out) == ["Add"]
    assert list(out.graph.node[0].input) == ["x", "w"]


def test_dropout_without_mask_removed():
    m = make_model([H("Relu", ["x"], ["a"]), H("Dropout", ["a"], ["y"], seed=3)], [vi("x", [2, 3])],
                   [vi("y", [2, 3])])
    out, res = run(m)
    assert ops(out) == ["Relu"] and res.stats == {"Dropout": 1}


def test_dropout_with_unused_mask_removed():
    m = make_model([H("Relu", ["x"], ["a"]), H("Dropout", ["a"], ["b", "mask"]), H("Neg", ["b"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, _ = run(m)
    assert ops(out) == ["Relu", "Neg"]


def test_dropout_with_used_mask_kept():
    m = make_model([H("Relu", ["x"], ["a"]), H("Dropout", ["a"], ["y", "mask"])], [vi("x", [2, 3])],
                   [vi("y", [2, 3]), vi("mask", [2, 3], TensorProto.BOOL)])
    out, res = run(m)
    assert ops(out) == ["Relu", "Dropout"] and not res.modified


def test_dropout_training_mode_false_removed():
    m = make_model([H("Relu", ["x"], ["a"]), H("Dropout", ["a", "ratio", "train"], ["b"]), H("Neg", ["b"], ["y"])],
                   [vi("x", [2, 3])], [vi("y", [2, 3])],
                   {"ratio": np.array(0.5, np.float32), "train": np.array(False)})
    out, _ = run(m)
    assert ops(out) == ["Relu", "Neg"]


@pytest.mark.parametrize("train_is_input", [False, True])
def test_dropout_training_mode_true_or_unknown_kept(train_is_input):
    inits = {"ratio": np.array(0.0, np.float32)}
    inputs = [vi("x", [2, 3])]
    if train_is_input:
        inputs.append(vi("train", [], TensorProto.BOOL))
    else:
        inits["train"] = np.array(True)
    m = make_model([H("Relu", ["x"], ["a"]), H("Dropout", ["a", "ratio", "train"], ["b"]), H("Neg", ["b"], ["y"])],
                   inputs, [vi("y", [2, 3])], inits)
    out, res = apply(m, EliminateIdentity())
    res = res[0]
    assert "Dropout" in ops(out) and not res.modified
    # ratio 0 makes the training-mode result deterministic, so it can be compared.
    feeds = {"x": f32(2, 3)}
    if train_is_input:
        feeds["train"] = np.array(True)
    assert_same_on_ort(m, out, feeds)


def test_custom_domain_identity_kept():
    n = H("Identity", ["a"], ["b"], domain="my.domain")
    g = helper.make_graph([H("Relu", ["x"], ["a"]), n, H("Neg", ["b"], ["y"])], "g", [vi("x", [2])], [vi("y", [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    out, (res,) = apply(m, EliminateIdentity())
    assert ops(out) == ["Relu", "Identity", "Neg"] and not res.modified


def test_identity_in_branch_from_outer_value_to_branch_output_kept():
    # The branch output may not be renamed onto a value of the enclosing graph.
    then_g = helper.make_graph([H("Identity", ["a"], ["t"])], "then", [], [vi("t", [2])])
    else_g = helper.make_graph([H("Neg", ["a"], ["e"])], "else", [], [vi("e", [2])])
    m = make_model([H("Relu", ["x"], ["a"]), H("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                   [vi("x", [2]), vi("c", [], TensorProto.BOOL)], [vi("y", [2])])
    out, (res,) = apply(m, EliminateIdentity())
    assert not res.modified
    branches = {a.name: [n.op_type for n in a.g.node] for a in out.graph.node[1].attribute}
    assert branches == {"then_branch": ["Identity"], "else_branch": ["Neg"]}
    for c in (True, False):
        assert_same_on_ort(m, out, {"x": f32(2), "c": np.array(c)})


def test_loop_condition_passthrough_kept_body_identity_removed():
    body = helper.make_graph(
        [H("Identity", ["ci"], ["co"]), H("Relu", ["v"], ["r"]), H("Identity", ["r"], ["vo"])], "body",
        [vi("i", [], TensorProto.INT64), vi("ci", [], TensorProto.BOOL), vi("v", [2])],
        [vi("co", [], TensorProto.BOOL), vi("vo", [2])])
    m = make_model([H("Loop", ["n", "", "x"], ["y"], body=body)], [vi("x", [2])], [vi("y", [2])],
                   {"n": np.array(3, np.int64)})
    out, (res,) = apply(m, EliminateIdentity())
    assert res.stats == {"Identity": 1}
    assert [n.op_type for n in out.graph.node[0].attribute[0].g.node] == ["Identity", "Relu"]
    assert_same_on_ort(m, out)
