"""add_layernorm_bias: a zero bias for ONNX Runtime training's LayerNormalization gradient."""

import numpy as np
import onnx
from onnx import helper

from passes import AddLayerNormBias
from tests.helpers import apply, assert_same_on_ort, make_model, vi
from tests.passes.layernorm_models import ln_model

H = helper.make_node


def test_bias_added_as_zero_of_scale_shape():
    m = ln_model(bias=False, axis=-2)
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
