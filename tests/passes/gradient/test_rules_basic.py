"""Gradient rules checked against float64 finite differences: arithmetic and linear algebra."""

from __future__ import annotations

import numpy as np
import pytest

from .harness import check_gradient, one_op

R = np.random.default_rng(0)


def rnd(*shape):
    return R.standard_normal(shape)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((1,), (2, 3))])
def test_binary_broadcast(op, sa, sb):
    b = rnd(*sb)
    if op == "Div":
        b = np.sign(b) * (np.abs(b) + 0.5)
    check_gradient(one_op(op, [("a", sa), ("b", sb)]), {"a": rnd(*sa), "b": b}, ["a", "b"])


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_binary_symbolic_dims(op):
    # "m" may be 1 or equal "n" at run time: the reduction is decided by Shape at run time.
    build = one_op(op, [("a", ("B", "n", 4)), ("b", ("m", 4))])
    check_gradient(build, {"a": rnd(2, 3, 4), "b": rnd(3, 4)}, ["a", "b"],
                   more_feeds=[{"a": rnd(5, 3, 4), "b": rnd(1, 4)}, {"a": rnd(1, 1, 4), "b": rnd(1, 4)}])


def test_neg_identity_sum():
    check_gradient(one_op("Neg", [("a", (2, 3))]), {"a": rnd(2, 3)}, ["a"])
    check_gradient(one_op("Identity", [("a", (2, 3))]), {"a": rnd(2, 3)}, ["a"])
    check_gradient(one_op("Sum", [("a", (2, 3)), ("b", (3,)), ("c", (2, 1))]),
                   {"a": rnd(2, 3), "b": rnd(3), "c": rnd(2, 1)}, ["a", "b", "c"])


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                                   ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 5)), ((2, 3, 4), (4,)), ((4,), (4,)),
                                   ((3, 4), (2, 4, 5))])
def test_matmul(sa, sb):
    check_gradient(one_op("MatMul", [("a", sa), ("b", sb)]), {"a": rnd(*sa), "b": rnd(*sb)}, ["a", "b"])


def test_matmul_symbolic_batch_and_seq():
    build = one_op("MatMul", [("a", ("B", "S", 4)), ("b", (4, 3))])
    check_gradient(build, {"a": rnd(2, 3, 4), "b": rnd(4, 3)}, ["a", "b"], more_feeds=[{"a": rnd(1, 5, 4), "b": rnd(4, 3)}])


@pytest.mark.parametrize("ta", [0, 1])
@pytest.mark.parametrize("tb", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("cshape", [None, (5,), (3, 5), (3, 1)])
def test_gemm(ta, tb, alpha, beta, cshape):
    sa = (4, 3) if ta else (3, 4)
    sb = (5, 4) if tb else (4, 5)
    inputs = [("a", sa), ("b", sb)] + ([("c", cshape)] if cshape else [])
    feeds = {"a": rnd(*sa), "b": rnd(*sb)}
    if cshape:
        feeds["c"] = rnd(*cshape)
    check_gradient(one_op("Gemm", inputs, transA=ta, transB=tb, alpha=alpha, beta=beta), feeds, list(feeds))


# ---------------------------------------------------------------- reductions
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([1], 0), ([-1, 0], 0), ([0, 2], 1), (None, 0), (None, 1)])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce(op, axes, keepdims, opset):
    # ReduceSum takes axes as an input from opset 13, ReduceMean from 18 (an attribute before)
    as_input = op == "ReduceSum" or opset >= 18
    consts = {"axes": np.asarray(axes, np.int64)} if axes is not None and as_input else {}
    attrs = {"axes": axes} if axes is not None and not as_input else {}
    build = one_op(op, [("x", ("B", 3, "S"))], consts=consts, opset=opset, keepdims=keepdims, **attrs)
    check_gradient(build, {"x": rnd(2, 3, 4)}, ["x"], more_feeds=[{"x": rnd(1, 3, 5)}])


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_reduce_noop_with_empty_axes(op):
    build = one_op(op, [("x", (2, 3))], opset=18, keepdims=0, noop_with_empty_axes=1)
    check_gradient(build, {"x": rnd(2, 3)}, ["x"])


def test_every_rule_has_a_test():
    """Each op of the rule table is exercised by name in a test of this folder."""
    import re
    from pathlib import Path

    from passes.gradient import RULES

    src = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    untested = [op for op in RULES if not re.search(rf"[\"']{op}[\"']", src)]
    assert not untested, f"gradient rules without a test: {untested}"
