"""remove_redundant_casts: Cast pairs left by an fp16 conversion (gpu); a lossy
pair only when both Casts are new and precision gain is allowed."""

import numpy as np
from onnx import TensorProto

from passes import RemoveRedundantCasts, to_graph, to_model
from tests.helpers import assert_same_on_ort, run
from tests.targets.models import cast_chain


def _apply(model, p):
    g, env = to_graph(model)
    res = p(g)
    return res, to_model(g, env)


def test_lossless_pair_removed_and_exact():
    m = cast_chain(TensorProto.FLOAT16, TensorProto.FLOAT)
    res, out = _apply(m, RemoveRedundantCasts())
    assert res.stats == {"lossless_pair": 1}
    assert [n.op_type for n in out.graph.node if n.op_type != "Cast"] == ["Neg"]
    assert sum(n.op_type == "Cast" for n in out.graph.node) <= 1  # the first Cast is dead (DCE removes it)
    assert_same_on_ort(m, out, rtol=0, atol=0)


def test_lossy_pair_kept_unless_new_and_allowed():
    m = cast_chain(TensorProto.FLOAT, TensorProto.FLOAT16)
    assert not _apply(m, RemoveRedundantCasts())[0].modified  # default: never changes values
    assert not _apply(m, RemoveRedundantCasts(frozenset({"c1"}), allow_precision_gain=True))[0].modified
    res, out = _apply(m, RemoveRedundantCasts(frozenset(), allow_precision_gain=True))
    assert res.stats == {"lossy_pair": 1}
    x = {"x": np.array([1.0001, 2.0, -3.3333, 65504.5], np.float32)}
    np.testing.assert_array_equal(run(out, x)[0], -x["x"])  # the fp16 rounding is gone
