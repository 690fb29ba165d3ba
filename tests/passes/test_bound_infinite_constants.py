"""bound_infinite_constants: -inf (and finite stand-ins) mask fill values become -100 (npu)."""

import numpy as np
from onnx import numpy_helper

from passes import BoundInfiniteConstants
from tests.helpers import assert_same_on_ort
from tests.passes.mask_models import FEEDS, apply_each, mask_model


def test_bound_infinite_fill_value_keeps_softmax():
    m = mask_model(-np.inf)
    stats, out = apply_each(m, BoundInfiniteConstants())
    assert stats == [{"constants_bounded": 1}]
    fill = next(t for t in out.graph.initializer if t.name == "fill")
    assert numpy_helper.to_array(fill).tolist() == [-100.0]
    # masked weights stay ~0: exp(-100) is below fp32's normal range
    assert_same_on_ort(m, out, FEEDS, rtol=1e-6, atol=1e-30)


def test_finite_stand_ins_for_minus_inf_are_bounded_too():
    """float32's lowest value (Llama dynamo exports), fp16's -65504 and -10000 act
    as -inf and would spend the quantized range: bounded like -inf; -50 is kept."""
    for fill in (float(np.finfo(np.float32).min), -65504.0, -1e4):
        m = mask_model(fill)
        stats, out = apply_each(m, BoundInfiniteConstants())
        assert stats == [{"constants_bounded": 1}], fill
        fill_t = next(t for t in out.graph.initializer if t.name == "fill")
        assert numpy_helper.to_array(fill_t).tolist() == [-100.0]
        assert_same_on_ort(m, out, FEEDS, rtol=1e-6, atol=1e-30)
    stats, _ = apply_each(mask_model(-50.0), BoundInfiniteConstants())
    assert stats == [{}]
