"""eliminate_reshape_pairs: Reshape -> element-wise chain with one-element
constants -> Reshape back to the input's shape runs the chain on the input
(GPT-2's MLP from torch's dynamo exporter); near misses are left alone."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from passes import EliminateDeadCode, EliminateReshapePairs
from tests.helpers import apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node
I64 = lambda *v: np.array(v, dtype=np.int64)
F = lambda v, *shape: np.full(shape, v, np.float32)


def dynamo_mlp(chain, last="g", target="flat", post=True, outputs=(), inits=None):
    """x [B, S, 4] -> Reshape([-1, 4]) -> Abs -> a [?, 4] -> Reshape(a, [B, S, 4]
    read from Shape(x), allowzero=1) -> v -> ``chain`` -> ``last`` ->
    Reshape(last, ``target``, allowzero=1) -> r -> Neg -> y (or r = y)."""
    out = "r" if post else "y"
    nodes = [H("Reshape", ["x", "flat"], ["x2"]), H("Abs", ["x2"], ["a"]),
             H("Shape", ["x"], ["s"], end=2), H("Concat", ["s", "four"], ["bs4"], axis=0),
             H("Reshape", ["a", "bs4"], ["v"], allowzero=1), *chain,
             H("Reshape", [last, target], [out], allowzero=1)]
    if post:
        nodes.append(H("Neg", ["r"], ["y"]))
    inits = {"flat": I64(-1, 4), "four": I64(4), **(inits or {})}
    return make_model(nodes, [vi("x", ["B", "S", 4])], [vi("y", [None, 4]), *outputs], inits)


def gelu_chain():
    """GPT-2's tanh GELU as dynamo writes it, one constant a Constant node, one [1, 1]."""
    c = H("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.7978846, np.float32), "kv"))
    return [H("Mul", ["v", "half"], ["m0"]), H("Pow", ["v", "three"], ["p"]), H("Mul", ["p", "coef"], ["m1"]),
            H("Add", ["v", "m1"], ["s0"]), c, H("Mul", ["s0", "k"], ["m2"]), H("Tanh", ["m2"], ["t"]),
            H("Add", ["t", "one"], ["s1"]), H("Mul", ["m0", "s1"], ["g"])]


GELU_INITS = {"half": F(0.5), "three": F(3.0), "coef": F(0.044715, 1, 1), "one": F(1.0)}
FEEDS = [{"x": f32(2, 3, 4, seed=1)}, {"x": f32(1, 5, 4, seed=2)}]


def run(m):
    """The pass then dead-code removal, checked on ORT at two batch sizes and for idempotence."""
    out, (res, _) = apply(m, EliminateReshapePairs(), EliminateDeadCode())
    for feed in FEEDS:
        assert_same_on_ort(m, out, feed)
    _, (res2,) = apply(out, EliminateReshapePairs())
    assert not res2.modified, "eliminate_reshape_pairs is not idempotent"
    return out, res


def test_gelu_between_reshape_pair_runs_on_the_2d_tensor():
    m = dynamo_mlp(gelu_chain(), inits=GELU_INITS)
    out, res = run(m)
    assert res.stats == {"chain": 1}
    assert ops(out) == ["Reshape", "Abs", "Mul", "Pow", "Mul", "Add", "Constant", "Mul", "Tanh", "Add", "Mul", "Neg"]


def test_graph_output_reshape_keeps_its_name():
    m = dynamo_mlp(gelu_chain(), inits=GELU_INITS, post=False)
    out, res = run(m)
    assert res.stats == {"chain": 1} and "Shape" not in ops(out) and ops(out).count("Reshape") == 1
    assert [o.name for o in out.graph.output] == ["y"] and out.graph.node[-1].output[0] == "y"


def test_reshape_of_reshape_goes():
    m = dynamo_mlp([], last="v")
    out, res = run(m)
    assert res.stats == {"reshape_of_reshape": 1} and ops(out) == ["Reshape", "Abs", "Neg"]


@pytest.mark.parametrize("case", ["wide_constant", "rank_3_constant", "read_outside", "intermediate_is_output",
                                  "target_other_dims", "target_zero", "two_inputs"])
def test_near_misses_left_alone(case):
    chain, inits, target, outputs = gelu_chain(), dict(GELU_INITS), "flat", []
    if case == "wide_constant":  # 4 elements: it differs along the last dim, still fine, but not one element
        inits["coef"] = np.array([0.04, 0.05, 0.06, 0.07], np.float32)
    elif case == "rank_3_constant":  # [1, 1, 1] on the 2-D tensor would make it 3-D
        inits["coef"] = F(0.044715, 1, 1, 1)
    elif case == "read_outside":  # tanh's output also feeds another graph output
        chain.append(H("Sigmoid", ["t"], ["z"]))
        outputs = [vi("z", ["B", "S", 4])]
    elif case == "intermediate_is_output":
        outputs = [vi("t", ["B", "S", 4])]
    elif case == "target_other_dims":  # [-1, 2]: not a's shape
        target, inits["flat2"] = "flat2", I64(-1, 2)
    elif case == "target_zero":  # allowzero=1: a literal 0
        target, inits["z4"] = "z4", I64(0, 4)
    elif case == "two_inputs":  # the chain also reads another 3-D tensor
        chain[-1] = H("Mul", ["m0", "x"], ["g"])
    m = dynamo_mlp(chain, target=target, outputs=outputs, inits=inits)
    feeds = FEEDS
    if case == "target_other_dims":
        feeds = [{"x": f32(2, 3, 4, seed=1)}]
    out, (res,) = apply(m, EliminateReshapePairs())
    for feed in feeds if case != "target_zero" else []:  # a 0 with allowzero=1 fails on ORT by design
        assert_same_on_ort(m, out, feed)
    assert not res.modified and ops(out).count("Reshape") == 3
