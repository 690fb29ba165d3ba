"""Gradient rules checked against float64 finite differences: Softmax, LogSoftmax,
LayerNormalization and BatchNormalization (inference form).

onnx 1.23's reference LayerNormalization runs in X's type when stash_type=1 (it
refuses other stash types), so float64 finite differences through it are exact;
the other stash types and float16 are checked on ONNX Runtime against the float64
gradient of the same values.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from passes.convert import to_graph
from passes.gradient import GradientError, build_gradient

from .harness import check_gradient, gradient_model, model, one_op, ort_check, vi, with_loss

R = np.random.default_rng(2)


def rnd(*shape):
    return R.standard_normal(shape)


def pos(*shape):
    return np.abs(rnd(*shape)) + 0.5


def sized(shape, sizes):
    """``shape`` with its dim names replaced from ``sizes``."""
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def np_type(elem):
    return helper.tensor_dtype_to_np_dtype(elem)


def grads(build, elem, feeds, wrt, *, on="ref"):
    """The gradients of ``build(elem)``'s loss at ``feeds`` (cotangents included), on the reference
    evaluator or ONNX Runtime."""
    gm, names, _ = gradient_model(with_loss(build(elem), elem), wrt)
    if on == "ref":
        return ReferenceEvaluator(gm).run(names, feeds)
    return ort.InferenceSession(gm.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)


def cotangent(build, feeds, seed=5, on="ref"):
    m = build(TensorProto.DOUBLE)
    if on == "ref":
        ys = ReferenceEvaluator(m).run(None, feeds)
    else:
        ys = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    rng = np.random.default_rng(seed)
    return {f"cot__{i}": rng.standard_normal(np.shape(y)) for i, y in enumerate(ys)}


def casts_to(build, elem, wrt, to):
    gm, _, _ = gradient_model(with_loss(build(elem), elem), wrt)
    return any(n.op_type == "Cast" and helper.get_attribute_value(n.attribute[0]) == to for n in gm.graph.node)


def i64(*v):
    return np.asarray(v, np.int64)


def unknown_rank(body, extra_inputs=()):
    """A model running ``body(elem)`` (nodes from ``x`` to ``z``) on ``x`` reshaped to the run-time
    shape ``t`` (so of unknown rank), flattened after (the harness's loss needs a known rank)."""
    def build(elem):
        nodes = [helper.make_node("Reshape", ["x", "t"], ["x_r"])] + body(elem)
        nodes[1].input[0] = "x_r"
        nodes.append(helper.make_node("Reshape", ["z", "m1"], ["y"]))
        ins = [vi("x", elem, ["N"]), vi("t", TensorProto.INT64, ["K"])]
        ins += [vi(n, elem, list(s)) for n, s in extra_inputs]
        m1 = helper.make_tensor("m1", TensorProto.INT64, [1], [-1])
        return model(nodes, ins, [vi("y", elem, None)], initializers=[m1])

    return build


# ---------------------------------------------------------------- Softmax, LogSoftmax
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, -2])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax(op, axis, opset):
    attrs = {} if axis is None else {"axis": axis}
    build = one_op(op, [("x", ("B", 3, "W"))], opset=opset, **attrs)
    check_gradient(build, {"x": rnd(2, 3, 4)}, ["x"], more_feeds=[{"x": rnd(4, 3, 2)}])


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_unknown_rank(op, axis):
    # ReduceSum takes the axis as written: the rank is never needed
    build = unknown_rank(lambda elem: [helper.make_node(op, ["x"], ["z"], axis=axis)])
    check_gradient(build, {"x": rnd(12), "t": i64(3, 4)}, ["x"], more_feeds=[{"x": rnd(12), "t": i64(2, 3, 2)}])


def test_softmax_rank1_peaked():
    check_gradient(one_op("Softmax", [("x", (6,))]), {"x": 8 * rnd(6)}, ["x"])


# ---------------------------------------------------------------- LayerNormalization
def layer_norm(x, scale, bias, *, n_out=1, opset=17, consts=None, **attrs):
    """LayerNormalization with its Mean (and InvStdDev) outputs (``n_out`` 2 or 3) cast to the
    model's type: their declared type is the stash type (float), not X's."""
    consts = dict(consts or {})

    def build(elem):
        nt = np_type(elem)
        ins = [vi(n, elem, None if s is None else list(s)) for n, s in (x, scale, bias)
               if (s is not None or n == x[0]) and n not in consts]
        inits = [onnx.numpy_helper.from_array(np.asarray(v, nt), n) for n, v in consts.items()]
        node_in = [x[0], scale[0]] + ([bias[0]] if bias[1] is not None or bias[0] in consts else [])
        outs = ["y0", "mean", "istd"][:n_out]
        nodes = [helper.make_node("LayerNormalization", node_in, outs, **attrs)]
        for o in outs[1:]:
            nodes.append(helper.make_node("Cast", [o], [f"{o}_out"], to=elem))
        outputs = ["y0"] + [f"{o}_out" for o in outs[1:]]
        return model(nodes, ins, [vi(o, elem, None) for o in outputs], opset=opset, initializers=inits)

    return build


LN_CASES = {  # x shape, axis, scale shape, bias shape (None: absent), epsilon
    "last": (("B", "S", 4), -1, (4,), (4,), None),
    "last-positive-no-bias": (("B", "S", 4), 2, (4,), None, 1e-2),
    "two-axes": (("B", 3, 4), 1, (3, 4), (3, 4), None),
    "two-axes-negative-broadcast-scale": (("B", 3, 4), -2, (1, 4), (4,), 0.5),
    "broadcast-scale-column": (("B", 3, 4), -2, (3, 1), (1,), None),
    "all-axes": ((3, 2, 4), 0, (1, 1, 4), (2, 1), None),
    "rank4": (("B", 2, 3, 2), -3, (2, 3, 2), (3, 2), 1e-3),
    "symbolic-normalized": (("B", "S", "D"), -1, ("D",), ("D",), None),
}


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("case", LN_CASES)
def test_layer_norm(case, opset):
    xs, axis, ss, bs, eps = LN_CASES[case]
    attrs = {"axis": axis} | ({} if eps is None else {"epsilon": eps})
    build = layer_norm(("x", xs), ("s", ss), ("b", bs), opset=opset, **attrs)
    wrt = ["x", "s"] + (["b"] if bs is not None else [])

    def feeds(sizes):
        f = {"x": rnd(*sized(xs, sizes)), "s": rnd(*sized(ss, sizes))}
        return f | ({"b": rnd(*sized(bs, sizes))} if bs is not None else {})

    check_gradient(build, feeds({"B": 2, "S": 3, "D": 4}), wrt, more_feeds=[feeds({"B": 3, "S": 1, "D": 5})])


@pytest.mark.parametrize("xs,axis,n_out,opset", [
    (("B", "S", 4), -1, 3, 17), (("B", 3, 4), 1, 3, 18), (("B", "S", "D"), -1, 3, 17), (("B", "S", "D"), -1, 3, 18),
    (("B", "S", 4), -1, 2, 17), (("B", 3, 4), 1, 2, 18),
])
def test_layer_norm_mean_invstd_outputs(xs, axis, n_out, opset):
    # gradient flows into Mean (and InvStdDev) too (symbolic D: the group size is read at run time)
    ss = sized(xs[axis:], {"D": "D"})
    build = layer_norm(("x", xs), ("s", ss), ("b", ss), n_out=n_out, opset=opset, axis=axis, epsilon=0.1)

    def feeds(sizes):
        return {"x": rnd(*sized(xs, sizes)), "s": rnd(*sized(ss, sizes)), "b": rnd(*sized(ss, sizes))}

    check_gradient(build, feeds({"B": 2, "S": 3, "D": 4}), ["x", "s", "b"],
                   more_feeds=[feeds({"B": 1, "S": 4, "D": 3})])


@pytest.mark.parametrize("wrt", [["x"], ["s"], ["b"], ["s", "b"]])
def test_layer_norm_partial(wrt):
    # untrained operands are left out (constants when frozen); the rest still exact
    consts = {"s": rnd(4), "b": rnd(4)}
    consts = {k: v for k, v in consts.items() if k not in wrt}
    build = layer_norm(("x", ("B", 3, 4)), ("s", (4,)), ("b", (4,)), consts=consts, axis=-1)
    feeds = {"x": rnd(2, 3, 4)} | {k: rnd(4) for k in ("s", "b") if k in wrt}
    check_gradient(build, feeds, wrt)


def test_layer_norm_stash_double_on_float():
    # stash_type=11 (double) on float X: the backward runs in double; the reference evaluator
    # only runs stash_type=1, so the float64 model keeps it (same math there)
    def build(elem):
        stash = 11 if elem == TensorProto.FLOAT else 1
        return layer_norm(("x", ("B", 3, 4)), ("s", (4,)), ("b", (4,)), axis=-1, stash_type=stash)(elem)

    check_gradient(build, {"x": rnd(2, 3, 4), "s": rnd(4), "b": rnd(4)}, ["x", "s", "b"], ort_rtol=1e-5)
    assert casts_to(build, TensorProto.FLOAT, ["x"], TensorProto.DOUBLE)


@pytest.mark.parametrize("n_out", [1, 3])
def test_layer_norm_float16_stash_float(n_out):
    # float16 X, stash_type=1: normalized in float32 by the forward and so by the backward
    build = layer_norm(("x", ("B", 8)), ("s", (8,)), ("b", (8,)), n_out=n_out, axis=-1)
    x, s, b = (np.asarray(v, np.float16) for v in (3 + rnd(4, 8), rnd(8), rnd(8)))
    f = {"x": x, "s": s, "b": b}
    f64 = {k: v.astype(np.float64) for k, v in f.items()}
    cots = {k: v.astype(np.float16) for k, v in cotangent(build, f64).items()}
    want = grads(build, TensorProto.DOUBLE, f64 | {k: v.astype(np.float64) for k, v in cots.items()}, ["x", "s", "b"])
    got = grads(build, TensorProto.FLOAT16, f | cots, ["x", "s", "b"], on="ort")
    for w, g16, g64 in zip("xsb", got, want):
        assert g16.dtype == np.float16
        np.testing.assert_allclose(g16.astype(np.float64), g64, atol=2e-2 * np.abs(g64).max(), err_msg=w)
    assert casts_to(build, TensorProto.FLOAT16, ["x"], TensorProto.FLOAT)


def test_layer_norm_unknown_rank():
    build = unknown_rank(lambda elem: [helper.make_node("LayerNormalization", ["x", "s", "b"], ["z"], name="ln3")],
                         [("s", [4]), ("b", [4])])
    with pytest.raises(GradientError, match="LayerNormalization node 'ln3': the rank of X is unknown"):
        gradient_model(with_loss(build(TensorProto.DOUBLE), TensorProto.DOUBLE), ["x"])


# ---------------------------------------------------------------- BatchNormalization
BN_IN = ["x", "s", "b", "m", "v"]


def batch_norm(xs, *, opset=15, consts=None, **attrs):
    c = xs[1]
    shapes = [("x", xs)] + [(n, (c,)) for n in BN_IN[1:]]
    consts = dict(consts or {})
    return one_op("BatchNormalization", [(n, s) for n, s in shapes if n not in consts], order=BN_IN,
                  consts=consts, opset=opset, **attrs)


def bn_feeds(xs, sizes, names=BN_IN):
    c = xs[1]
    make = {"x": lambda: rnd(*sized(xs, sizes)), "s": lambda: rnd(c), "b": lambda: rnd(c), "m": lambda: rnd(c),
            "v": lambda: pos(c)}
    return {k: make[k]() for k in names}


@pytest.mark.parametrize("opset,eps", [(14, None), (15, 1e-2), (15, 0.3)])
@pytest.mark.parametrize("xs", [("N", 3), ("N", 3, "L"), ("N", 3, "H", "W"), ("N", 2, "D", 2, "W")])
def test_batch_norm(xs, opset, eps):
    attrs = {} if eps is None else {"epsilon": eps}
    if opset == 14:
        attrs["training_mode"] = 0
    build = batch_norm(xs, opset=opset, **attrs)
    check_gradient(build, bn_feeds(xs, {"N": 2, "L": 3, "H": 2, "W": 3, "D": 2}), BN_IN,
                   more_feeds=[bn_feeds(xs, {"N": 3, "L": 1, "H": 3, "W": 1, "D": 1})])


def test_batch_norm_opset13():
    # BatchNormalization-9 with the single output Y is the inference form; onnx's reference runs it with
    # batch statistics (it keys on momentum), so finite differences run on ONNX Runtime
    xs = ("N", 3, "H")
    build = batch_norm(xs, opset=13, epsilon=0.1)
    for sizes in ({"N": 2, "H": 3}, {"N": 3, "H": 1}):
        ort_check(build, bn_feeds(xs, sizes), BN_IN, samples=None, check_f32=False)


@pytest.mark.parametrize("wrt", [["x"], ["s", "v"], ["m"], ["b"]])
def test_batch_norm_partial(wrt):
    xs = ("N", 3, 2, 2)
    consts = {k: v for k, v in bn_feeds(xs, {}, BN_IN[1:]).items() if k not in wrt}
    build = batch_norm(xs, consts=consts)
    check_gradient(build, bn_feeds(xs, {"N": 2}, ["x", *wrt]), wrt)


def test_batch_norm_mixed_types():
    # opset 15: float16 X with float scale/B/mean/var; each gradient in its operand's type
    def build(elem):
        ins = [vi("x", elem, ["N", 3, 4])] + [vi(n, TensorProto.FLOAT if elem == TensorProto.FLOAT16 else elem, [3])
                                             for n in BN_IN[1:]]
        node = helper.make_node("BatchNormalization", BN_IN, ["y0"], epsilon=0.1)
        return model([node], ins, [vi("y0", elem, None)], opset=15)

    f = bn_feeds(("N", 3, 4), {"N": 2})
    f16 = {k: v.astype(np.float16 if k == "x" else np.float32) for k, v in f.items()}
    f64 = {k: v.astype(np.float64) for k, v in f16.items()}
    cot = cotangent(build, f64)
    want = grads(build, TensorProto.DOUBLE, f64 | {k: v.astype(np.float16).astype(np.float64) for k, v in cot.items()},
                 BN_IN)
    got = grads(build, TensorProto.FLOAT16, f16 | {k: v.astype(np.float16) for k, v in cot.items()}, BN_IN, on="ort")
    for w, gl, g64 in zip(BN_IN, got, want):
        assert gl.dtype == f16[w].dtype, w
        np.testing.assert_allclose(gl.astype(np.float64), g64, atol=1e-2 * np.abs(g64).max(), err_msg=w)


@pytest.mark.parametrize("opset,attrs,n_out", [(15, {"training_mode": 1}, 3), (14, {"training_mode": 1}, 1),
                                               (13, {}, 5)])
def test_batch_norm_training_refused(opset, attrs, n_out):
    def build(elem):
        nodes = [helper.make_node("BatchNormalization", BN_IN, [f"y{i}" for i in range(n_out)], name="bn7", **attrs)]
        return model(nodes, [vi("x", elem, [2, 3, 4])] + [vi(n, elem, [3]) for n in BN_IN[1:]],
                     [vi("y0", elem, None)], opset=opset)

    graph, _ = to_graph(build(TensorProto.DOUBLE))
    with pytest.raises(GradientError, match="BatchNormalization node 'bn7': training mode"):
        build_gradient(graph, "y0", ["x"])
