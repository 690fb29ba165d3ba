"""eliminate_schema_typed_casts: a Cast to the one type the producer's schema allows."""

from onnx import TensorProto, helper

from passes import EliminateSchemaTypedCasts
from tests.helpers import apply, assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node


def run(m, feeds=None):
    out, (res,) = apply(m, EliminateSchemaTypedCasts())
    assert_same_on_ort(m, out, feeds, rtol=0, atol=0)
    again, (res2,) = apply(out, EliminateSchemaTypedCasts())
    assert not res2.modified and ops(again) == ops(out)
    return out, res


def test_cast_of_shape_to_int64_removed_output_name_kept():
    m = make_model([H("Shape", ["x"], ["s"]), H("Cast", ["s"], ["y"], to=TensorProto.INT64)],
                   [vi("x", [2, 3])], [vi("y", [2], TensorProto.INT64)])
    out, res = run(m)
    assert ops(out) == ["Shape"] and res.stats == {"removed": 1}
    assert [o.name for o in out.graph.output] == ["y"]


def test_cast_to_another_type_kept():
    m = make_model([H("Shape", ["x"], ["s"]), H("Cast", ["s"], ["y"], to=TensorProto.FLOAT)],
                   [vi("x", [2, 3])], [vi("y", [2], TensorProto.FLOAT)])
    out, res = run(m)
    assert ops(out) == ["Shape", "Cast"] and not res.modified


def test_cast_after_generic_op_kept():
    m = make_model([H("Relu", ["x"], ["r"]), H("Cast", ["r"], ["y"], to=TensorProto.FLOAT)],
                   [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, res = run(m)  # Relu's T allows several types: the schema proves nothing (eliminate_nop_ops' job)
    assert not res.modified


def test_ml_svm_probabilities_cast_removed():
    svm = H("SVMClassifier", ["x"], ["label", "p"], domain="ai.onnx.ml", classlabels_ints=[0, 1],
            coefficients=[1.0, -1.0, 0.5, 0.25], kernel_type="LINEAR", rho=[0.1], support_vectors=[1.0, 2.0, 3.0, 4.0],
            vectors_per_class=[1, 1], post_transform="NONE", kernel_params=[0.1, 0.0, 3.0])
    g = helper.make_graph([svm, H("Cast", ["p"], ["probabilities"], to=TensorProto.FLOAT)], "t", [vi("x", [3, 2])],
                          [vi("label", [3], TensorProto.INT64), vi("probabilities", [3, 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    out, res = run(m, {"x": f32(3, 2)})
    assert ops(out) == ["SVMClassifier"] and [o.name for o in out.graph.output] == ["label", "probabilities"]
