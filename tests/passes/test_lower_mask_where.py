"""lower_mask_where: Where(c, 0, k) -> Cast(Not c) * k, exactly (npu)."""

from passes import LowerMaskWhere
from tests.helpers import assert_same_on_ort
from tests.passes.mask_models import FEEDS, apply_each, mask_model


def test_lower_mask_where_is_exact():
    for zero_first in (True, False):
        m = mask_model(-1e4, zero_first)
        stats, out = apply_each(m, LowerMaskWhere())
        assert stats == [{"where_lowered": 1}]
        assert [n.op_type for n in out.graph.node].count("Where") == 1  # only the guard is left
        assert_same_on_ort(m, out, FEEDS, rtol=0, atol=0)
