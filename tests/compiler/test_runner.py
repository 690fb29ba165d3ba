"""Running a model in bounded memory (``beats_compiler.runner.FeedSession``) and
the verification built on it (issue 17): weights fed from their files, one
model at a time, in segments, or partially (the outputs the first weights give)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import runner, verify
from beats_compiler.errors import InputError
from beats_compiler.inputs import InputGenerator
from fixtures import large_decoder as ld
from tests.compiler.test_reparam_cli import ok, run_main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    ld.build(path, ld.preset("tiny", dtype="float32"))
    return path


@pytest.fixture
def feed_all(monkeypatch):
    """Every initializer of the tiny models is fed (they are far below 1 MiB)."""
    monkeypatch.setattr(runner, "FEED_MIN_BYTES", 0)


def plain(path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def generated(fs, model):
    return next(iter(InputGenerator(fs.get_inputs(), model, 0).candidates())).feeds


@pytest.mark.parametrize("budget", [1 << 30, 40_000])
def test_segments_compute_what_one_session_does(tiny, feed_all, budget):
    model = onnx.load(str(tiny), load_external_data=False)
    fs = runner.FeedSession(model, tiny.parent, budget=budget)
    if budget < 1 << 20:
        assert len(fs.segments) > 4
        assert all(s.weight_bytes <= budget for s in fs.segments if len(s.weights) > 1)
    else:
        assert len(fs.segments) == 1
    feeds = generated(fs, model)
    want = plain(tiny, feeds)
    got = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, feeds)))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_truncated_outputs_read_only_their_weights(tiny, feed_all):
    model = onnx.load(str(tiny), load_external_data=False)
    full = runner.FeedSession(model, tiny.parent)
    anc = full.ancestor_weights()
    assert all("layers.1." not in w for w in anc["present.0.key"])
    assert any("layers.1." in w for w in anc["present.1.key"])
    assert set(anc["logits"]) == set(full.weights)
    fs = runner.FeedSession(model, tiny.parent, outputs=["present.0.key", "present.0.value"])
    assert [o.name for o in fs.get_outputs()] == ["present.0.key", "present.0.value"]
    assert all("layers.1." not in w for s in fs.segments for w in s.weights)
    feeds = generated(full, model)
    want = plain(tiny, feeds)
    used = {a.name for a in fs.get_inputs()}
    got = fs.run(None, {k: v for k, v in feeds.items() if k in used})
    np.testing.assert_allclose(got[0], want["present.0.key"], rtol=1e-5, atol=1e-6)


def weight_chain_model(tmp_path):
    """y = x @ (W0 + A @ B) for three layers, W0 in external data: the
    weight-only chain must run beside the MatMul that reads it."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits += [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal((64, 2)).astype(np.float32), f"a{i}"),
                  numpy_helper.from_array(rng.standard_normal((2, 64)).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [f"a{i}", f"b{i}"], [f"ab{i}"]),
                  helper.make_node("Add", [f"w{i}", f"ab{i}"], [f"weff{i}"])]
    for i in range(3):  # the readers after every weight chain, as an exporter may order them
        nodes.append(helper.make_node("MatMul", [prev, f"weff{i}"], [f"h{i}"]))
        prev = f"h{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 64])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "chain.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="chain.data", size_threshold=0)
    return path


def test_weight_only_chains_do_not_cross_segments(tmp_path, feed_all):
    path = weight_chain_model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    fs = runner.FeedSession(model, tmp_path, budget=64 * 64 * 4 + 2 * 64 * 4 * 2)
    assert len(fs.segments) == 3
    crossing = {x for s in fs.segments for x in s.inputs}
    assert not any(x.startswith(("ab", "weff")) for x in crossing), crossing
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(fs.run(None, {"x": x})[0], plain(path, {"x": x})["h2"], rtol=1e-4, atol=1e-4)


def test_subgraph_reads_an_outer_weight(tmp_path, feed_all):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    fs = runner.FeedSession(m, None)
    assert fs.segments[0].weights == ["w"]
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(fs.run(None, {"c": np.array(True), "x": x})[0], x @ w)


def changed_copy(tmp_path, path, weight: str):
    """A copy of ``path`` (its data file shared by a hard copy) with ``weight`` scaled."""
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == weight:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, weight))
    out = tmp_path / "changed" / "model.onnx"
    out.parent.mkdir()
    onnx.save_model(model, str(out), save_as_external_data=True, location="model.data", size_threshold=0)
    return onnx.load(str(out), load_external_data=False), out.parent


@pytest.mark.parametrize("scope", ["full", "partial"])
def test_verification_one_at_a_time(tiny, feed_all, tmp_path, scope):
    model = onnx.load(str(tiny), load_external_data=False)
    ver = verify.verify(None, model, original_path=tiny, base_dir=tiny.parent, memory_budget=60_000, scope=scope,
                        measure_latency=False)
    assert ver.verified, ver.outputs
    assert ver.method.startswith("partially" if scope == "partial" else "one at a time")
    assert "segments" in ver.method
    if scope == "partial":
        assert len(ver.outputs) < len(model.graph.output)
        assert f"{len(model.graph.initializer)} identical" in ver.method
    # a changed weight that every output reads is caught either way, and counted as changed
    embed = next(t.name for t in model.graph.initializer if "embed" in t.name)
    bad, bad_dir = changed_copy(tmp_path, tiny, embed)
    ver = verify.verify(None, bad, original_path=tiny, base_dir=bad_dir, memory_budget=60_000, scope=scope,
                        measure_latency=False)
    assert not ver.verified
    if scope == "partial":
        assert "1 changed" in ver.method


def test_a_part_that_cannot_fit_stops_before_ort(tiny, feed_all, monkeypatch):
    model = onnx.load(str(tiny), load_external_data=False)
    monkeypatch.setattr(verify, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match="--verify-memory") as err:
        verify.verify(None, model, original_path=tiny, base_dir=tiny.parent, scope="full")
    assert "\n" not in str(err.value)


def test_cli_reports_how_it_verified(tiny, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    rep = tmp_path / "r.json"
    proc = ok(run_main(capsys, tiny, "-o", out, "--verify-scope", "partial", "--verify-memory", "64k",
                       "--report", rep, "--bisect"))
    report = json.loads(rep.read_text())
    # the culprit search would hold both models side by side: skipped, and said
    assert report["culprit"]["message"].startswith("culprit search skipped: the models were too large")
    assert report["verified"] is True
    assert report["verify_method"].startswith("partially")
    assert "partially" in proc.stdout
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    bad = run_main(capsys, tiny, "-o", tmp_path / "o2.onnx", "--verify-scope", "all", "-q")
    assert bad.returncode == 2 and "--verify-scope" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("size, avail, budget, scope, expect", [
    (100 << 20, 20 << 30, None, "auto", None),                      # small: side by side, latency timed
    (100 << 20, 500 << 20, None, "auto", (runner.DEFAULT_BUDGET, False)),  # 6 x size over what is free
    (2 << 30, 20 << 30, None, "auto", (runner.DEFAULT_BUDGET, False)),     # over 1 GiB: one at a time, all outputs
    (13 << 30, 20 << 30, None, "auto", (runner.DEFAULT_BUDGET, True)),     # over 4 GiB: partial by default
    (13 << 30, 20 << 30, 1 << 30, "full", (1 << 30, False)),
    (100 << 20, 20 << 30, 64 << 20, "auto", (64 << 20, False)),     # a budget asks for one at a time
    (100 << 20, 20 << 30, None, "partial", (runner.DEFAULT_BUDGET, True)),
])
def test_how_verification_runs(monkeypatch, size, avail, budget, scope, expect):
    monkeypatch.setattr(verify, "weight_bytes", lambda m: size)
    monkeypatch.setattr(verify, "available_memory", lambda: avail)
    assert verify._one_at_a_time(None, None, onnx.ModelProto(), budget, scope) == expect


@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16])
def test_side_by_side_estimate_counts_float32_casts_of_16_bit_weights(monkeypatch, dtype):
    """Two sessions of a float16 model hold float32 copies of its weights (an inserted
    W0 + D * V is folded and cast): the same bytes in float16 need three times the room."""
    n = 50 << 20
    t = onnx.TensorProto(name="w", data_type=dtype, dims=[n // (2 if dtype == onnx.TensorProto.FLOAT16 else 4)])
    t.raw_data = bytes(n)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], initializer=[t]))
    monkeypatch.setattr(verify, "available_memory", lambda: 10 * n)  # over 6 x, under 18 x the bytes
    got = verify._one_at_a_time(model, None, model, None, "auto")
    assert got == (None if dtype == onnx.TensorProto.FLOAT else (runner.DEFAULT_BUDGET, False))
