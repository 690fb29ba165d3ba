"""Target edge cases met on real models (issue 14): already-quantized and
already-fp16 inputs to gpu, a node the QNN HTP cannot finalize (named, exit 4),
and the npu accuracy metric on outputs that are ~0."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import compile as bc_compile
from beats_compiler.cli import main
from beats_compiler.targets.gpu import to_fp16
from beats_compiler.targets.qnn import NEAR_ZERO, similarity
from beats_compiler.targets.gpu import FP16_BLOCK_LIST


def _mlp(path, rng, embedding: bool = False) -> None:
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    inits = [w1, w2, b]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    if embedding:  # ids -> table rows -> mean: the dynamic quantizer puts a DequantizeLinear on the table
        inits.append(numpy_helper.from_array(rng.standard_normal((20, 16)).astype(np.float32), "table"))
        nodes[:0] = [helper.make_node("Gather", ["table", "ids"], ["e"]),
                     helper.make_node("ReduceMean", ["e"], ["x"], axes=[1], keepdims=0)]
        x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])
    g = helper.make_graph(nodes, "mlp", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                          inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_gpu_on_a_dynamic_int8_model_keeps_fp32_scales(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _mlp(tmp_path / "m.onnx", np.random.default_rng(0), embedding=True)
    quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
    assert {"DynamicQuantizeLinear", "DequantizeLinear"} <= ops
    r = bc_compile(str(tmp_path / "q.onnx"), "gpu")
    assert r.report.verified, r.report.outputs
    ort.InferenceSession(r.model.SerializeToString())  # loads (an fp16 scale would not at opset 17)
    inits = {t.name: t for t in r.model.graph.initializer}
    scales = [n.input[1] for n in r.model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert scales and all(inits[s].data_type == TensorProto.FLOAT for s in scales)
    assert any("int8 already" in w for w in r.report.warnings)
    # converted anyway (a model with fewer int8 weights), the quantization ops keep fp32 scales
    q16 = to_fp16(onnx.load(tmp_path / "q.onnx"), FP16_BLOCK_LIST)
    ort.InferenceSession(q16.SerializeToString())
    assert [d.dim_param for d in r.model.graph.output[0].type.tensor_type.shape.dim] == ["batch", ""]


def test_gpu_on_a_model_already_converted_with_kept_io_types(tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _mlp(tmp_path / "m.onnx", np.random.default_rng(1))
    half = convert_float_to_float16(onnx.load(tmp_path / "m.onnx"), keep_io_types=True)
    assert any(n.name.startswith("graph_output_cast") for n in half.graph.node)
    onnx.save(half, tmp_path / "h.onnx")
    r = bc_compile(str(tmp_path / "h.onnx"), "gpu")
    assert r.report.verified
    assert any("fp16 conversion skipped: 100% of the weights are fp16 already" in w for w in r.report.warnings)
    # converted again anyway (a partly fp16 model), the converter's own Cast names are not duplicated
    onnx.checker.check_model(to_fp16(half, FP16_BLOCK_LIST))
    # the converter also left its input Cast after its reader: sorted on load, and said so
    assert any("topological order: sorted" in w for w in r.report.warnings)
    onnx.checker.check_model(r.model)
    assert [o.name for o in r.model.graph.output] == ["y"]


def _lstm(path) -> None:
    rng = np.random.default_rng(2)
    hidden, feat = 32, 16
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal(s)).astype(np.float32), n) for n, s in
             (("W", (1, 4 * hidden, feat)), ("R", (1, 4 * hidden, hidden)), ("B", (1, 8 * hidden)))]
    g = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], name="the_lstm", hidden_size=hidden)],
        "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 1, feat])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_recurrent_ops_finalize_on_the_htp_of_the_default_soc(tmp_path):
    """Without a SoC model the backend's default one has too little HTP memory for an
    LSTM (QNN_COMMON_ERROR_MEM_ALLOC); every session names one (default 60)."""
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    _lstm(tmp_path / "lstm.onnx")
    r = bc_compile(str(tmp_path / "lstm.onnx"), "npu", calib="random")
    assert r.report.verified, r.report.outputs
    assert r.report.target_details["qnn_provider_options"]["soc_model"] == "60"
    assert r.report.legality["compute_nodes_on_target"] == r.report.legality["compute_nodes_total"]


def test_a_node_the_htp_cannot_finalize_is_named_with_the_setting_to_try(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    import subprocess
    import sys
    import textwrap

    _lstm(tmp_path / "lstm.onnx")
    # A fresh process whose HTP sessions name no SoC (the small default one): the LSTM does
    # not fit.  (In a process where an HTP graph was made for SoC 60 before, it would.)
    script = textwrap.dedent(f"""
        import sys
        from beats_compiler.targets import qnn as npu
        from beats_compiler.cli import main
        real = npu.htp_options
        npu.htp_options = lambda fp16=False, soc_model=None: {{
            k: v for k, v in real(fp16, soc_model).items() if k != "soc_model" or fp16}}
        sys.exit(main([{str(tmp_path / "lstm.onnx")!r}, "--target", "npu", "--calib", "random", "-q"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 4, proc.stderr
    assert len(err) == 1 and len(err[0]) <= 200, err
    assert "node 'the_lstm' (LSTM)" in err[0] and "--activation-type float16" in err[0]
    assert not (tmp_path / "lstm.beats.onnx").exists()


def test_near_zero_reference_is_compared_by_absolute_difference():
    ref = np.full((2, 3), 1e-14, np.float32)
    ref[0, 0] = -3e-14
    assert similarity(ref, np.zeros_like(ref)) == (1.0, similarity(ref, np.zeros_like(ref))[1])
    score, note = similarity(ref, np.full_like(ref, 0.5))
    assert score == 0.0 and "absolute difference" in note
    # an ordinary reference still gets the cosine
    a = np.array([1.0, 2.0, 3.0], np.float32)
    assert similarity(a, 2 * a) == (pytest.approx(1.0), "")
    assert similarity(a, -a)[0] == pytest.approx(-1.0)
    assert NEAR_ZERO < 1e-3


def test_npu_on_an_fp16_model_quantizes_from_fp32(tmp_path):
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _mlp(tmp_path / "m.onnx", np.random.default_rng(3))
    onnx.save(convert_float_to_float16(onnx.load(tmp_path / "m.onnx")), tmp_path / "h.onnx")
    r = bc_compile(str(tmp_path / "h.onnx"), "npu", calib="random", input_shapes={"x": [1, 16]})
    assert r.report.verified, r.report.outputs
    up = next(p for p in r.report.passes if p["name"] == "upcast_float16")
    assert up["modified"] and up["stats"]["edge_casts"] == 2
    assert [i.type.tensor_type.elem_type for i in r.model.graph.input] == [TensorProto.FLOAT16]


def test_npu_keeps_a_qdq_model_s_scales_and_names_a_dynamic_int8_node(tmp_path, capsys):
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    _mlp(tmp_path / "m.onnx", np.random.default_rng(4))
    m = onnx.load(tmp_path / "m.onnx")
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, tmp_path / "m1.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": np.random.default_rng(k).standard_normal((1, 16)).astype(np.float32)}
                            for k in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "m1.onnx"), str(tmp_path / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    scales = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "qdq.onnx").graph.initializer
              if t.name.endswith("_scale")}
    r = bc_compile(str(tmp_path / "qdq.onnx"), "npu", calib="random")
    assert r.report.verified, r.report.outputs
    assert not any(p["name"] == "quantize_qdq" for p in r.report.passes)
    assert any("QDQ-quantized already" in w for w in r.report.warnings)
    kept = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer if t.name in scales}
    assert kept and all(np.array_equal(kept[k], scales[k]) for k in kept)

    quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "dyn.onnx"), weight_type=QuantType.QInt8)
    code = main([str(tmp_path / "dyn.onnx"), "--target", "npu", "--calib", "random", "--input-shape", "x=1,16", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "(DynamicQuantizeLinear) is quantized already" in err[0]


def test_a_backend_crash_is_named_not_suffered(tmp_path, monkeypatch, capsys):
    """The QNN backend can abort the process on a graph it cannot build (a dynamo
    ConvNeXt did, tests/test_real_families.py): the graph is built in a child
    process first, and a crash becomes one line naming the node (exit 4).  Here
    the child aborts whenever the graph holds node 'mm2', as the backend would."""
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    from beats_compiler.targets import qnn as npu

    _mlp(tmp_path / "m.onnx", np.random.default_rng(5))
    monkeypatch.setattr(npu, "_PROBE", "import os, sys, onnx\n"
                        "if any(n.name == 'mm2' for n in onnx.load(sys.argv[1]).graph.node): os.abort()\n")
    code = main([str(tmp_path / "m.onnx"), "--target", "npu", "--calib", "random", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1, err
    assert "crashes (SIGABRT)" in err[0] and "node 'mm2' (MatMul)" in err[0] and len(err[0]) <= 220
    assert not (tmp_path / "m.beats.onnx").exists()


def test_gpu_without_verification_still_never_writes_an_unloadable_model(tmp_path, monkeypatch, capsys):
    """--no-verify skips the comparison, not the load: a converter result ONNX Runtime
    refuses (here an fp16 scale on a DequantizeLinear at opset 17, what the block
    list now prevents) is exit 4 and nothing is written."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from beats_compiler.targets import gpu

    _mlp(tmp_path / "m.onnx", np.random.default_rng(6), embedding=True)
    quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    real = gpu.to_fp16
    monkeypatch.setattr(gpu, "to_fp16", lambda model, block: real(model, [o for o in block if "Quantize" not in o]))
    monkeypatch.setattr(gpu, "conversion_skip_reason", lambda model: "")
    out = tmp_path / "o.onnx"
    code = main([str(tmp_path / "q.onnx"), "--target", "gpu", "--no-verify", "-q", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "ONNX Runtime cannot load the fp16 result" in err[0], err
    assert not out.exists()
