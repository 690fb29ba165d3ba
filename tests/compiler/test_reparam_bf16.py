"""bfloat16 weights (stored in bf16, computed through a Cast, as exporters write
them): insert keeps the function, fold writes bf16 back under W0's name."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import reparam
from passes import reparam as rp
from tests.helpers import assert_same_on_ort


def _bf16_model():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(ml_dtypes.bfloat16)
    g = helper.make_graph(
        [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT, name="cast"),
         helper.make_node("MatMul", ["x", "Wf"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor("W", TensorProto.BFLOAT16, w.shape, w.tobytes(), raw=True)],  # onnx 1.17 lacks from_array(bf16)
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _bf16(t: onnx.TensorProto) -> np.ndarray:
    # onnx < 1.18's to_array returns bf16 as float32; read the stored bits
    return np.frombuffer(t.raw_data, ml_dtypes.bfloat16).reshape(tuple(t.dims))


@pytest.mark.parametrize("fact", ["full", "vector", "rank:4"])
def test_bf16_weight_insert_fold(fact, capsys):
    m = _bf16_model()
    ins = reparam.insert(m, rp.Policy((rp.Rule(factorization=fact, min_size=16),)), measure_latency=False)
    assert ins.report.verified and ins.report.max_abs_diff == 0.0
    assert [w["weight"] for w in ins.report.reparam["inserted"]] == ["W"]
    # untrained: fold gives back the original bf16 bytes
    f0 = reparam.fold(ins.model, measure_latency=False)
    assert {t.name: t.raw_data for t in f0.model.graph.initializer} == {t.name: t.raw_data for t in m.graph.initializer}
    # trained: the folded bf16 weight is W0 + D*V rounded to bf16, and matches the unfolded model
    man = reparam.trainable_manifest(ins.model)
    rng = np.random.default_rng(1)
    vals = {t.name: (rng.standard_normal(numpy_helper.to_array(t).shape) * 0.05).astype(np.float32)
            for t in ins.model.graph.initializer if t.name in man["trainable"]}
    f = reparam.fold(ins.model, vals, measure_latency=False)
    (w,) = [t for t in f.model.graph.initializer if t.name == "W"]
    assert w.data_type == TensorProto.BFLOAT16
    rec = rp.load_records(next(e.value for e in ins.model.metadata_props if e.key == rp.RECORD_KEY))[0]
    w0 = _bf16(m.graph.initializer[0])
    want = (w0.astype(np.float64) + rp.delta(rec, vals)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(_bf16(w).astype(np.float32), want.astype(np.float32))
    unfolded = ins.model
    for t in unfolded.graph.initializer:
        if t.name in vals:
            t.CopyFrom(numpy_helper.from_array(vals[t.name], t.name))
    assert_same_on_ort(unfolded, f.model, rtol=1e-2, atol=1e-2)
    assert capsys.readouterr().out == ""  # nothing printed by the library (gs warns on bf16 loads)
