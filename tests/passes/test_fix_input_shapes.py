"""fix_input_shapes: every dynamic dim fixed, outputs follow, mismatches refused."""

import numpy as np
import pytest

from passes import to_graph, to_model
from passes.fix_input_shapes import FixInputShapes, ShapeError, dynamic_dims
from tests.helpers import assert_same_on_ort
from tests.targets.models import classifier


def test_fixes_inputs_and_outputs():
    m = classifier()
    g, env = to_graph(m)
    assert dynamic_dims(g) == {"x": [0]}
    res = FixInputShapes({"x": (2, 3, 16, 16)})(g)
    assert res.stats == {"inputs_fixed": 1, "outputs_fixed": 1}
    out = to_model(g, env)
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 16, 16]
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [2, 5]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    assert_same_on_ort(m, out, feeds)
    assert not FixInputShapes({"x": (2, 3, 16, 16)})(g).modified  # idempotent


@pytest.mark.parametrize("shapes, msg", [
    ({"x": (1, 3, 8, 16)}, "dim 2 is fixed at 16"),
    ({"x": (1, 3, 16)}, "rank 4"),
    ({"nope": (1,)}, "no graph input named nope"),
    ({}, "dynamic dims left"),
    ({"x": (0, 3, 16, 16)}, "below 1"),
])
def test_refuses_bad_shapes(shapes, msg):
    g, _ = to_graph(classifier())
    with pytest.raises(ShapeError, match=msg):
        FixInputShapes(shapes)(g)
