"""untie_layernorm_params: LayerNormalization parameters shared between nodes
become private copies (ONNX Runtime training names their gradients after them)."""

from onnx import helper

from passes import UntieLayerNormParams
from tests.helpers import all_ops, apply, assert_same_on_ort, f32, make_model, vi
from tests.passes.layernorm_models import ln_model

H = helper.make_node


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
    _, (res2,) = apply(ln_model(n_out=3), UntieLayerNormParams())
    assert not res2.modified and res2.stats == {}
    assert "LayerNormalization" in all_ops(out)
