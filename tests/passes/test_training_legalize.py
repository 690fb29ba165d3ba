"""add_layernorm_stat_outputs, add_layernorm_bias, untie_layernorm_params:
legalization for ONNX Runtime training's LayerNormalization gradient."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from passes import AddLayerNormBias, AddLayerNormStatOutputs, UntieLayerNormParams
from tests.helpers import all_ops, apply, assert_same_on_ort, f32, make_model, vi

H = helper.make_node


def _ln_model(n_out=1, axis=-1, stash=None, bias=True, dtype=TensorProto.FLOAT):
    np_dt = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    attrs = {"axis": axis}
    if stash is not None:
        attrs["stash_type"] = stash
    outs = ["y", "mean", "isd"][:n_out]
    ins = ["x", "s"] + (["b"] if bias else [])
    norm = [2, 3, 4, 5][axis % 4 :]
    inits = {"s": f32(*norm, seed=1).astype(np_dt)}
    if bias:
        inits["b"] = f32(*norm, seed=2).astype(np_dt)
    ax = axis % 4
    stat = [d if k < ax else 1 for k, d in enumerate([2, 3, 4, 5])]
    return make_model(
        [H("LayerNormalization", ins, outs, name="ln1", **attrs)],
        [vi("x", [2, 3, 4, 5], dtype)],
        [vi(o, [2, 3, 4, 5] if o == "y" else stat, dtype if o == "y" else TensorProto.FLOAT) for o in outs],
        inits,
    )


def _value_info(model, name):
    for v in list(model.graph.value_info) + list(model.graph.output):
        if v.name == name:
            return v
    return None


def _dims(v):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]


def test_single_output_layernorm_gets_mean_and_invstddev():
    m = _ln_model(axis=-2)
    out, (res,) = apply(m, AddLayerNormStatOutputs())
    assert res.modified and res.stats == {"LayerNormalization": 1}
    node = out.graph.node[0]
    assert len(node.output) == 3 and all(node.output)
    assert node.output[1] == "ln1_Mean" and node.output[2] == "ln1_InvStdDev"
    for name in node.output[1:]:
        v = _value_info(out, name)
        assert v is not None and v.type.tensor_type.elem_type == TensorProto.FLOAT
        assert _dims(v) == [2, 3, 1, 1]  # dims from axis on are 1 (ONNX spec)
    assert_same_on_ort(m, out)
    # the added outputs are what ORT computes when asked for them
    again, (res2,) = apply(out, AddLayerNormStatOutputs())
    assert not res2.modified, "add_layernorm_stat_outputs is not idempotent"


def test_new_outputs_hold_the_statistics_on_ort():
    from tests.helpers import run

    m = _ln_model()
    out, _ = apply(m, AddLayerNormStatOutputs())
    exposed = onnx.ModelProto()
    exposed.CopyFrom(out)
    for name in out.graph.node[0].output[1:]:
        exposed.graph.output.append(_value_info(out, name))
    x = f32(2, 3, 4, 5, seed=3)
    y, mean, isd = run(exposed, {"x": x})
    want_mean = x.mean(axis=-1, keepdims=True)
    want_isd = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(isd, want_isd, rtol=1e-4, atol=1e-5)


def test_three_outputs_untouched_and_fp16_stash_type():
    m = _ln_model(n_out=3)
    out, (res,) = apply(m, AddLayerNormStatOutputs())
    assert not res.modified and list(out.graph.node[0].output) == ["y", "mean", "isd"]
    # stash_type 1 (float) keeps float32 statistics for a float16 input
    m16 = _ln_model(dtype=TensorProto.FLOAT16)
    out16, (res16,) = apply(m16, AddLayerNormStatOutputs())
    assert res16.modified
    assert _value_info(out16, out16.graph.node[0].output[1]).type.tensor_type.elem_type == TensorProto.FLOAT
    assert_same_on_ort(m16, out16, rtol=1e-3, atol=1e-3)


def test_two_outputs_and_empty_output_names_filled():
    m = _ln_model(n_out=2)
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


def test_bias_added_as_zero_of_scale_shape():
    m = _ln_model(bias=False, axis=-2)
    out, (res,) = apply(m, AddLayerNormBias())
    assert res.modified and len(out.graph.node[0].input) == 3
    b = next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[2])
    arr = onnx.numpy_helper.to_array(b)
    assert arr.shape == (4, 5) and arr.dtype == np.float32 and not arr.any()
    assert_same_on_ort(m, out)
    _, (res2,) = apply(out, AddLayerNormBias())
    assert not res2.modified, "add_layernorm_bias is not idempotent"


def test_bias_not_added_for_computed_scale():
    m = make_model(
        [H("Relu", ["sc"], ["s"]), H("LayerNormalization", ["x", "s"], ["y"])],
        [vi("x", [2, 5]), vi("sc", [5])],
        [vi("y", [2, 5])],
    )
    out, (res,) = apply(m, AddLayerNormBias())
    assert not res.modified and res.stats == {"skipped_unknown_scale": 1}


def _shared_model():
    # torch's pattern: one initializer, Identity copies for the other layers
    return make_model(
        [
            H("LayerNormalization", ["x", "w", "b"], ["a"], name="ln0"),
            H("Identity", ["w"], ["w1"]),
            H("Identity", ["b"], ["b1"]),
            H("LayerNormalization", ["a", "w1", "b1"], ["c"], name="ln1"),
            H("LayerNormalization", ["c", "w", "w"], ["y"], name="ln2"),
        ],
        [vi("x", [2, 5])],
        [vi("y", [2, 5])],
        {"w": f32(5), "b": f32(5, seed=1)},
    )


def test_untie_shared_layernorm_params():
    m = _shared_model()
    out, (res,) = apply(m, UntieLayerNormParams())
    assert res.modified and res.stats == {"untied": 4}
    lns = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    assert list(lns[0].input) == ["x", "w", "b"]
    params = [x for n in lns for x in n.input[1:]]
    assert len(set(params)) == len(params), f"still shared: {params}"
    assert_same_on_ort(m, out)
    _, (res2,) = apply(out, UntieLayerNormParams())
    assert not res2.modified, "untie_layernorm_params is not idempotent"


def test_untie_leaves_trainable_and_unshared_alone():
    out, (res,) = apply(_shared_model(), UntieLayerNormParams(exclude=["w"]))
    assert res.stats == {"untied": 1, "skipped_trainable": 3}
    _, (res2,) = apply(_ln_model(n_out=3), UntieLayerNormParams())
    assert not res2.modified and res2.stats == {}
    assert "LayerNormalization" in all_ops(out)
