"""Gradient rules checked against float64 finite differences: Conv, ConvTranspose, pools.

Batch and spatial dims are symbolic wherever the form allows it, and then re-checked at
a second batch and spatial size; float32 ONNX Runtime (its Conv kernels are float only)
is compared against the float64 gradients.  onnx's reference evaluator runs the float64
side, with ConvTranspose replaced (below); MaxPool is checked on ONNX Runtime alone.
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from passes.gradient import GradientError

from . import harness
from .harness import check_gradient, model, one_op, ort_check, vi

R = np.random.default_rng(0)


def rnd(*shape):
    return R.standard_normal(shape)


class ConvTranspose(OpRun):
    """ConvTranspose for onnx's reference evaluator: its own fails on group > 1, on output_shape
    without auto_pad and on output_padding >= stride.  Each kernel tap adds its product
    at input position * stride + tap * dilation of the full output, then the pads are cropped
    off (``test_reference_conv_transpose_matches_ort`` holds it to ONNX Runtime)."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        n, G, k = X.ndim - 2, group or 1, W.shape[2:]
        s, d, op = strides or [1] * n, dilations or [1] * n, output_padding or [0] * n
        D = X.shape[2:]
        full = [s[i] * (D[i] - 1) + (k[i] - 1) * d[i] + 1 + op[i] for i in range(n)]
        if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = list(output_shape)[-n:] if output_shape is not None else [D[i] * s[i] for i in range(n)]
            tot = [f - t for f, t in zip(full, target)]
            begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in tot]
            pads = begin + [t - b for t, b in zip(tot, begin)]
        elif auto_pad == "VALID" or pads is None:
            pads = [0] * (2 * n)
        N, C, M = X.shape[0], X.shape[1], W.shape[1] * G
        xg, wg = X.reshape(N, G, C // G, *D), W.reshape(G, C // G, W.shape[1], *k)
        y = np.zeros((N, M, *full), X.dtype)
        for j in np.ndindex(*k):
            at = tuple(slice(j[i] * d[i], j[i] * d[i] + (D[i] - 1) * s[i] + 1, s[i]) for i in range(n))
            y[(slice(None), slice(None)) + at] += np.einsum("ngc...,gcm->ngm...", xg, wg[(...,) + j]).reshape(N, M, *D)
        y = y[(slice(None), slice(None)) + tuple(slice(pads[i], full[i] - pads[n + i]) for i in range(n))]
        return (y + B.reshape(1, -1, *[1] * n) if B is not None else y,)


@pytest.fixture(autouse=True)
def _reference_with_fixed_conv_transpose(monkeypatch):
    # The harness runs forward and backward graphs on onnx's reference evaluator;
    # the Conv input gradient is a grouped ConvTranspose.
    monkeypatch.setattr(harness, "ReferenceEvaluator", functools.partial(ReferenceEvaluator, new_ops=[ConvTranspose]))


def concrete(decl, sizes):
    """``decl`` with its symbolic dims taken from ``sizes`` (a dict: dim name -> size)."""
    return tuple(sizes[d] if isinstance(d, str) else d for d in decl)


def check_op(op, xdecl, sizes, w=None, opset=17, check_ort=True, samples=16, **attrs):
    """One ``op`` node over x (dims ``xdecl``) [and weight ``w`` and a bias], checked at each
    binding of its symbolic dims in ``sizes`` (the first one, then the others as more feeds)."""
    inputs = [("x", xdecl)]
    if w is not None:
        out_ch = w[0] if op == "Conv" else w[1] * attrs.get("group", 1)
        inputs += [("w", w), ("b", (out_ch,))]
    build = one_op(op, inputs, opset=opset, **attrs)

    def feeds(sz):
        return {n: rnd(*concrete(s, sz)) for n, s in inputs}

    check_gradient(build, feeds(sizes[0]), [n for n, _ in inputs], more_feeds=[feeds(s) for s in sizes[1:]],
                   samples=samples, check_ort=check_ort)


NHW = [{"N": 2, "H": 7, "W": 6}, {"N": 3, "H": 5, "W": 9}]
NL = [{"N": 2, "L": 9}, {"N": 1, "L": 12}]
N = [{"N": 2}, {"N": 3}]


# ---------------------------------------------------------------- Conv
@pytest.mark.parametrize("xdecl,sizes,w,attrs", [
    (("N", 3, "H", "W"), NHW, (4, 3, 3, 3), {}),
    (("N", 3, "H", "W"), NHW, (4, 3, 3, 2), dict(strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1])),
    (("N", 4, "H", "W"), NHW, (6, 2, 3, 2), dict(group=2, strides=[2, 2], pads=[0, 1, 1, 0])),
    (("N", 4, "H", "W"), NHW, (4, 1, 3, 3), dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1])),  # depthwise
    (("N", 3, "H", "W"), NHW, (6, 1, 2, 3), dict(group=3, dilations=[2, 1], kernel_shape=[2, 3])),  # multiplier 2
    # stride > kernel: rows and columns no window reads (their gradient is 0), at the end too
    (("N", 2, "H", "W"), [{"N": 2, "H": 8, "W": 7}, {"N": 1, "H": 10, "W": 9}], (3, 2, 3, 2), dict(strides=[3, 3])),
    ((2, 2, 8, 7), [{}], (3, 2, 3, 2), dict(strides=[3, 3], pads=[1, 0, 0, 0])),
    (("N", 3, "L"), NL, (2, 3, 3), dict(strides=[2], dilations=[2], pads=[2, 1])),
    (("N", 4, "L"), NL, (6, 2, 2), dict(group=2, strides=[3], pads=[0, 2], kernel_shape=[2])),
    (("N", 2, "D", "H", "W"), [{"N": 2, "D": 4, "H": 5, "W": 4}, {"N": 1, "D": 5, "H": 3, "W": 6}],
     (4, 1, 2, 3, 2), dict(group=2, strides=[2, 1, 2], pads=[1, 0, 1, 0, 1, 0])),
    (("N", 3, "H", "W"), NHW, (4, 3, 2, 2), dict(auto_pad="VALID", strides=[2, 2])),
    (("N", 3, 7, 6), N, (4, 3, 3, 2), dict(auto_pad="SAME_UPPER", strides=[2, 2], kernel_shape=[3, 2])),
    (("N", 4, 7, 6), N, (4, 2, 4, 3), dict(auto_pad="SAME_LOWER", group=2, strides=[2, 1])),
    (("N", 3, 9), N, (2, 3, 4), dict(auto_pad="SAME_LOWER", strides=[2])),
], ids=["plain", "strided_dilated_asym_pads", "grouped", "depthwise", "depthwise_x2_dilated", "uncovered_rows",
        "uncovered_rows_static", "1d", "1d_grouped", "3d_grouped", "valid", "same_upper", "same_lower_grouped",
        "1d_same_lower"])
def test_conv(xdecl, sizes, w, attrs):
    check_op("Conv", xdecl, sizes, w, **attrs)


def test_conv_same_dilated():
    # ONNX Runtime has no SAME with dilations (float64 reference only)
    check_op("Conv", ("N", 2, 8, 7), N, (3, 2, 3, 2), auto_pad="SAME_UPPER", dilations=[2, 3], strides=[2, 1],
             check_ort=False)


@pytest.mark.parametrize("wrt", [["x"], ["w"]])
def test_conv_no_bias_one_input(wrt):
    build = one_op("Conv", [("x", ("N", 4, "H", "W")), ("w", (4, 2, 3, 3))], group=2, pads=[1, 1, 0, 0])
    feeds = [{"x": rnd(2, 4, 5, 6), "w": rnd(4, 2, 3, 3)}, {"x": rnd(1, 4, 6, 3), "w": rnd(4, 2, 3, 3)}]
    check_gradient(build, feeds[0], wrt, more_feeds=feeds[1:])


def test_conv_same_symbolic_refused():
    build = one_op("Conv", [("x", ("N", 3, "H", 6)), ("w", (4, 3, 3, 3))], auto_pad="SAME_UPPER")
    with pytest.raises(GradientError, match="SAME_UPPER.*symbolic"):
        check_gradient(build, {"x": rnd(1, 3, 6, 6), "w": rnd(4, 3, 3, 3)}, ["x"])


# ---------------------------------------------------------------- ConvTranspose
@pytest.mark.parametrize("xdecl,sizes,w,attrs", [
    (("N", 3, "L"), NL, (3, 2, 3), dict(strides=[2], pads=[1, 0], output_padding=[1])),
    (("N", 3, "H", "W"), NHW, (3, 2, 3, 3), dict(strides=[2, 2], dilations=[2, 1], pads=[1, 0, 0, 2],
                                                   output_padding=[1, 1])),
    (("N", 4, "H", "W"), NHW, (4, 3, 3, 2), dict(group=2, strides=[2, 1], pads=[1, 0, 0, 1])),
    (("N", 4, "H", "W"), NHW, (4, 1, 3, 3), dict(group=4, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0])),
    (("N", 2, "D", "H", "W"), [{"N": 2, "D": 3, "H": 4, "W": 3}, {"N": 1, "D": 2, "H": 3, "W": 5}],
     (2, 2, 2, 2, 3), dict(group=2, strides=[2, 1, 2], pads=[0, 1, 0, 1, 0, 1])),
    (("N", 3, "L"), NL, (3, 2, 4), dict(auto_pad="VALID", strides=[2])),
    (("N", 3, "L"), NL, (3, 2, 4), dict(auto_pad="SAME_UPPER", strides=[3])),  # odd total pad: 1
    (("N", 3, "H", "W"), NHW, (3, 2, 4, 4), dict(auto_pad="SAME_LOWER", strides=[2, 3], kernel_shape=[4, 4])),
    (("N", 3, 5), N, (3, 2, 4), dict(strides=[2], output_shape=[9])),
    (("N", 3, 5, 4), N, (3, 2, 4, 3), dict(strides=[2, 2], output_shape=[9, 8], auto_pad="SAME_UPPER")),
    (("N", 3, 5, 4), N, (3, 2, 4, 3), dict(strides=[2, 2], output_shape=[10, 8], auto_pad="SAME_LOWER",
                                          output_padding=[1, 0])),
], ids=["1d_output_padding", "dilated_asym_pads", "grouped", "depthwise", "3d_grouped",
        "valid", "same_upper", "same_lower", "output_shape", "output_shape_same_upper", "output_shape_same_lower"])
def test_conv_transpose(xdecl, sizes, w, attrs):
    check_op("ConvTranspose", xdecl, sizes, w, **attrs)


def test_conv_transpose_output_padding_past_stride():
    # more than a stride of y rows past the end pad that no input reaches (ONNX Runtime refuses
    # output_padding >= stride: float64 reference only)
    check_op("ConvTranspose", ("N", 2, "L"), NL, (2, 3, 2), dilations=[3], output_padding=[2], pads=[0, 1],
             check_ort=False)


@pytest.mark.parametrize("xdecl,attrs,match", [
    (("N", 3, "L"), dict(strides=[2], output_shape=[9]), "symbolic"),
    (("N", 3, 5), dict(strides=[2], output_shape=[13]), "larger"),
    (("N", 3, "L"), dict(strides=[3], auto_pad="SAME_UPPER", kernel_shape=[2]), "larger"),
])
def test_conv_transpose_refused(xdecl, attrs, match):
    w = (3, 2, attrs.get("kernel_shape", [4])[0])
    build = one_op("ConvTranspose", [("x", xdecl), ("w", w)], **attrs)
    with pytest.raises(GradientError, match=match):
        check_gradient(build, {"x": rnd(1, 3, 5), "w": rnd(*w)}, ["x"])


@pytest.mark.parametrize("x,w,attrs", [
    ((2, 3, 5, 4), (3, 2, 3, 2), dict(strides=[2, 3], dilations=[2, 1], pads=[1, 0, 2, 1], output_padding=[1, 2])),
    ((2, 4, 5, 3), (4, 3, 3, 2), dict(group=2, strides=[2, 1], pads=[1, 0, 0, 1])),
    ((2, 4, 5), (4, 1, 3), dict(group=4, strides=[2], output_padding=[1])),
    ((2, 2, 3, 4, 3), (2, 2, 2, 2, 3), dict(group=2, strides=[2, 1, 2], pads=[0, 1, 0, 1, 0, 1])),
    ((2, 3, 5), (3, 2, 4), dict(strides=[2], auto_pad="VALID")),
    ((2, 3, 5), (3, 2, 4), dict(strides=[3], auto_pad="SAME_UPPER")),
    ((2, 3, 5, 4), (3, 2, 4, 4), dict(strides=[2, 3], auto_pad="SAME_LOWER", output_padding=[1, 0])),
    ((2, 3, 5), (3, 2, 4), dict(strides=[2], output_shape=[9])),
    ((2, 3, 5, 4), (3, 2, 4, 3), dict(strides=[2, 2], output_shape=[9, 8], auto_pad="SAME_LOWER")),
    ((2, 3, 5, 4), (3, 2, 4, 3), dict(strides=[2, 2], output_shape=[9, 8], auto_pad="SAME_UPPER")),
])
def test_reference_conv_transpose_matches_ort(x, w, attrs):
    inputs = [("x", x), ("w", w), ("b", (w[1] * attrs.get("group", 1),))]
    m = one_op("ConvTranspose", inputs, **attrs)(TensorProto.FLOAT)
    f = {n: rnd(*s).astype(np.float32) for n, s in inputs}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f)[0]
    got = ReferenceEvaluator(m, new_ops=[ConvTranspose]).run(None, f)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- pools
@pytest.mark.parametrize("xdecl,sizes,attrs,opset", [
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[2, 2]), 17),
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 1, 1, 0]), 17),
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 1, 1, 0], count_include_pad=1), 17),
    # ceil_mode: a last, partial window on both axes at both sizes
    (("N", 2, "H", "W"), [{"N": 2, "H": 8, "W": 6}, {"N": 1, "H": 6, "W": 5}],
     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1), 17),
    (("N", 2, "H", "W"), [{"N": 2, "H": 8, "W": 6}, {"N": 1, "H": 6, "W": 5}],
     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1, count_include_pad=1), 17),
    (("N", 3, "L"), NL, dict(kernel_shape=[3], strides=[2], ceil_mode=1, count_include_pad=1), 17),
    (("N", 3, "L"), NL, dict(kernel_shape=[2], strides=[3]), 17),  # uncovered positions
    ((2, 3, 9, 5), [{}], dict(kernel_shape=[2, 2], strides=[3, 2], pads=[1, 0, 0, 0]), 17),
    (("N", 3, 7, 6), N, dict(kernel_shape=[3, 2], auto_pad="SAME_UPPER", strides=[2, 1]), 17),
    (("N", 3, 7, 6), N, dict(kernel_shape=[3, 2], auto_pad="SAME_LOWER", strides=[2, 1], count_include_pad=1), 17),
    (("N", 3, 7, 6), N, dict(kernel_shape=[2, 2], auto_pad="VALID", strides=[2, 2]), 17),
    (("N", 3, "L"), NL, dict(kernel_shape=[3], dilations=[2], pads=[1, 2]), 19),
    (("N", 3, "L"), NL, dict(kernel_shape=[3], dilations=[2], strides=[2], pads=[1, 2], ceil_mode=1,
                             count_include_pad=1), 19),
    (("N", 2, "D", "H", "W"), [{"N": 1, "D": 4, "H": 5, "W": 6}, {"N": 2, "D": 3, "H": 4, "W": 5}],
     dict(kernel_shape=[2, 2, 3], strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 1]), 17),
], ids=["plain", "pads_exclude", "pads_include", "ceil_exclude", "ceil_include", "1d_ceil_no_pads", "1d_uncovered",
        "uncovered_static", "same_upper", "same_lower_include", "valid", "dilated", "dilated_ceil_include", "3d"])
def test_average_pool(xdecl, sizes, attrs, opset):
    check_op("AveragePool", xdecl, sizes, opset=opset, **attrs)


def test_average_pool_same_symbolic_refused():
    build = one_op("AveragePool", [("x", ("N", 3, "H", "W"))], kernel_shape=[3, 3], auto_pad="SAME_LOWER")
    with pytest.raises(GradientError, match="SAME_LOWER"):
        check_gradient(build, {"x": rnd(1, 3, 5, 5)}, ["x"])


@pytest.mark.parametrize("xdecl,sizes", [
    (("N", 3, "H", "W"), NHW), (("N", 3, "L"), NL), ((2, 3, 4, 3, 2), [{}]),
])
def test_global_average_pool(xdecl, sizes):
    check_op("GlobalAveragePool", xdecl, sizes)


@pytest.mark.parametrize("xdecl,sizes,attrs,opset", [
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[2, 2]), 17),
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 1, 1, 0]), 17),
    (("N", 2, "H", "W"), [{"N": 2, "H": 8, "W": 6}, {"N": 1, "H": 6, "W": 5}],
     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 0], ceil_mode=1), 17),
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[2, 3], dilations=[2, 1], strides=[1, 2], pads=[1, 0, 0, 1]), 17),
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[3, 2], auto_pad="SAME_UPPER", strides=[2, 1]), 17),  # pads not needed
    (("N", 3, "L"), NL, dict(kernel_shape=[3], strides=[2], pads=[1, 1]), 17),
    (("N", 2, "D", "H", "W"), [{"N": 1, "D": 4, "H": 5, "W": 6}, {"N": 2, "D": 3, "H": 4, "W": 5}],
     dict(kernel_shape=[2, 2, 3], strides=[2, 1, 2], pads=[0, 1, 1, 1, 0, 1]), 17),
    # opset < 16: plain ScatterElements, exact for windows that do not overlap
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[2, 2], strides=[2, 2]), 13),
    (("N", 3, "H", "W"), NHW, dict(kernel_shape=[2, 2], dilations=[2, 1], strides=[3, 2], ceil_mode=1), 13),
], ids=["plain", "strided_pads", "ceil", "dilated", "same_upper", "1d", "3d", "opset13", "opset13_dilated_ceil"])
def test_max_pool(xdecl, sizes, attrs, opset):
    build = one_op("MaxPool", [("x", xdecl)], opset=opset, **attrs)
    ort_check(build, [{"x": rnd(*concrete(xdecl, sz))} for sz in sizes], ["x"])


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_with_indices(storage_order):
    # The node's own Indices are used when row-major; column-major ones are recomputed.
    def build(elem):
        node = helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[3, 2], strides=[1, 2],
                                pads=[1, 0, 1, 1], storage_order=storage_order)
        return model([node], [vi("x", elem, ["N", 2, "H", "W"])],
                     [vi("y", elem, None), vi("i", TensorProto.INT64, None)])
    ort_check(build, [{"x": rnd(2, 2, 5, 4)}, {"x": rnd(1, 2, 4, 7)}], ["x"])


def test_max_pool_overlapping_before_opset16_refused():
    build = one_op("MaxPool", [("x", ("N", 3, "H", "W"))], kernel_shape=[3, 3], strides=[2, 2], opset=13)
    with pytest.raises(GradientError, match="overlapping"):
        check_gradient(build, {"x": rnd(1, 3, 5, 5)}, ["x"])


# ---------------------------------------------------------------- together
@pytest.mark.parametrize("opset", [13, 17])
def test_small_cnn(opset):
    # Conv -> Relu -> MaxPool -> depthwise Conv -> AveragePool -> GlobalAveragePool -> ConvTranspose;
    # opset 13: every backward node legal there (MaxPool windows do not overlap)
    def build(elem):
        nodes = [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
            helper.make_node("Conv", ["p1", "w2"], ["c2"], group=4, strides=[2, 1], pads=[1, 1, 1, 1]),
            helper.make_node("AveragePool", ["c2"], ["p2"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
            helper.make_node("GlobalAveragePool", ["p2"], ["g"]),
            helper.make_node("ConvTranspose", ["g", "w3"], ["y"], strides=[2, 2]),
        ]
        ins = [vi("x", elem, ["N", 3, "H", "W"]), vi("w1", elem, [4, 3, 3, 3]), vi("b1", elem, [4]),
               vi("w2", elem, [4, 1, 3, 3]), vi("w3", elem, [4, 2, 2, 2])]
        return model(nodes, ins, [vi("y", elem, None)], opset=opset)

    def feeds(n, h, w):
        return {"x": rnd(n, 3, h, w), "w1": rnd(4, 3, 3, 3), "b1": rnd(4), "w2": rnd(4, 1, 3, 3), "w3": rnd(4, 2, 2, 2)}

    check_gradient(build, feeds(2, 9, 8), ["x", "w1", "b1", "w2", "w3"], more_feeds=[feeds(1, 6, 11)], samples=12)
