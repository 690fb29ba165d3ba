"""Culprit finding (issue 14): a pass broken on purpose is named, with the node
of its output; ``--bisect`` on a healthy model finds nothing wrong; fp16
overflow and a badly quantized node are localised; insert and fold too."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import beats_compiler as bc
from beats_compiler import bisect as bs
from beats_compiler import reparam
from beats_compiler.cli import EXIT_OK, EXIT_VERIFY, main
from passes import reparam as rp
from passes import FoldConstants, FuseMatMulAdd

H = helper.make_node


def _w(shape, seed, scale=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def mlp() -> onnx.ModelProto:
    """Two MatMul+Add layers (both fused to Gemm by fuse_matmul_add) and a
    constant sub-expression (k = c1 * c2, folded by fold_constants)."""
    inits = [numpy_helper.from_array(_w((8, 16), 1), "W1"), numpy_helper.from_array(_w((16,), 2), "b1"),
             numpy_helper.from_array(_w((16, 4), 3), "W2"), numpy_helper.from_array(_w((4,), 4), "b2"),
             numpy_helper.from_array(np.full((4,), 0.5, np.float32), "c1"),
             numpy_helper.from_array(np.full((4,), 3.0, np.float32), "c2")]
    nodes = [H("MatMul", ["x", "W1"], ["m1"], name="MatMul_1"),
             H("Add", ["m1", "b1"], ["a1"], name="Add_1"),
             H("Relu", ["a1"], ["r1"], name="Relu_1"),
             H("MatMul", ["r1", "W2"], ["m2"], name="MatMul_12"),
             H("Add", ["m2", "b2"], ["h"], name="Add_2"),
             H("Mul", ["c1", "c2"], ["k"], name="Mul_k"),
             H("Mul", ["h", "k"], ["logits"], name="Mul_out")]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


@pytest.fixture
def broken_fusion(monkeypatch):
    """fuse_matmul_add gives the Gemm made from 'MatMul_12' a bias off by 0.31."""
    real = FuseMatMulAdd.call

    def call(self, graph):
        res = real(self, graph)
        for n in graph.nodes:
            if n.op == "Gemm" and n.name == "MatMul_12" and not n.inputs[2].name.endswith("_broken"):
                c = n.inputs[2]
                n.inputs[2] = gs.Constant(c.name + "_broken", (c.values + 0.31).astype(np.float32))
        return res

    monkeypatch.setattr(FuseMatMulAdd, "call", call)


@pytest.fixture
def broken_folding(monkeypatch):
    """fold_constants folds Mul_k (k = c1 * c2) to a wrong value."""
    real = FoldConstants.call

    def call(self, graph):
        res = real(self, graph)
        k = graph.tensors().get("k")
        if isinstance(k, gs.Constant) and float(k.values[0]) == 1.5:
            k.values = (k.values + 1.0).astype(np.float32)
        return res

    monkeypatch.setattr(FoldConstants, "call", call)


def test_a_broken_fusion_is_named_with_its_node(broken_fusion):
    r = bc.compile(mlp(), measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert c["pass"] == "fuse_matmul_add" and c["round"] == 1
    assert c["node"] == "MatMul_12" and c["op_type"] == "Gemm"
    assert c["tensor"] == "h" and c["max_abs_diff"] == pytest.approx(0.31, abs=1e-3)
    assert not c["within_tolerance"]
    line = r.report.failure_line()
    assert line.startswith("verification failed: max abs diff") and "'logits'" in line
    assert "first differing pass: fuse_matmul_add (round 1), node 'MatMul_12' (Gemm) output 'h' differs by 0.31" in line
    assert "\n" not in line and len(line) < 250


def test_the_cli_prints_one_line_naming_pass_and_node_and_exits_1(broken_fusion, tmp_path, capsys):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "m.out.onnx", tmp_path / "r.json"
    onnx.save(mlp(), src)
    code = main([str(src), "-o", str(out), "--report", str(rep), "-q", "--no-latency"])
    assert code == EXIT_VERIFY == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("beats-compile: verification failed: max abs diff")
    assert "fuse_matmul_add (round 1)" in err and "node 'MatMul_12' (Gemm)" in err
    assert not out.exists()
    data = json.loads(rep.read_text())
    assert data["verified"] is False
    assert {k: data["culprit"][k] for k in ("pass", "node", "op_type", "tensor")} == {
        "pass": "fuse_matmul_add", "node": "MatMul_12", "op_type": "Gemm", "tensor": "h"}
    assert data["culprit"]["max_abs_diff"] == pytest.approx(0.31, abs=1e-3)


def test_a_broken_constant_fold_names_the_folded_node(broken_folding):
    r = bc.compile(mlp(), measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert (c["pass"], c["node"], c["op_type"], c["tensor"]) == ("fold_constants", "Mul_k", "Mul", "k")
    assert c["folded"] and c["max_abs_diff"] == pytest.approx(1.0)
    assert "folded to the constant 'k'" in c["message"]


def test_bisect_on_a_healthy_model_finds_nothing_wrong(tmp_path, capsys):
    r = bc.compile(mlp(), measure_latency=False, bisect=True)
    assert r.report.verified is True
    c = r.report.culprit
    assert c["pass"] is None and c["within_tolerance"] is True
    assert c["message"].startswith(bs.NO_PASS)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(mlp(), src)
    assert main([str(src), "-o", str(out), "--bisect", "--no-latency"]) == EXIT_OK
    captured = capsys.readouterr()
    assert f"bisect: {bs.NO_PASS}" in captured.out and captured.err == "" and out.exists()


def test_no_search_without_failure_or_request():
    r = bc.compile(mlp(), measure_latency=False)
    assert r.report.verified is True and r.report.culprit is None
    assert json.loads(r.report.to_json())["culprit"] is None


def test_bisect_on_demand_reports_the_largest_divergence_within_tolerance(monkeypatch):
    """A pass that changes the outputs, but within tolerance: verification
    passes; --bisect names it as the largest divergence, not as a failure."""
    real = FuseMatMulAdd.call

    def call(self, graph):
        res = real(self, graph)
        for n in graph.nodes:
            if n.op == "Gemm" and n.name == "MatMul_1" and not n.inputs[2].name.endswith("_nudged"):
                c = n.inputs[2]
                n.inputs[2] = gs.Constant(c.name + "_nudged", (c.values + 1e-6).astype(np.float32))
        return res

    monkeypatch.setattr(FuseMatMulAdd, "call", call)
    r = bc.compile(mlp(), measure_latency=False, bisect=True)
    assert r.report.verified is True
    c = r.report.culprit
    assert c["pass"] is None and c["within_tolerance"]
    assert c["largest"]["pass"] == "fuse_matmul_add" and c["largest"]["node"] == "MatMul_1"
    assert "largest divergence: fuse_matmul_add (round 1), node 'MatMul_1' (Gemm)" in c["message"]


def test_localise_walks_in_topological_order_to_the_first_differing_node():
    """Unit test of the node search: only the first node whose inputs agree is named."""
    before = mlp()
    after = onnx.ModelProto()
    after.CopyFrom(before)
    for t in after.graph.initializer:
        if t.name == "b1":  # Add_1 differs first; Relu_1, MatMul_12 ... differ because of it
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + 0.5, "b1"))
    feeds = {"x": _w((3, 8), 9, 1.0)}
    loc = bs.localise(before, after, feeds, rtol=1e-3, atol=1e-4)
    assert (loc.node, loc.op_type, loc.tensor) == ("Add_1", "Add", "a1")
    assert loc.max_abs_diff == pytest.approx(0.5)
    assert [i.name for i in before.graph.output] == [i.name for i in after.graph.output] == ["logits"]


# --- gpu: fp16 overflow ----------------------------------------------------------


def overflow_model() -> onnx.ModelProto:
    """x * 1e5 overflows in fp16 (max 65504); the ReduceSum after it stays fp32."""
    inits = [numpy_helper.from_array(np.array(1e5, np.float32), "big"),
             numpy_helper.from_array(_w((6, 6), 5), "A")]
    nodes = [H("MatMul", ["x", "A"], ["h"], name="mm"),
             H("Mul", ["h", "big"], ["amp"], name="amplify"),
             H("ReduceSum", ["amp"], ["y"], keepdims=1, name="sum")]
    g = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_gpu_fp16_overflow_names_the_conversion_and_the_node(tmp_path, capsys):
    r = bc.compile(overflow_model(), "gpu", measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert c["pass"] == "convert_float_to_float16"
    assert (c["node"], c["op_type"], c["tensor"]) == ("amplify", "Mul", "amp")
    assert "overflows (inf)" in c["message"]
    src = tmp_path / "o.onnx"
    onnx.save(overflow_model(), src)
    assert main([str(src), "--target", "gpu", "-q", "-o", str(tmp_path / "x.onnx")]) == EXIT_VERIFY
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "convert_float_to_float16" in err and "node 'amplify' (Mul)" in err


def test_gpu_fp32_pass_failure_is_named_before_the_conversion(broken_fusion):
    r = bc.compile(mlp(), "gpu", measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert (c["pass"], c["node"], c["op_type"]) == ("fuse_matmul_add", "MatMul_12", "Gemm")


# --- insert and fold -------------------------------------------------------------

POLICY = rp.Policy((rp.Rule(min_size=1),))


def test_insert_failure_names_the_step_and_the_reader_of_the_weight(monkeypatch, tmp_path, capsys):
    """insert made to start V of W2 at a nonzero value: the inserted model
    no longer computes the original function."""
    real = rp.insert

    def insert(graph, policy, records, *a, **kw):
        out, stats = real(graph, policy, records, *a, **kw)
        tensors = graph.tensors()
        for rec in out:
            if rec.weight == "W2" and rec.V:
                v = tensors[rec.V]
                v.values = np.full(v.shape, 0.5, np.float32)
        return out, stats

    monkeypatch.setattr(rp, "insert", insert)
    r = reparam.insert(mlp(), POLICY, measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert (c["pass"], c["node"], c["op_type"], c["tensor"]) == ("insert", "MatMul_12", "MatMul", "m2")
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    assert main(["insert", str(src), "--min-size", "1", "-q", "-o", str(tmp_path / "i.onnx")]) == EXIT_VERIFY
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "first differing pass: insert, node 'MatMul_12' (MatMul)" in err


def test_fold_failure_names_the_step_and_the_node(monkeypatch):
    inserted = reparam.insert(mlp(), POLICY, measure_latency=False)
    assert inserted.report.verified
    real = rp.fold

    def fold(graph, records, *a, **kw):
        out = real(graph, records, *a, **kw)
        w = graph.tensors()["W1"]
        w.values = (w.values + 0.25).astype(np.float32)
        return out

    monkeypatch.setattr(rp, "fold", fold)
    r = reparam.fold(inserted.model, measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert (c["pass"], c["node"], c["op_type"], c["tensor"]) == ("fold", "MatMul_1", "MatMul", "m1")


def test_healthy_fold_with_bisect_finds_nothing_wrong():
    inserted = reparam.insert(mlp(), POLICY, measure_latency=False)
    r = reparam.fold(inserted.model, measure_latency=False, bisect=True)
    assert r.report.verified is True
    assert r.report.culprit["pass"] is None and r.report.culprit["within_tolerance"]


# --- npu: a node that quantizes badly ----------------------------------------------


def exp_model() -> onnx.ModelProto:
    """conv -> Exp ('amplify') -> pool: calibrated on large inputs, Exp's range is
    huge and the small held-out values all quantize to its first step."""
    inits = [numpy_helper.from_array(_w((4, 3, 3, 3), 1, 0.3), "W"), numpy_helper.from_array(_w((4,), 2, 0.1), "B"),
             numpy_helper.from_array(_w((4, 5), 3, 1.0), "FW")]
    nodes = [H("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             H("Exp", ["c"], ["e"], name="amplify"),
             H("GlobalAveragePool", ["e"], ["g"], name="gap"),
             H("Flatten", ["g"], ["f"], name="flat"),
             H("MatMul", ["f", "FW"], ["y"], name="fc")]
    g = helper.make_graph(nodes, "expnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def _calib_with_large_first_samples():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 1, 3, 8, 8)).astype(np.float32)
    x[:6] *= 6.0  # calibration samples: Exp reaches e^(large)
    x[6:] *= 0.2  # held out (the last quarter): Exp stays near 1
    return {"x": x}


def test_npu_names_the_node_that_quantizes_badly():
    pytest.importorskip("onnxruntime_qnn", reason="the npu target needs onnxruntime-qnn (extra 'npu')")
    r = bc.compile(exp_model(), "npu", calib=_calib_with_large_first_samples())
    assert r.report.verified is False
    c = r.report.culprit
    assert c["pass"] == "quantize_qdq"
    assert (c["node"], c["op_type"], c["tensor"]) == ("amplify", "Exp", "e")
    assert c["cosine_drop"] > 0.2 and c["cosine"] < 0.9
    line = r.report.failure_line()
    assert line.startswith("verification failed: cosine") and "quantize_qdq, node 'amplify' (Exp)" in line


def test_npu_fp32_pass_failure_is_named(broken_fusion):
    pytest.importorskip("onnxruntime_qnn", reason="the npu target needs onnxruntime-qnn (extra 'npu')")
    calib = {"x": np.random.default_rng(1).standard_normal((8, 2, 8)).astype(np.float32)}
    r = bc.compile(mlp(), "npu", calib=calib, bisect=True)
    c = r.report.culprit
    assert (c["pass"], c["node"], c["op_type"]) == ("fuse_matmul_add", "MatMul_12", "Gemm")


def test_node_level_localisation_is_skipped_over_the_node_limit(broken_fusion, monkeypatch):
    monkeypatch.setattr(bs, "NODE_LIMIT", 3)
    r = bc.compile(mlp(), measure_latency=False)
    c = r.report.culprit
    assert c["pass"] == "fuse_matmul_add" and c["node"] is None
    assert any("node-level localisation skipped: 6 nodes (limit 3)" in n for n in c["notes"])
    assert c["message"] == ("first differing pass: fuse_matmul_add (round 1) "
                            "(node-level localisation skipped: 6 nodes (limit 3))")


def test_a_pass_whose_output_does_not_run_is_named(monkeypatch, capsys, tmp_path):
    """The Gemm's bias gets a shape that cannot broadcast: the checker passes, ONNX Runtime refuses."""
    real = FuseMatMulAdd.call

    def call(self, graph):
        res = real(self, graph)
        for n in graph.nodes:
            if n.op == "Gemm" and n.name == "MatMul_1" and not n.inputs[2].name.endswith("_bad"):
                n.inputs[2] = gs.Constant(n.inputs[2].name + "_bad", np.zeros((3,), np.float32))
        return res

    monkeypatch.setattr(FuseMatMulAdd, "call", call)
    r = bc.compile(mlp(), measure_latency=False)
    assert r.report.verified is False
    c = r.report.culprit
    assert c["pass"] == "fuse_matmul_add" and c["node"] is None
    assert "(the model after it: " in c["message"] and "ONNX Runtime" in c["message"]
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    assert main([str(src), "-q", "-o", str(tmp_path / "o.onnx")]) == EXIT_VERIFY
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fuse_matmul_add (round 1)" in err and ".cc:" not in err


def test_a_culprit_inside_a_subgraph_names_the_top_level_node_and_says_so(monkeypatch):
    then_g = helper.make_graph([H("Relu", ["h"], ["t_out"], name="then_relu")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4])])
    else_g = helper.make_graph([H("Neg", ["h"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4])])
    g = helper.make_graph(
        [H("MatMul", ["x", "W"], ["h"], name="mm"), H("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                                                       else_branch=else_g)],
        "iff", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(_w((8, 4), 1), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    real = FuseMatMulAdd.call

    def call(self, graph):  # turns the then-branch's Relu into a Neg, once
        res = real(self, graph)
        for n in graph.nodes:
            if n.op == "If":
                for sub in n.subgraphs():
                    for s in sub.nodes:
                        if s.name == "then_relu" and s.op == "Relu":
                            s.op = "Neg"
                            return type(res)(True, {"sabotaged": 1})
        return res

    monkeypatch.setattr(FuseMatMulAdd, "call", call)
    r = bc.compile(m, measure_latency=False, inputs={"x": _w((2, 8), 2, 1.0), "cond": np.array(True)})
    assert r.report.verified is False
    c = r.report.culprit
    assert (c["pass"], c["node"], c["op_type"], c["tensor"]) == ("fuse_matmul_add", "branch", "If", "y")
    assert c["in_subgraph"] and "only the top-level graph is searched" in c["message"]


def test_failure_line_keeps_the_pass_and_node_within_200_characters():
    from beats_compiler.report import CompileReport

    rep = CompileReport(target="npu", input=None, output=None, verified=False, max_abs_diff=0.05, max_rel_diff=0.05,
                        rtol=0.0, atol=0.0, nodes_before=1, nodes_after=1, initializers_before=0,
                        initializers_after=0, weight_bytes_before=0, weight_bytes_after=0, file_size_before=0,
                        file_size_after=0, latency_ms_before=None, latency_ms_after=None, op_histogram_before={},
                        op_histogram_after={}, passes=[], rounds=1, converged=True, seconds=0.0,
                        outputs=[{"name": "y", "ok": False, "max_abs_diff": 0.0525}], command="compile",
                        target_details={"min_cosine": 0.99})
    rep.culprit = {"pass": "quantize_qdq", "node": "/stem/stem.0/Conv", "op_type": "Conv",
                   "message": "first differing pass: quantize_qdq, node '/stem/stem.0/Conv' (Conv) output "
                              "'/stem/stem.2/Relu_output_0_with_a_very_long_exporter_name' cosine 0.7925 "
                              "(drop 0.2075 from its inputs)"}
    line = rep.failure_line()
    assert len("beats-compile: " + line) <= 200, line
    assert "cosine 0.9475 < 0.99 on 'y'" in line and "quantize_qdq" in line and "'/stem/stem.0/Conv' (Conv)" in line
