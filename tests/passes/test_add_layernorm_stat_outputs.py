"""add_layernorm_stat_outputs: Mean and InvStdDev outputs for ONNX Runtime
training's LayerNormalization gradient."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes import AddLayerNormStatOutputs
from tests.helpers import apply, assert_same_on_ort, f32, make_model, run, vi
from tests.passes.layernorm_models import dims, ln_model, value_info

H = helper.make_node


def test_single_output_layernorm_gets_mean_and_invstddev():
    m = ln_model(axis=-2)
    out, (res,) = apply(m, AddLayerNormStatOutputs())
    assert res.modified and res.stats == {"LayerNormalization": 1}
    node = out.graph.node[0]
    assert len(node.output) == 3 and all(node.output)
    assert node.output[1] == "ln1_Mean" and node.output[2] == "ln1_InvStdDev"
    for name in node.output[1:]:
        v = value_info(out, name)
        assert v is not None and v.type.tensor_type.elem_type == TensorProto.FLOAT
        assert dims(v) == [2, 3, 1, 1]  # dims from axis on are 1 (ONNX spec)
    assert_same_on_ort(m, out)
    # the added outputs are what ORT computes when asked for them
    again, (res2,) = apply(out, AddLayerNormStatOutputs())
    assert not res2.modified, "add_layernorm_stat_outputs is not idempotent"


def test_new_outputs_hold_the_statistics_on_ort():
    m = ln_model()
    out, _ = apply(m, AddLayerNormStatOutputs())
    exposed = onnx.ModelProto()
    exposed.CopyFrom(out)
    for name in out.graph.node[0].output[1:]:
        exposed.graph.output.append(value_info(out, name))
    x = f32(2, 3, 4, 5, seed=3)
    y, mean, isd = run(exposed, {"x": x})
    want_mean = x.mean(axis=-1, keepdims=True)
    want_isd = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(isd, want_isd, rtol=1e-4, atol=1e-5)


def test_three_outputs_untouched_and_fp16_stash_type():
    m = ln_model(n_out=3)
    out, (res,) = apply(m, AddLayerNormStatOutputs())
    assert not res.modified and list(out.graph.node[0].output) == ["y", "mean", "isd"]
    # stash_type 1 (float) keeps float32 statistics for a float16 input
    m16 = ln_model(dtype=TensorProto.FLOAT16)
    out16, (res16,) = apply(m16, AddLayerNormStatOutputs())
    assert res16.modified
    assert value_info(out16, out16.graph.node[0].output[1]).type.tensor_type.elem_type == TensorProto.FLOAT
    assert_same_on_ort(m16, out16, rtol=1e-3, atol=1e-3)


def test_two_outputs_and_empty_output_names_filled():
    m = ln_model(n_out=2)
    out, (res,) = apply(m, AddLayerNormStatOutputs())
    assert res.modified and list(out.graph.node[0].output)[:2] == ["y", "mean"] and out.graph.node[0].output[2]
    assert_same_on_ort(m, out)
    m2 = make_model(
        [H("LayerNormalization", ["x", "s", "b"], ["y", "", ""], name="")],
        [vi("x", [2, 5])],
        [vi("y", [2, 5])],
        {"s": f32(5), "b": f32(5, seed=1)},
    )
    out2, (res2,) = apply(m2, AddLayerNormStatOutputs())
    assert res2.modified and all(out2.graph.node[0].output)
    assert_same_on_ort(m2, out2)


def test_layernorm_inside_if_branch_and_name_collision():
    sub = helper.make_graph(
        [H("LayerNormalization", ["x", "s"], ["ln_then"], name="ln1")], "then", [], [vi("ln_then", [2, 5])]
    )
    other = helper.make_graph([H("Identity", ["x"], ["ln_else"])], "else", [], [vi("ln_else", [2, 5])])
    m = make_model(
        [
            H("Relu", ["x"], ["ln1_Mean"], name="taken"),  # the fresh name must not collide with this
            H("If", ["c"], ["y"], then_branch=sub, else_branch=other),
            H("Add", ["y", "ln1_Mean"], ["z"]),
        ],
        [vi("x", [2, 5]), vi("c", [], TensorProto.BOOL)],
        [vi("z", [2, 5])],
        {"s": f32(5)},
    )
    out, (res,) = apply(m, AddLayerNormStatOutputs())
    assert res.modified
    body = next(a.g for a in out.graph.node[1].attribute if a.name == "then_branch")
    assert len(body.node[0].output) == 3 and "ln1_Mean" not in body.node[0].output[1:]
    for c in (True, False):
        assert_same_on_ort(m, out, {"x": f32(2, 5, seed=4), "c": np.array(c)})
