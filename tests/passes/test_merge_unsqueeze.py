"""merge_unsqueeze: Unsqueeze(Unsqueeze(x, a1), a2) -> Unsqueeze(x, a)."""

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper

from passes import EliminateDeadCode, MergeUnsqueeze
from passes.merge_unsqueeze import combine
from tests.helpers import apply, assert_same_on_ort, f32, ops, vi

H = helper.make_node


def chain(a1, a2, *, x_shape=(3, 5), opset=17, extra=()):
    if opset >= 13:
        nodes = [H("Unsqueeze", ["x", "a1"], ["m"]), H("Unsqueeze", ["m", "a2"], ["y"])]
        inits = {"a1": np.array(a1, np.int64), "a2": np.array(a2, np.int64)}
    else:
        nodes = [H("Unsqueeze", ["x"], ["m"], axes=a1), H("Unsqueeze", ["m"], ["y"], axes=a2)]
        inits = {}
    nodes += list(extra)
    rank = len(x_shape) + len(a1) + len(a2)
    mid = np.expand_dims(np.zeros(x_shape), a1).shape
    outs = [vi("y", list(np.expand_dims(np.zeros(mid), a2).shape))] + [vi(e.output[0], list(mid)) for e in extra]
    m = helper.make_model(helper.make_graph(nodes, "t", [vi("x", list(x_shape))], outs,
                                            [helper.make_tensor(k, TensorProto.INT64, v.shape, v) for k, v in inits.items()]),
                          opset_imports=[helper.make_opsetid("", opset)])
    return m, rank


def run(m):
    out, (res, _) = apply(m, MergeUnsqueeze(), EliminateDeadCode())
    assert_same_on_ort(m, out, {"x": f32(3, 5)}, rtol=0, atol=0)
    again, (res2,) = apply(out, MergeUnsqueeze())
    assert not res2.modified and ops(again) == ops(out)
    return out, res


@pytest.mark.parametrize("a1,a2", [([1, 2], [3]), ([0, 1], [3]), ([0], [-1]), ([-1], [0, 2]), ([1], [1]),
                                   ([0, 3], [1, -1])])
def test_merged_and_same_result(a1, a2):
    m, _ = chain(a1, a2)
    out, res = run(m)
    assert ops(out) == ["Unsqueeze"] and res.stats == {"merged": 1}


def test_old_opset_attribute_form():
    m, _ = chain([0], [3], opset=11)
    out, _ = run(m)
    assert ops(out) == ["Unsqueeze"]


def test_inner_read_elsewhere_kept_but_outer_reads_x():
    m, _ = chain([0], [2], extra=[H("Neg", ["m"], ["z"])])
    out, res = run(m)
    assert sorted(ops(out)) == ["Neg", "Unsqueeze", "Unsqueeze"] and res.stats == {"merged": 1}
    assert next(n for n in out.graph.node if n.output[0] == "y").input[0] == "x"


def test_combine_matches_numpy():
    x = np.zeros((2, 3))
    for n1, n2 in itertools.product((1, 2), (1, 2)):
        r1, r2 = 2 + n1, 2 + n1 + n2
        for a1 in itertools.permutations(range(-r1, r1), n1):
            for a2 in itertools.permutations(range(-r2, r2), n2):
                if len({a % r1 for a in a1}) < n1 or len({a % r2 for a in a2}) < n2:
                    continue
                want = np.expand_dims(np.expand_dims(x, a1), a2).shape
                assert np.expand_dims(x, combine(2, list(a1), list(a2))).shape == want, (a1, a2)


@pytest.mark.parametrize("sq,usq", [([1], [1]), ([1], [-2]), ([0, 2], [2, 0]), ([1], [0])],
                         ids=["same", "negative", "two", "other-axis"])
def test_squeeze_unsqueeze_cancelled(sq, usq):
    x_shape = [3, 1, 1] if len(sq) == 2 else [3, 1, 5]
    if len(sq) == 2:
        x_shape = [1, 3, 1]
    mid = list(np.squeeze(np.zeros(x_shape), tuple(sq)).shape)
    y = list(np.expand_dims(np.zeros(mid), tuple(usq)).shape)
    m = helper.make_model(helper.make_graph(
        [helper.make_node("Squeeze", ["x", "a"], ["m"]), helper.make_node("Unsqueeze", ["m", "b"], ["u"]),
         helper.make_node("Neg", ["u"], ["y"])], "t", [vi("x", x_shape)], [vi("y", y)],
        [helper.make_tensor("a", TensorProto.INT64, [len(sq)], sq), helper.make_tensor("b", TensorProto.INT64, [len(usq)], usq)]),
        opset_imports=[helper.make_opsetid("", 17)])
    out, (res, _) = apply(m, MergeUnsqueeze(), EliminateDeadCode())
    assert_same_on_ort(m, out, {"x": f32(*x_shape)}, rtol=0, atol=0)
    same = sorted(a % len(x_shape) for a in sq) == sorted(a % len(x_shape) for a in usq)
    assert (ops(out) == ["Neg"]) == same
