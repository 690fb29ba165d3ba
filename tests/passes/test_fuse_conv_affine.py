"""fuse_conv_affine: Conv then a per-channel Mul/Add of a constant -> one Conv."""

import numpy as np
import pytest
from onnx import helper

from passes import EliminateDeadCode
from passes.fusions import FuseConvAffine
from tests.helpers import apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node


def conv_chain(tail, consts, *, bias=True, extra_out=False):
    inits = {"w": f32(4, 3, 3, 3, seed=1), **consts}
    conv_in = ["x", "w"]
    if bias:
        inits["b"] = f32(4, seed=2)
        conv_in.append("b")
    nodes = [H("Conv", conv_in, ["c0"], pads=[1, 1, 1, 1])]
    prev = "c0"
    for i, (op, name) in enumerate(tail):
        nodes.append(H(op, [prev, name], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(H("Relu", [prev], ["y"]))
    outs = [vi("y", [2, 4, 5, 5])]
    if extra_out:
        nodes.append(H("Neg", ["c0"], ["z"]))
        outs.append(vi("z", [2, 4, 5, 5]))
    return make_model(nodes, [vi("x", [2, 3, 5, 5])], outs, inits)


def run(m):
    out, (res, _) = apply(m, FuseConvAffine(), EliminateDeadCode())
    assert_same_on_ort(m, out, {"x": f32(2, 3, 5, 5, seed=9)}, rtol=1e-5, atol=1e-5)
    again, (res2,) = apply(out, FuseConvAffine())
    assert not res2.modified and ops(again) == ops(out)
    return out, res


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (1,), ()], ids=["c11", "1c11", "1", "scalar"])
@pytest.mark.parametrize("bias", [True, False])
def test_mul_add_fused(shape, bias):
    s = np.random.default_rng(3).uniform(0.5, 2, shape).astype(np.float32)
    t = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    out, res = run(conv_chain([("Mul", "s"), ("Add", "t")], {"s": s, "t": t}, bias=bias))
    assert ops(out) == ["Conv", "Relu"] and res.stats == {"mul": 1, "add": 1}


def test_other_shapes_not_fused():
    s = f32(1, 4, 5, 1)  # varies along a spatial axis
    out, res = run(conv_chain([("Mul", "s")], {"s": s}))
    assert ops(out) == ["Conv", "Mul", "Relu"] and not res.modified


def test_conv_output_read_elsewhere_not_fused():
    out, res = run(conv_chain([("Mul", "s")], {"s": f32(4, 1, 1)}, extra_out=True))
    assert "Mul" in ops(out) and not res.modified


def test_shared_weight_not_fused():
    m = make_model([H("Conv", ["x", "w"], ["c0"]), H("Mul", ["c0", "s"], ["y"]), H("Conv", ["x", "w"], ["z"])],
                   [vi("x", [1, 3, 4, 4])], [vi("y", [1, 4, 2, 2]), vi("z", [1, 4, 2, 2])],
                   {"w": f32(4, 3, 3, 3), "s": f32(4, 1, 1)})
    out, res = apply(m, FuseConvAffine())
    assert not res[0].modified
