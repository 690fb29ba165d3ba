"""fuse_conv_batchnorm: Conv followed by inference BatchNormalization."""

import numpy as np
import pytest
from onnx import helper

from passes import FuseConvBatchNorm
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node
RTOL, ATOL = 1e-4, 1e-5  # the fused weights are rounded once, not twice


def bn_params(c, seed=0):
    rng = np.random.default_rng(seed)
    return {"scale": rng.uniform(0.5, 2, c).astype(np.float32), "beta": rng.standard_normal(c).astype(np.float32),
            "mean": rng.standard_normal(c).astype(np.float32), "var": rng.uniform(0.5, 2, c).astype(np.float32)}


def conv_bn(with_bias, *, bn_outputs=("y",), training_mode=None, extra=(), opset=17, dims=2, group=1):
    c_in, c_out = 4, 6
    spatial = [5] * dims
    w = f32(c_out, c_in // group, *([3] * dims), seed=1)
    inits = {"w": w, **bn_params(c_out)}
    conv_in = ["x", "w"]
    if with_bias:
        inits["b"] = f32(c_out, seed=2)
        conv_in.append("b")
    kw = {} if training_mode is None else {"training_mode": training_mode}
    nodes = [H("Conv", conv_in, ["c"], pads=[1] * (2 * dims), group=group, name="conv"),
             H("BatchNormalization", ["c", "scale", "beta", "mean", "var"], list(bn_outputs), epsilon=1e-3, **kw),
             *extra]
    outputs = [vi("y", [1, c_out, *spatial])] + [vi(n, [c_out]) for n in bn_outputs[1:]]
    outputs += [vi(n.output[0], [1, c_out, *spatial]) for n in extra]
    return make_model(nodes, [vi("x", [1, c_in, *spatial])], outputs, inits, opset=opset)


def fuse(m):
    out, (res,) = apply(m, FuseConvBatchNorm())
    assert_same_on_ort(m, out, rtol=RTOL, atol=ATOL)
    _, (res2,) = apply(out, FuseConvBatchNorm())
    assert not res2.modified
    return out, res


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_bn_fused(with_bias):
    m = conv_bn(with_bias)
    out, res = fuse(m)
    assert ops(out) == ["Conv"] and res.stats == {"fused": 1}
    assert list(out.graph.node[0].output) == ["y"]
    assert len(out.graph.node[0].input) == 3
    assert init_names(out) == sorted(["w_bn", ("b" if with_bias else "conv") + "_bn_bias"])


@pytest.mark.parametrize("dims,group", [(1, 1), (3, 1), (2, 2)])
def test_conv_bn_fused_other_ranks_and_groups(dims, group):
    out, res = fuse(conv_bn(True, dims=dims, group=group))
    assert ops(out) == ["Conv"]


def test_bn_training_mode_not_fused():
    m = conv_bn(True, bn_outputs=("y", "rm", "rv"), training_mode=1)
    out, (res,) = apply(m, FuseConvBatchNorm())
    assert ops(out) == ["Conv", "BatchNormalization"] and not res.modified
    assert res.stats.get("skipped_training_mode") == 1


def test_bn_whose_stats_outputs_are_used_not_fused():
    # Opset 9: the optional mean/var outputs exist outside training mode too.
    m = conv_bn(True, bn_outputs=("y", "rm", "rv", "sm", "sv"), opset=9)
    out, (res,) = apply(m, FuseConvBatchNorm())
    assert ops(out) == ["Conv", "BatchNormalization"] and not res.modified
    assert res.stats.get("skipped_bn_stats_used") == 1
    assert [o.name for o in out.graph.output] == ["y", "rm", "rv", "sm", "sv"]


def test_conv_output_also_read_elsewhere_not_fused():
    m = conv_bn(True, extra=[H("Relu", ["c"], ["z"])])
    out, res = fuse(m)
    assert ops(out) == ["Conv", "BatchNormalization", "Relu"] and not res.modified
    assert res.stats.get("skipped_conv_output_shared") == 1


def test_bn_with_dynamic_params_not_fused():
    m = conv_bn(True)
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "mean"))
    m.graph.input.append(vi("mean", [6]))
    out, (res,) = apply(m, FuseConvBatchNorm())
    assert ops(out) == ["Conv", "BatchNormalization"] and not res.modified
    feeds = {"x": f32(1, 4, 5, 5), "mean": f32(6, seed=3)}
    assert_same_on_ort(m, out, feeds)


def test_bn_after_non_conv_untouched():
    inits = bn_params(3)
    m = make_model([H("Relu", ["x"], ["r"]), H("BatchNormalization", ["r", "scale", "beta", "mean", "var"], ["y"])],
                   [vi("x", [1, 3, 4])], [vi("y", [1, 3, 4])], inits)
    out, res = fuse(m)
    assert ops(out) == ["Relu", "BatchNormalization"] and res.stats == {"fused": 0}


def test_shared_weight_not_changed_for_other_conv():
    # Two convs read the same weight; only the one before BN gets new weights.
    m = conv_bn(False, extra=[H("Conv", ["x", "w"], ["z"], pads=[1, 1, 1, 1])])
    out, _ = fuse(m)
    assert ops(out) == ["Conv", "Conv"]
    assert list(out.graph.node[1].input) == ["x", "w"]


def test_bn_with_per_activation_stats_not_fused():
    # BatchNormalization-7 with spatial=0: scale/bias/mean/var are (C, H, W),
    # not one value per output channel.
    c, h, w = 2, 4, 4
    rng = np.random.default_rng(0)
    inits = {"w": f32(c, 3, 3, 3), "sc": rng.uniform(0.5, 2, (c, h, w)).astype(np.float32),
             "be": f32(c, h, w, seed=1), "mu": f32(c, h, w, seed=2), "va": rng.uniform(0.5, 2, (c, h, w)).astype(np.float32)}
    m = make_model([H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                    H("BatchNormalization", ["c", "sc", "be", "mu", "va"], ["y"], spatial=0)],
                   [vi("x", [1, 3, h, w])], [vi("y", [1, c, h, w])], inits, opset=7)
    out, res = fuse(m)
    assert ops(out) == ["Conv", "BatchNormalization"] and not res.modified
    assert res.stats.get("skipped_bn_params_not_per_channel") == 1
