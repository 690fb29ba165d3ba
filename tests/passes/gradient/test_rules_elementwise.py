"""Gradient rules checked against float64 finite differences: element-wise math,
activations, Clip, Cast, Dropout and selection (Where, Max, Min, Mean)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from .harness import check_gradient, gradient_model, model, one_op, vi, with_loss

R = np.random.default_rng(1)
F = "f"  # the model's float type (float64 or float32, per harness build)


def rnd(*shape):
    return R.standard_normal(shape)


def away(x, kinks, d=0.1):
    """``x`` with every value within ``d`` of a kink moved 2d away (finite differences stay valid)."""
    x = np.array(x, dtype=np.float64)
    for k in kinks:
        near = np.abs(x - k) < d
        x[near] = k + np.where(x[near] >= k, 2 * d, -2 * d)
    return x


def pos(*shape):
    return np.abs(rnd(*shape)) + 0.5


def nonzero(*shape):
    return away(rnd(*shape), [0.0])


def build(nodes, inputs, outputs, *, opset=17, consts=None):
    """A builder over ``nodes``: inputs/outputs are (name, type, shape) with type F
    for the model's float type; float ``consts`` take that type too."""
    consts = dict(consts or {})

    def b(elem):
        np_t = np.float64 if elem == TensorProto.DOUBLE else np.float32
        t = lambda k: elem if k == F else k  # noqa: E731
        ins = [vi(n, t(k), list(s) if s is not None else None) for n, k, s in inputs]
        outs = [vi(n, t(k), list(s) if s is not None else None) for n, k, s in outputs]
        inits = [onnx.numpy_helper.from_array(np.asarray(v).astype(np_t) if np.asarray(v).dtype.kind == "f"
                                              else np.asarray(v), n) for n, v in consts.items()]
        ns = [nd(elem) if callable(nd) else nd for nd in nodes]
        return model(ns, ins, outs, opset=opset, initializers=inits)

    return b


# ---------------------------------------------------------------- unary math and activations
UNARY = {
    "Sqrt": pos,
    "Exp": rnd,
    "Log": pos,
    "Abs": nonzero,
    "Reciprocal": lambda *s: np.sign(rnd(*s)) * (np.abs(rnd(*s)) + 0.5),
    "Relu": nonzero,
    "Erf": rnd,
    "Tanh": rnd,
    "Sigmoid": lambda *s: 3 * rnd(*s),
    "Softplus": lambda *s: 3 * rnd(*s),
    "Sin": lambda *s: 3 * rnd(*s),
    "Cos": lambda *s: 3 * rnd(*s),
    "HardSwish": lambda *s: away(3 * rnd(*s), [-3.0, 3.0]),
}


# onnx's reference Erf runs in float32 (np.vectorize(math.erf, otypes="f")): wider steps, looser tolerance
ERF_FD = {"eps": 1e-3, "rtol": 3e-4}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(op):
    gen = UNARY[op]
    check_gradient(one_op(op, [("x", ("B", 5))]), {"x": gen(4, 5)}, ["x"], more_feeds=[{"x": gen(1, 5)}],
                   **(ERF_FD if op == "Erf" else {}))


def test_hard_swish_covers_every_piece():
    x = np.array([-5.0, -3.5, -2.9, -1.0, 0.0, 0.7, 2.5, 3.2, 6.0])
    check_gradient(one_op("HardSwish", [("x", (9,))]), {"x": x}, ["x"])


@pytest.mark.parametrize("opset", [13, 21])
def test_unary_other_opsets(opset):
    for op in ("Sqrt", "Relu", "Sigmoid", "Tanh", "Exp"):
        check_gradient(one_op(op, [("x", (2, 3))], opset=opset), {"x": UNARY[op](2, 3)}, ["x"])


@pytest.mark.parametrize("alpha", [None, 0.2, 0.0, -0.5])
def test_leaky_relu(alpha):
    attrs = {} if alpha is None else {"alpha": alpha}
    check_gradient(one_op("LeakyRelu", [("x", ("N", 6))], **attrs), {"x": nonzero(3, 6)}, ["x"],
                   more_feeds=[{"x": nonzero(2, 6)}])


@pytest.mark.parametrize("sx,ss", [((2, 3, 4, 5), (3, 1, 1)), ((2, 3, 4, 5), (1,)), ((2, 3, 4, 5), (5,)),
                                   ((2, 3, 4, 5), (3, 4, 5)), ((3, 4), ())])
@pytest.mark.parametrize("opset", [13, 17])
def test_prelu(sx, ss, opset):
    check_gradient(one_op("PRelu", [("x", sx), ("s", ss)], opset=opset), {"x": nonzero(*sx), "s": rnd(*ss)},
                   ["x", "s"])


def test_prelu_symbolic_batch():
    build_ = one_op("PRelu", [("x", ("N", 3, "H", "W")), ("s", (3, 1, 1))])
    check_gradient(build_, {"x": nonzero(2, 3, 4, 4), "s": rnd(3, 1, 1)}, ["x", "s"],
                   more_feeds=[{"x": nonzero(1, 3, 2, 5), "s": rnd(3, 1, 1)}])


@pytest.mark.parametrize("approx", [None, "none", "tanh"])
@pytest.mark.parametrize("opset", [20, 22])
def test_gelu(approx, opset):
    attrs = {} if approx is None else {"approximate": approx}
    check_gradient(one_op("Gelu", [("x", ("B", 7))], opset=opset, **attrs), {"x": 2 * rnd(3, 7)}, ["x"],
                   more_feeds=[{"x": 2 * rnd(1, 7)}], **({} if approx == "tanh" else ERF_FD))


@pytest.mark.parametrize("alpha,beta", [(None, None), (0.5, 0.3), (-0.3, 0.6)])
def test_hard_sigmoid(alpha, beta):
    attrs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
    a, b = alpha if alpha is not None else 0.2, beta if beta is not None else 0.5
    x = away(4 * rnd(4, 6), [-b / a, (1 - b) / a])
    check_gradient(one_op("HardSigmoid", [("x", ("B", 6))], **attrs), {"x": x}, ["x"])


# ---------------------------------------------------------------- Pow
@pytest.mark.parametrize("sa,sb", [((3, 4), (3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3, 4), ()),
                                   ((), (2, 3))])
def test_pow_both_operands(sa, sb):
    check_gradient(one_op("Pow", [("a", sa), ("b", sb)]), {"a": pos(*sa), "b": rnd(*sb)}, ["a", "b"])


def test_pow_symbolic():
    build_ = one_op("Pow", [("a", ("B", "n", 4)), ("b", ("m", 4))])
    check_gradient(build_, {"a": pos(2, 3, 4), "b": rnd(3, 4)}, ["a", "b"],
                   more_feeds=[{"a": pos(1, 2, 4), "b": rnd(1, 4)}, {"a": pos(3, 1, 4), "b": rnd(2, 4)}])


@pytest.mark.parametrize("b", [np.array(2.0), np.array(3.0), np.array(0.5), np.array([2.0]),
                               np.array([1.0, 2.0, 3.0, -1.0]), np.array(3, np.int64), np.array([2], np.int32)])
def test_pow_constant_exponent(b):
    a = pos(3, 4) if np.any(np.asarray(b) % 1) else nonzero(3, 4)
    check_gradient(one_op("Pow", [("a", (3, 4))], consts={"b": b}), {"a": a}, ["a"])


@pytest.mark.parametrize("opset", [13, 17])
def test_pow_integer_exponent_input(opset):
    # a runtime int64 exponent: cast to the base's type (Cast before opset 15, CastLike after)
    build_ = build([helper.make_node("Pow", ["a", "b"], ["y"])], [("a", F, (3, 4)), ("b", TensorProto.INT64, (4,))],
                   [("y", F, (3, 4))], opset=opset)
    check_gradient(build_, {"a": nonzero(3, 4), "b": np.array([0, 1, 2, 3], np.int64)}, ["a"])


# ---------------------------------------------------------------- Clip
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("order,consts", [
    (["x"], {}),
    (["x", "lo"], {"lo": np.array(-0.5)}),
    (["x", "", "hi"], {"hi": np.array(0.7)}),
    (["x", "lo", "hi"], {"lo": np.array(-0.5), "hi": np.array(0.7)}),
])
def test_clip(opset, order, consts):
    x = away(rnd(4, 5), [-0.5, 0.7])
    check_gradient(one_op("Clip", [("x", ("B", 5))], consts=consts, order=order, opset=opset), {"x": x}, ["x"],
                   more_feeds=[{"x": away(rnd(2, 5), [-0.5, 0.7])}])


def test_clip_no_min_one_input():
    # min given as the only optional input (two-input form)
    check_gradient(one_op("Clip", [("x", (3, 4)), ("lo", ())]), {"x": away(rnd(3, 4), [0.2]), "lo": np.array(0.2)},
                   ["x", "lo"])


@pytest.mark.parametrize("order", [["x", "lo", "hi"], ["x", "", "hi"], ["x", "lo"]])
def test_clip_bounds_as_inputs(order):
    inputs = [("x", ("B", 6))] + [(n, ()) for n in order[1:] if n]
    feeds = {"x": away(2 * rnd(3, 6), [-0.5, 0.7]), "lo": np.array(-0.5), "hi": np.array(0.7)}
    feeds = {k: v for k, v in feeds.items() if k in order}
    check_gradient(one_op("Clip", inputs, order=order), feeds, list(feeds))


# ---------------------------------------------------------------- Cast
@pytest.mark.parametrize("opset", [13, 17, 21])
def test_cast_same_type(opset):
    b = lambda elem: one_op("Cast", [("x", ("B", 4))], opset=opset, to=elem)(elem)  # noqa: E731
    check_gradient(b, {"x": rnd(3, 4)}, ["x"], more_feeds=[{"x": rnd(1, 4)}])


@pytest.mark.parametrize("mid,rtol", [(TensorProto.FLOAT, 1e-5), (TensorProto.FLOAT16, 1e-3)])
@pytest.mark.parametrize("opset", [13, 17])
def test_cast_chain(mid, rtol, opset):
    # x -> mid -> back: x (multiples of 1/64) and x +- eps are exact in the narrow type, so the
    # finite differences are exact; the analytic gradient is the cotangent rounded to ``mid``.
    nodes = [helper.make_node("Cast", ["x"], ["m"], to=mid),
             lambda elem: helper.make_node("Cast", ["m"], ["y"], to=elem)]
    b = build(nodes, [("x", F, (3, 4))], [("y", F, (3, 4))], opset=opset)
    x = np.round(rnd(3, 4) * 64) / 64
    check_gradient(b, {"x": x}, ["x"], eps=0.25, rtol=rtol)


# ---------------------------------------------------------------- Dropout
def _dropout(opset, ratio=None, training=None, mask=True):
    """Dropout(x [, r] [, t]) -> y [, mask]; ``training`` None: no input, "input": a bool graph input."""
    ins, consts, order = [("x", F, ("B", 6))], {}, ["x"]
    if ratio is not None or training is not None:
        order.append("r" if ratio is not None else "")
        if ratio is not None:
            consts["r"] = np.array(ratio)
    if training is not None:
        order.append("t")
        if training == "input":
            ins.append(("t", TensorProto.BOOL, ()))
        else:
            consts["t"] = np.array(training)
    outs = [("y", F, None)] + ([("mask", TensorProto.BOOL, None)] if mask else [])
    node = helper.make_node("Dropout", order, [o for o, _, _ in outs], seed=7)
    return build([node], ins, outs, opset=opset, consts=consts)


@pytest.mark.parametrize("opset", [13, 22])
@pytest.mark.parametrize("ratio,training,mask", [(None, None, False), (None, None, True), (0.3, None, True),
                                                 (0.3, False, True), (0.3, False, False), (0.0, True, False)])
def test_dropout_inference_identity(opset, ratio, training, mask):
    check_gradient(_dropout(opset, ratio, training, mask), {"x": rnd(3, 6)}, ["x"], more_feeds=[{"x": rnd(2, 6)}])


@pytest.mark.parametrize("opset", [13, 22])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_dropout_training_mask(opset, ratio):
    # the reference evaluator draws the same mask on every run (fixed seed); ORT draws its own, so no ORT check.
    # (An empty ratio with training_mode breaks onnx's reference Dropout, so the default ratio is not run here.)
    check_gradient(_dropout(opset, ratio, True), {"x": rnd(3, 6)}, ["x"], check_ort=False)


@pytest.mark.parametrize("opset", [13, 22])
def test_dropout_training_mode_at_run_time(opset):
    b = _dropout(opset, 0.4, "input")
    check_gradient(b, {"x": rnd(3, 6), "t": np.array(True)}, ["x"], check_ort=False)
    check_gradient(b, {"x": rnd(3, 6), "t": np.array(False)}, ["x"],
                   more_feeds=[{"x": rnd(1, 6), "t": np.array(False)}])


def test_dropout_training_without_mask_output_is_refused():
    from passes.gradient import GradientError

    with pytest.raises(GradientError, match="mask"):
        check_gradient(_dropout(17, 0.3, True, mask=False), {"x": rnd(3, 6)}, ["x"], check_ort=False)


# ---------------------------------------------------------------- Where, Max, Min, Mean
@pytest.mark.parametrize("sc,sa,sb", [((3, 4), (3, 4), (3, 4)), ((3, 4), (3, 4), (4,)), ((2, 1, 4), (3, 1), ()),
                                      ((4,), (2, 3, 4), (3, 1)), ((2, 3, 1), (1, 5), (2, 1, 5))])
def test_where(sc, sa, sb):
    b = build([helper.make_node("Where", ["c", "a", "b"], ["y"])],
              [("c", TensorProto.BOOL, sc), ("a", F, sa), ("b", F, sb)], [("y", F, None)])
    check_gradient(b, {"c": R.random(sc) > 0.5, "a": rnd(*sa), "b": rnd(*sb)}, ["a", "b"])


def test_where_symbolic_and_constant_condition():
    b = build([helper.make_node("Where", ["c", "a", "b"], ["y"])],
              [("c", TensorProto.BOOL, ("B", 1)), ("a", F, ("B", "n")), ("b", F, ("n",))], [("y", F, None)])
    check_gradient(b, {"c": R.random((3, 1)) > 0.5, "a": rnd(3, 4), "b": rnd(4)}, ["a", "b"],
                   more_feeds=[{"c": R.random((1, 1)) > 0.5, "a": rnd(1, 2), "b": rnd(2)},
                               {"c": R.random((2, 1)) > 0.5, "a": rnd(2, 1), "b": rnd(1)}])
    bc = build([helper.make_node("Where", ["c", "a", "b"], ["y"])], [("a", F, (2, 3)), ("b", F, (2, 3))],
               [("y", F, None)], consts={"c": np.array([[True, False, True], [False, False, True]])})
    check_gradient(bc, {"a": rnd(2, 3), "b": rnd(2, 3)}, ["a", "b"])


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("shapes", [[(3, 4)], [(3, 4), (3, 4)], [(2, 3, 4), (4,)], [(2, 1, 4), (3, 1), ()],
                                    [(3, 4), (1, 4), (3, 1), (4,)]])
def test_max_min(op, shapes):
    names = [f"x{i}" for i in range(len(shapes))]
    feeds = {n: rnd(*s) for n, s in zip(names, shapes)}
    check_gradient(one_op(op, list(zip(names, shapes))), feeds, names)


@pytest.mark.parametrize("op", ["Max", "Min", "Mean"])
def test_variadic_symbolic(op):
    # onnx's reference Mean adds in place into its first input: keep that one the largest for Mean
    b = one_op(op, [("a", ("B", "n", 4)), ("b", ("m", 4)), ("c", (4,))])
    last = {"a": rnd(1, 2, 4), "b": rnd(1, 4)} if op == "Mean" else {"a": rnd(1, 1, 4), "b": rnd(2, 4)}
    check_gradient(b, {"a": rnd(2, 3, 4), "b": rnd(3, 4), "c": rnd(4)}, ["a", "b", "c"],
                   more_feeds=[{"a": rnd(5, 3, 4), "b": rnd(1, 4), "c": rnd(4)}, {**last, "c": rnd(4)}])


@pytest.mark.parametrize("shapes", [[(3, 4)], [(3, 4), (3, 4)], [(2, 3, 4), (4,), (3, 1)],
                                    [(2, 3), (2, 1), (1, 3), ()]])
def test_mean(shapes):  # the first input the largest (see test_variadic_symbolic)
    names = [f"x{i}" for i in range(len(shapes))]
    check_gradient(one_op("Mean", list(zip(names, shapes))), {n: rnd(*s) for n, s in zip(names, shapes)}, names)


# ---------------------------------------------------------------- saved outputs in a chain
def test_chain_of_activations():
    # y = Sigmoid(Tanh(Exp(Sqrt(x)))) * x: saved outputs feed the next rule, x has two readers
    nodes = [helper.make_node("Sqrt", ["x"], ["s"]), helper.make_node("Exp", ["s"], ["e"]),
             helper.make_node("Tanh", ["e"], ["t"]), helper.make_node("Sigmoid", ["t"], ["g"]),
             helper.make_node("Mul", ["g", "x"], ["y"])]
    b = build(nodes, [("x", F, ("B", 3))], [("y", F, None)])
    check_gradient(b, {"x": pos(4, 3) * 0.3}, ["x"], more_feeds=[{"x": pos(2, 3) * 0.3}])


@pytest.mark.parametrize("mid", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_cast_gradient_has_the_input_type(mid):
    # m (narrow type) has two readers, one of them a Mul by a narrow constant: their gradients meet in m's type; the
    # gradient model must type-check (strict ONNX inference), not only be numerically close.
    two = helper.make_tensor("two", mid, [], [2.0])
    nodes = [helper.make_node("Cast", ["x"], ["m"], to=mid), helper.make_node("Constant", [], ["c"], value=two),
             helper.make_node("Mul", ["m", "c"], ["n"]),
             lambda elem: helper.make_node("Cast", ["m"], ["y0"], to=elem),
             lambda elem: helper.make_node("Cast", ["n"], ["y1"], to=elem)]
    b = build(nodes, [("x", F, (3, 4))], [("y0", F, (3, 4)), ("y1", F, (3, 4))])
    for elem in (TensorProto.DOUBLE, TensorProto.FLOAT):
        grad, _, _ = gradient_model(with_loss(b(elem), elem), ["x"])
        onnx.shape_inference.infer_shapes(grad, check_type=True, strict_mode=True)
    check_gradient(b, {"x": np.round(rnd(3, 4) * 64) / 64}, ["x"], eps=0.25, rtol=1e-3,
                   check_ort=True)
