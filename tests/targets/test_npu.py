"""npu target on small graphs: static shapes, calibration (and its refusal),
QDQ on the real QNN HTP backend (onnxruntime-qnn), legality with reasons,
--strict, --precompile."""

import json

import numpy as np
import onnx
import pytest

import beats_compiler as bc
from beats_compiler.cli import main
from beats_compiler.errors import InputError
from tests.targets.models import calib_npz, classifier

qnn = pytest.importorskip("onnxruntime_qnn", reason="the npu target needs onnxruntime-qnn (extra 'npu')")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("npu")
    onnx.save(classifier(), d / "cls.onnx")
    onnx.save(classifier(fmod_tail=True), d / "fmod.onnx")
    calib_npz(d / "calib.npz", n=8)
    return d


def test_refuses_without_calibration(files, capsys):
    with pytest.raises(InputError, match="--calib data.npz.*--calib random"):
        bc.compile(classifier(), "npu", input_shapes={"x": [1, 3, 16, 16]})
    out = files / "none.onnx"
    assert main([str(files / "cls.onnx"), "--target", "npu", "--input-shape", "x=1,3,16,16", "-o", str(out), "-q"]) == 2
    assert "calibration data" in capsys.readouterr().err and not out.exists()


def test_random_calibration_binds_dynamic_dims_as_verification_does():
    """No --input-shape with --calib random: the batch dim gets 1 (the generated
    inputs' first size), said in a warning that names the flag to choose."""
    r = bc.compile(classifier(), "npu", calib="random")
    assert r.report.target_details["static_input_shapes"]["x"][0] == 1
    assert any(w.startswith("static shapes from generated inputs: x=1,") and "--input-shape" in w
               for w in r.report.warnings)


def test_refuses_calibration_of_the_wrong_shape():
    bad = {"x": np.zeros((4, 1, 3, 8, 8), np.float32)}
    with pytest.raises(InputError, match="calibration data 'x'"):
        bc.compile(classifier(), "npu", calib=bad, input_shapes={"x": [1, 3, 16, 16]})


def test_npu_compile_from_calibration_samples(files, tmp_path):
    """Shapes from the samples; held-out samples are not calibration samples;
    every compute node on the HTP; cosine >= 0.99 against fp32."""
    src = files / "cls.onnx"
    before = src.read_bytes()
    out, rep = tmp_path / "cls.npu.onnx", tmp_path / "r.json"
    assert main([str(src), "--target", "npu", "--calib", str(files / "calib.npz"), "-o", str(out),
                 "--report", str(rep), "-q"]) == 0
    assert src.read_bytes() == before
    data = json.loads(rep.read_text())
    d, leg = data["target_details"], data["legality"]
    assert d["static_input_shapes"] == {"x": [1, 3, 16, 16]}
    assert d["calibration"] == {"source": "file", "samples": 6, "held_out": 2}
    assert leg["source"] == "qnn-session" and leg["fallback"] == []
    assert leg["compute_nodes_on_target"] == leg["compute_nodes_total"] > 0
    assert {i["op"] for i in leg["expected_fallback"]} <= {"QuantizeLinear", "DequantizeLinear"}
    acc = d["accuracy"]["outputs"][0]
    assert acc["cosine_min"] >= 0.99 and acc["top1_agreement"] is not None
    q = onnx.load(out)
    assert {n.op_type for n in q.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv"}
    assert [d.dim_value for d in q.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 16, 16]


def test_legality_names_the_op_and_strict_fails(files, tmp_path, capsys):
    src = files / "fmod.onnx"
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    args = [str(src), "--target", "npu", "--calib", str(files / "calib.npz"), "-o", str(out), "--report", str(rep)]
    assert main(args + ["-q"]) == 0  # not strict: a fallback is reported, not fatal
    leg = json.loads(rep.read_text())["legality"]
    mod = [i for i in leg["fallback"] if i["op"] == "Mod"]
    assert mod and mod[0]["node"] == "fmod" and "fmod" in mod[0]["reasons"][0]
    assert leg["compute_nodes_on_target"] == leg["compute_nodes_total"] - 1
    out.unlink()
    capsys.readouterr()
    assert main(args + ["--strict"]) == 1
    text = capsys.readouterr().out
    assert "fmod (Mod)" in text and "--strict" in text
    assert not out.exists()
    data = json.loads(rep.read_text())
    assert data["verified"] is False and data["legality"]["strict"] and not data["legality"]["ok"]


def test_precompile_writes_a_context_model_that_runs(files, tmp_path):
    out = tmp_path / "cls.onnx"
    assert main([str(files / "cls.onnx"), "--target", "npu", "--calib", "random", "--input-shape", "x=1,3,16,16",
                 "--precompile", "--no-verify", "-o", str(out), "-q"]) == 0
    ctx = tmp_path / "cls.ctx.onnx"
    assert ctx.is_file() and out.is_file()
    m = onnx.load(ctx)
    assert any(n.op_type == "EPContext" for n in m.graph.node)
    from beats_compiler.targets import qnn as npu

    x = np.random.default_rng(9).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = npu.run_context_model(ctx.read_bytes(), {"x": x})[0]
    from onnx.reference import ReferenceEvaluator

    want = ReferenceEvaluator(classifier()).run(None, {"x": x})[0]
    assert got.shape == (1, 5) and npu.cosine(got, want) > 0.98


def test_float16_on_the_htp_quantizes_nothing_and_runs_every_node_there(files, tmp_path):
    """--activation-type float16: no Q/DQ, the float graph on the HTP in fp16
    (soc_model set, as the provider requires); every sample checks accuracy."""
    out, rep = tmp_path / "f16.onnx", tmp_path / "r.json"
    assert main([str(files / "cls.onnx"), "--target", "npu", "--calib", str(files / "calib.npz"),
                 "--activation-type", "float16", "-o", str(out), "--report", str(rep), "-q"]) == 0
    data = json.loads(rep.read_text())
    d, leg = data["target_details"], data["legality"]
    assert d["activation_type"] == d["weight_type"] == "float16"
    assert d["qnn_provider_options"] == {"backend_type": "htp", "enable_htp_fp16_precision": "1", "soc_model": "60"}
    assert d["calibration"]["samples"] == 0 and d["calibration"]["held_out"] == 8
    assert leg["fallback"] == [] and leg["compute_nodes_on_target"] == leg["compute_nodes_total"] > 0
    assert d["accuracy"]["outputs"][0]["cosine_min"] >= 0.999  # fp16, not 8-bit
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(out).graph.node)
    assert any("enable_htp_fp16_precision=1" in w for w in data["warnings"])


@pytest.mark.parametrize("args, phrase", [
    (["--activation-type", "float16", "--per-channel"], "quantizes nothing"),
    (["--rtol", "0.1"], "checked by cosine similarity"),
])
def test_precision_flags_that_contradict_each_other_are_refused(files, tmp_path, capsys, args, phrase):
    out = tmp_path / "x.onnx"
    assert main([str(files / "cls.onnx"), "--target", "npu", "--calib", "random", "--input-shape", "x=1,3,16,16",
                 "-o", str(out), "-q"] + args) == 2
    assert phrase in capsys.readouterr().err and not out.exists()


def test_npu_flags_on_other_targets_are_refused(files, tmp_path, capsys):
    for target in ("cpu", "gpu"):
        assert main([str(files / "cls.onnx"), "--target", target, "--activation-type", "uint16",
                     "-o", str(tmp_path / "x.onnx"), "-q"]) == 2
        assert "--activation-type" in capsys.readouterr().err


def test_missing_the_cosine_bar_names_the_precision_that_would_help():
    calib = {"x": np.random.default_rng(1).standard_normal((8, 1, 3, 16, 16)).astype(np.float32)}
    r = bc.compile(classifier(), "npu", calib=calib, min_cosine=0.9999999)
    assert r.report.verified is False
    assert any("< 0.9999999" in w and "--activation-type uint16 --per-channel" in w for w in r.report.warnings)


def test_models_with_metadata_props_quantize_and_keep_them(files, tmp_path):
    """onnxruntime's QNN preprocessing fails on any metadata_props (every model `insert`
    writes has them, and the bundled fixture): quantized without, given back after."""
    from onnx import helper

    m = classifier()
    helper.set_model_props(m, {"source": "a test", "beats.reparam": '{"version": 1}'})
    src, out = tmp_path / "meta.onnx", tmp_path / "meta.npu.onnx"
    onnx.save(m, src)
    assert main([str(src), "--target", "npu", "--calib", str(files / "calib.npz"), "-o", str(out), "-q"]) == 0
    assert {p.key: p.value for p in onnx.load(out).metadata_props} == {"source": "a test",
                                                                       "beats.reparam": '{"version": 1}'}
