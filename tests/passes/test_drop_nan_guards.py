"""drop_nan_guards: Where(IsNaN(s), k, s) -> s (npu: a quantized tensor holds no NaN)."""

import numpy as np

from passes import DropNanGuards
from tests.helpers import assert_same_on_ort, run
from tests.passes.mask_models import FEEDS, apply_each, mask_model


def test_drop_nan_guard():
    m = mask_model(-1e4)
    stats, out = apply_each(m, DropNanGuards())
    assert stats == [{"nan_guards_dropped": 1}]
    assert not any(n.name == "guard" for n in out.graph.node)
    assert_same_on_ort(m, out, FEEDS, rtol=0, atol=0)
    np.testing.assert_array_equal(run(out, FEEDS)[0], run(m, FEEDS)[0])
