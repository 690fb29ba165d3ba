"""gpu target: fp16 with I/O types kept, the block list in fp32, redundant
Cast pairs removed (the pass itself: tests/passes/test_remove_redundant_casts.py),
numerics within the fp16 tolerance on ORT's CPU provider."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import beats_compiler as bc
from beats_compiler.cli import main
from beats_compiler.targets import TARGETS
from beats_compiler.targets.gpu import FP16_BLOCK_LIST
from tests.helpers import assert_same_on_ort
from tests.targets.models import classifier, mixed_io


def _types(model):
    """tensor name -> elem type, from inputs/outputs/value_info/initializers after inference."""
    m = onnx.shape_inference.infer_shapes(model)
    out = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)}
    out.update({t.name: t.data_type for t in m.graph.initializer})
    return out


def test_gpu_keeps_io_types_and_blocks_ops():
    m = mixed_io()
    r = bc.compile(m, "gpu", measure_latency=False)
    assert r.report.verified, r.report.outputs
    q = r.model
    assert [i.type.tensor_type.elem_type for i in q.graph.input] == [TensorProto.FLOAT, TensorProto.INT64]
    assert [o.type.tensor_type.elem_type for o in q.graph.output] == [TensorProto.FLOAT, TensorProto.INT64]
    types = _types(q)
    by_name = {n.name: n for n in q.graph.node}
    # block list: Softmax and ReduceMean compute in fp32; the MatMuls in fp16
    for name in ("softmax", "reduce"):
        assert types[by_name[name].output[0]] == TensorProto.FLOAT, name
    for name in ("mm1", "mm2"):
        assert types[by_name[name].output[0]] == TensorProto.FLOAT16, name
    assert all(t.data_type == TensorProto.FLOAT16 for t in q.graph.initializer if t.name in ("A", "C"))
    assert "own_cast" in by_name  # the model's own Cast survives
    assert {"Softmax", "ReduceMean"} <= set(r.report.target_details["fp32_ops_present"])
    assert r.report.max_rel_diff < 0.05 or r.report.max_abs_diff < 2e-3


def _cast_pairs(model):
    prod = {o: n for n in model.graph.node for o in n.output}
    types = _types(model)
    pairs = []
    for n in model.graph.node:
        p = prod.get(n.input[0]) if n.op_type == "Cast" else None
        if p is not None and p.op_type == "Cast" and types.get(p.input[0]) == types.get(n.output[0]):
            pairs.append((p.name, n.name))
    return pairs


def test_gpu_removes_cast_pairs_between_fp32_ops():
    # Softmax -> ReduceMean -> Sub(fp16) : the converter puts Cast(fp16)->Cast(fp32) between the two blocked ops
    r = bc.compile(mixed_io(), "gpu", measure_latency=False)
    d = r.report.target_details
    assert d["casts_after_cleanup"] < d["casts_after_conversion"]
    assert _cast_pairs(r.model) == []
    assert any(p["name"] == "remove_redundant_casts" and p["modified"] for p in r.report.passes)


def test_gpu_fp32_ops_extends_block_list():
    r = bc.compile(classifier(), "gpu", fp32_ops=["Relu"], measure_latency=False)
    types = _types(r.model)
    relu = next(n for n in r.model.graph.node if n.op_type == "Relu")
    conv = next(n for n in r.model.graph.node if n.op_type == "Conv")
    assert types[relu.output[0]] == TensorProto.FLOAT
    assert types[conv.output[0]] == TensorProto.FLOAT16
    assert "Relu" in r.report.target_details["fp32_ops"]
    assert set(FP16_BLOCK_LIST) <= set(r.report.target_details["fp32_ops"])


def test_gpu_numerics_within_tolerance():
    m = classifier()
    r = bc.compile(m, "gpu", measure_latency=False)
    assert r.report.verified and r.report.rtol == TARGETS["gpu"].rtol
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    assert_same_on_ort(m, r.model, feeds, rtol=TARGETS["gpu"].rtol, atol=TARGETS["gpu"].atol)


def test_gpu_tolerance_can_fail():
    """The check is real: an rtol/atol of zero cannot hold for fp16."""
    r = bc.compile(classifier(), "gpu", rtol=0.0, atol=0.0, measure_latency=False)
    assert r.report.verified is False


def test_gpu_cli_writes_model_and_report(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mixed_io(), src)
    before = src.read_bytes()
    out, rep = tmp_path / "m.gpu.onnx", tmp_path / "r.json"
    assert main([str(src), "--target", "gpu", "-o", str(out), "--report", str(rep), "-q", "--fp32-ops", "Sub"]) == 0
    assert src.read_bytes() == before
    data = json.loads(rep.read_text())
    assert data["target"] == "gpu" and data["verified"] is True
    assert data["legality"]["source"] == "static" and data["legality"]["ok"]
    assert "Sub" in data["target_details"]["fp32_ops"]
    onnx.checker.check_model(onnx.load(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gpu.onnx", "m.onnx", "r.json"]


@pytest.mark.parametrize("flag", [["--calib", "random"], ["--precompile"], ["--input-shape", "x=1,3,16,16"]])
def test_npu_flags_refused_elsewhere(tmp_path, flag, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(classifier(), src)
    assert main([str(src), "--target", "gpu", "-q", *flag]) == 2
    assert main([str(src), "--target", "cpu", "-q", *flag]) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
