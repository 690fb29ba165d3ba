"""Pre-flight for ONNX Runtime training 1.19.2 (beats_compiler.training.preflight).

The default tier builds small graphs here and runs in both environments (onnx
1.23 and the training env's onnx 1.17); tests that need an onnx newer than 1.17
say so in their skip reason.  The slow tier preflights real torch exports after
``insert`` and has ORT training 1.19.2 generate artifacts from the result in
the training interpreter.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler.training import gradients as G
from beats_compiler.training.preflight import PreflightReport, preflight
from tests.helpers import assert_same_on_ort, f32, vi

H = helper.make_node
REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / ".venv-train" / "bin" / "python"
NEW_ONNX = onnx.defs.onnx_opset_version() >= 23  # onnx >= 1.18
needs_new_onnx = pytest.mark.skipif(
    not NEW_ONNX, reason=f"onnx {onnx.__version__} knows no opset 23 (the training env's onnx 1.17)"
)


def model(nodes, inits, *, opset=17, ir=8, out_shape=(2, 4), out_type=TensorProto.FLOAT, outputs=None, domains=()):
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", [2, 4])],
        outputs or [vi("y", list(out_shape) if out_shape else None, out_type)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    )
    m.ir_version = ir
    return m


def problems(report: PreflightReport, kind: str):
    return [p for p in report.problems if p.kind == kind]


def test_op_without_gradient_on_the_path_is_named_with_its_node():
    m = model(
        [
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("Round", ["a"], ["r"], name="round_on_path"),
            H("Add", ["a", "r"], ["y"], name="add"),
        ],
        {"W": f32(4, 4)},
    )
    r = preflight(m, ["W"])
    assert not r.ok
    (p,) = problems(r, "no_gradient")
    assert p.op == "Round" and p.node == "round_on_path"
    assert "'round_on_path'" in p.message and "1 node(s)" in p.message and "'y'" in p.message
    assert "\n" not in p.message
    assert "Round" in r.summary() and r.summary().count("\n") == 1  # header + one line per problem


def test_same_op_off_the_path_is_not_reported():
    m = model(
        [
            H("Round", ["x"], ["rx"], name="round_on_input"),  # reaches the loss, but not from the weights
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("Add", ["a", "rx"], ["b"], name="add"),
            H(
                "Einsum", ["a"], ["side"], name="einsum_dead_end", equation="ij->ji"
            ),  # from the weights, not to the loss
            H("Shape", ["a"], ["s"], name="shape"),
            H("Cast", ["s"], ["sf"], to=TensorProto.FLOAT, name="cast"),
            H("Floor", ["sf"], ["sfl"], name="floor_on_shape"),  # integer path: no gradient flows
            H("ReduceMax", ["sfl"], ["m"], keepdims=1, name="rmax"),
            H("Add", ["b", "m"], ["y"], name="add2"),
        ],
        {"W": f32(4, 4)},
        outputs=[vi("y", [2, 4]), vi("side", [4, 2])],
    )
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    assert r.stats["ops_on_gradient_path"] == ["Add", "MatMul"]
    assert r.fixes == []


def test_each_missing_op_counted_once_with_all_its_nodes():
    nodes = [H("MatMul", ["x", "W"], ["a0"], name="mm")]
    for k in range(12):
        nodes.append(H("Softplus", [f"a{k}"], [f"a{k + 1}"], name=f"sp{k}"))
    nodes.append(H("Identity", ["a12"], ["y"]))
    r = preflight(model(nodes, {"W": f32(4, 4)}), ["W"])
    (p,) = r.problems
    assert p.op == "Softplus" and "12 node(s)" in p.message and "'sp0'" in p.message and "and 4 more" in p.message


def test_custom_domain_op_reported_as_domain_and_no_gradient():
    m = model(
        [H("MatMul", ["x", "W"], ["a"], name="mm"), H("Foo", ["a"], ["y"], domain="my.ops", name="foo1")],
        {"W": f32(4, 4)},
        domains=["my.ops"],
    )
    r = preflight(m, ["W"])
    (d,) = problems(r, "domain")
    assert "'my.ops'" in d.message and "foo1" in d.message and d.node == "foo1"
    (g,) = problems(r, "no_gradient")
    assert g.op == "my.ops:Foo" and g.node == "foo1"


def test_contrib_ops_with_gradients_pass():
    m = model(
        [H("MatMul", ["x", "W"], ["a"], name="mm"), H("FastGelu", ["a"], ["y"], domain="com.microsoft", name="fg")],
        {"W": f32(4, 4)},
        domains=["com.microsoft"],
    )
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    assert "com.microsoft:FastGelu" in G.GRADIENT_OPS and G.has_gradient("FastGelu", "com.microsoft")
    assert not G.has_gradient("Slice", "", 9) and G.has_gradient("Slice", "", 10)


def test_old_slice_and_transpose_without_perm_are_reported():
    m = model(
        [
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("Slice", ["a"], ["b"], starts=[0], ends=[2], axes=[0], name="slice1"),
            H("Transpose", ["b"], ["y"], name="tr"),
        ],
        {"W": f32(4, 4)},
        opset=9,
        ir=4,
        out_shape=(4, 2),
    )
    r = preflight(m, ["W"])
    ops = {p.op: p for p in problems(r, "no_gradient")}
    assert set(ops) == {"Slice", "Transpose without 'perm'"}
    assert "opset 10" in ops["Slice"].message and ops["Slice"].node == "slice1"
    assert ops["Transpose without 'perm'"].node == "tr"


def test_pad_reflect_and_one_output_softmax_cross_entropy_are_reported():
    m = model(
        [
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("Pad", ["a", "pads"], ["p"], mode="reflect", name="pad_reflect"),
            H("Pad", ["p", "unpads"], ["b"], name="pad_constant"),
            H("SoftmaxCrossEntropyLoss", ["b", "labels"], ["y"], name="sce"),
        ],
        {
            "W": f32(4, 4),
            "pads": np.array([0, 1, 0, 1], np.int64),
            "unpads": np.array([0, -1, 0, -1], np.int64),
            "labels": np.array([0, 3], np.int64),
        },
        out_shape=(),
    )
    r = preflight(m, ["W"])
    got = {p.op: p.node for p in problems(r, "no_gradient")}
    assert got == {"Pad mode 'reflect'": "pad_reflect", "SoftmaxCrossEntropyLoss without its log_prob output": "sce"}, (
        r.summary()
    )


def test_control_flow_on_the_path_is_reported():
    then = helper.make_graph([H("Relu", ["a"], ["t_out"], name="relu_in_then")], "then", [], [vi("t_out", [2, 4])])
    other = helper.make_graph([H("Identity", ["a"], ["e_out"])], "else", [], [vi("e_out", [2, 4])])
    g = helper.make_graph(
        [
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if1"),
        ],
        "g",
        [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL)],
        [vi("y", [2, 4])],
        [numpy_helper.from_array(f32(4, 4), "W")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (p,) = preflight(m, ["W"]).problems
    assert p.kind == "no_gradient" and p.op == "If" and p.node == "if1"


def test_trainable_and_loss_checks():
    m = model(
        [H("MatMul", ["x", "W"], ["a"], name="mm"), H("Relu", ["a"], ["y"]), H("Relu", ["x"], ["z"])],
        {"W": f32(4, 4), "I": np.arange(3, dtype=np.int64), "U": f32(4)},
        outputs=[vi("y", [2, 4]), vi("z", [2, 4])],
    )
    assert [p.kind for p in preflight(m, []).problems] == ["no_trainable"]
    r = preflight(m, ["W", "missing", "I", "U"])
    assert [p.kind for p in r.problems] == ["unknown_trainable", "trainable_dtype", "unreachable"]
    assert "'missing'" in r.problems[0].message and "INT64" in r.problems[1].message and "'U'" in r.problems[2].message
    r = preflight(m, ["W"], loss_output="z")
    (p,) = r.problems
    assert p.kind == "unreachable" and "'W'" in p.message and "'z'" in p.message
    assert problems(preflight(m, ["W"], loss_output="nope"), "loss_output")


def test_integer_loss_output_reported():
    m = model(
        [H("MatMul", ["x", "W"], ["a"], name="mm"), H("ArgMax", ["a"], ["y"], axis=1, keepdims=0)],
        {"W": f32(4, 4)},
        out_shape=(2,),
        out_type=TensorProto.INT64,
    )
    (p,) = preflight(m, ["W"]).problems
    assert p.kind == "loss_output" and "INT64" in p.message


def test_loss_output_shape_filled_from_inference():
    m = model([H("MatMul", ["x", "W"], ["y"], name="mm")], {"W": f32(4, 3)}, out_shape=None)
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    dims = [d.dim_value for d in r.model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 3] and any("shape" in f for f in r.fixes)
    assert not m.graph.output[0].type.tensor_type.HasField("shape"), "the input was modified"


def test_layernorm_fixes_and_numerics():
    m = model(
        [
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("LayerNormalization", ["a", "s"], ["b"], name="ln_nobias"),
            H("Identity", ["s"], ["s_copy"]),
            H("LayerNormalization", ["b", "s_copy", "bias"], ["y"], name="ln_shared"),
        ],
        {"W": f32(4, 4), "s": f32(4, seed=1), "bias": f32(4, seed=2)},
    )
    before = m.SerializeToString()
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    assert m.SerializeToString() == before, "preflight modified its input"
    text = " ".join(r.fixes)
    assert "'ln_nobias', 'ln_shared': added Mean/InvStdDev" in text
    assert "'ln_nobias': added a zero bias" in text and "private copies" in text
    for n in r.model.graph.node:
        if n.op_type == "LayerNormalization":
            assert len(n.input) == 3 and len(n.output) == 3 and all(n.output)
    lns = [n for n in r.model.graph.node if n.op_type == "LayerNormalization"]
    assert lns[0].input[1] != lns[1].input[1]
    assert_same_on_ort(m, r.model)


def _tied_norms():
    """T5's shape: one frozen norm weight shared through Identity nodes (the
    TorchScript export of tied parameters) and a frozen operand read twice."""
    return model(
        [
            H("MatMul", ["x", "W"], ["a"], name="mm"),
            H("Identity", ["g"], ["g_enc"], name="tie_enc"),
            H("Identity", ["g"], ["g_dec"], name="tie_dec"),
            H("Mul", ["a", "g_enc"], ["b"], name="norm_enc"),
            H("Mul", ["b", "g_dec"], ["c"], name="norm_dec"),
            H("Mul", ["c", "k"], ["d"], name="scale_1"),
            H("Mul", ["d", "k"], ["y"], name="scale_2"),
        ],
        {"W": f32(4, 4), "g": f32(4, seed=1), "k": f32(4, seed=2)},
    )


def test_frozen_weights_shared_through_identity_are_read_directly_and_untied():
    m = _tied_norms()
    before = m.SerializeToString()
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    assert m.SerializeToString() == before, "preflight modified its input"
    text = " ".join(r.fixes)
    assert "2 Identity node(s) sharing frozen weight(s) 'g'" in text and "private copies" in text
    muls = {n.name: list(n.input) for n in r.model.graph.node if n.op_type == "Mul"}
    assert not any(n.op_type == "Identity" for n in r.model.graph.node)
    assert muls["norm_enc"][1] == "g" and muls["norm_dec"][1] != "g"  # one reader each
    assert muls["scale_1"][1] == "k" and muls["scale_2"][1] != "k"
    assert_same_on_ort(m, r.model)
    # a trainable operand is never copied (that would change training)
    assert "private copies" not in " ".join(preflight(_tied_norms(), ["W", "k", "g"]).fixes)


def test_trainable_layernorm_scale_is_not_untied():
    m = model(
        [
            H("LayerNormalization", ["x", "s", "b"], ["a", "m1", "i1"], name="ln0"),
            H("LayerNormalization", ["a", "s", "b"], ["y", "m2", "i2"], name="ln1"),
        ],
        {"s": f32(4, seed=1), "b": f32(4, seed=2)},
    )
    r = preflight(m, ["s", "b"])
    assert r.ok and r.fixes == [], r.summary()


def test_opset_at_most_21_is_never_converted():
    m = model([H("MatMul", ["x", "W"], ["a"], name="mm"), H("Relu", ["a"], ["y"])], {"W": f32(4, 4)}, opset=21, ir=10)
    r = preflight(m, ["W"])
    assert r.ok and r.fixes == []
    assert r.model.SerializeToString() == m.SerializeToString()
    assert r.model is not m


def test_opset_22_converted_down():
    nodes = [H("MatMul", ["x", "W"], ["a"], name="mm"), H("Relu", ["a"], ["y"])]
    m = model(nodes, {"W": f32(4, 4)}, opset=22, ir=10)
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    assert r.fixes == ["opset 22 -> 21 (onnx version converter)"]
    assert {o.domain: o.version for o in r.model.opset_import}[""] == 21
    onnx.checker.check_model(r.model)
    # ORT 1.19 (training env) refuses opset 22, so the reference is the same graph written at opset 21
    assert_same_on_ort(model(nodes, {"W": f32(4, 4)}, opset=21, ir=10), r.model)


def test_blocking_op_named_with_its_nodes_and_every_problem_listed():
    m = model(
        [
            H("Unsqueeze", ["x", "ax"], ["x4"], name="unsq"),
            H("Conv", ["x4", "K"], ["c"], name="conv", pads=[0, 0, 0, 0]),
            H("GlobalMaxPool", ["c"], ["p"], name="gmp"),
            H("Reshape", ["p", "shp"], ["y"], name="rs"),
        ],
        {"K": f32(4, 2, 1, 1), "ax": np.array([2, 3], np.int64), "shp": np.array([2, 4], np.int64)},
        opset=22,
        ir=10,
    )
    r = preflight(m, ["K", "nope"])
    kinds = [p.kind for p in r.problems]
    assert kinds == ["unknown_trainable", "opset", "no_gradient"], r.summary()
    blocker = r.problems[1]
    assert blocker.op == "GlobalMaxPool" and blocker.node == "gmp"
    assert "No Adapter From Version 22 for GlobalMaxPool" in blocker.message
    assert r.problems[2].op == "GlobalMaxPool"
    assert len(r.summary().splitlines()) == 4
    json.dumps(r.to_dict())


@needs_new_onnx
def test_opset_23_ir_11_converted():
    m = model(
        [H("MatMul", ["x", "W"], ["a"], name="mm"), H("Gelu", ["a"], ["y"], name="gelu")],
        {"W": f32(4, 4)},
        opset=23,
        ir=11,
    )
    r = preflight(m, ["W"])
    assert r.ok, r.summary()
    assert r.fixes == ["IR 11 -> 10", "opset 23 -> 21 (onnx version converter)"]
    assert r.model.ir_version == 10 and {o.domain: o.version for o in r.model.opset_import}[""] == 21
    assert_same_on_ort(m, r.model)


@needs_new_onnx
def test_opset_23_blocked_by_an_op_without_previous_version():
    m = model(
        [H("MatMul", ["x", "W"], ["a"], name="mm"), H("RMSNormalization", ["a", "s"], ["y"], name="rms1")],
        {"W": f32(4, 4), "s": f32(4)},
        opset=23,
        ir=11,
    )
    r = preflight(m, ["W"])
    (p,) = problems(r, "opset")
    assert p.op == "RMSNormalization" and p.node == "rms1" and "No Previous Version of RMSNormalization" in p.message


@needs_new_onnx
def test_ir_11_with_newer_element_type_not_lowered():
    m = model(
        [H("MatMul", ["x", "W"], ["y"], name="mm"), H("Cast", ["x"], ["q"], to=TensorProto.FLOAT4E2M1)],
        {"W": f32(4, 4)},
        opset=21,
        ir=11,
        outputs=[vi("y", [2, 4]), vi("q", [2, 4], TensorProto.FLOAT4E2M1)],
    )
    r = preflight(m, ["W"])
    (p,) = problems(r, "ir_version")
    assert "FLOAT4E2M1" in p.message and r.model.ir_version == 11


def test_ir_11_lowered_when_nothing_needs_it():
    m = model([H("MatMul", ["x", "W"], ["y"], name="mm")], {"W": f32(4, 4)}, opset=21, ir=11)
    r = preflight(m, ["W"])
    assert r.ok and r.fixes == ["IR 11 -> 10"] and r.model.ir_version == 10
    onnx.checker.check_model(r.model)


def test_opset_newer_than_installed_onnx_is_one_clear_problem(monkeypatch):
    m = model([H("MatMul", ["x", "W"], ["y"], name="mm")], {"W": f32(4, 4)}, opset=22, ir=10)
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 21)
    (p,) = preflight(m, ["W"]).problems
    assert p.kind == "opset" and "newer than this onnx" in p.message


# ---------------------------------------------------------------- slow: real exporters + ORT training


def _insert(m: onnx.ModelProto, rule) -> tuple[onnx.ModelProto, list[str]]:
    from beats_compiler import reparam
    from passes import reparam as rp

    ins = reparam.insert(m, rp.Policy((rule,)), verify=False, measure_latency=False).model
    return ins, reparam.trainable_manifest(ins)["trainable"]


@pytest.fixture(scope="module")
def real_inserted():
    pytest.importorskip(
        "torch",
        reason="no torch here (the training env): the main env's run of this test drives "
        "the training interpreter itself",
    )
    from passes import reparam as rp
    from fixtures import real_models as mr

    bert = mr.export_tiny_bert()
    buf = io.BytesIO()
    mr.export_torchscript_cnn(buf)
    cnn = onnx.load_from_string(buf.getvalue())
    return {
        "bert": _insert(bert, rp.Rule(factorization="rank:4")),
        "cnn": _insert(cnn, rp.Rule(ops=("Conv", "Gemm"), min_size=1, factorization="rank:2")),
    }


_GENERATE = r"""
import json, os, sys, tempfile, types
import onnx, onnxruntime
pkg = types.ModuleType("onnxruntime.training")  # torch-free import of onnxruntime.training.artifacts
pkg.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
sys.modules["onnxruntime.training"] = pkg
from onnxruntime.training import artifacts
out = {}
for path, trainable_json, pre in json.loads(sys.argv[1]):
    m = onnx.load(path)
    trainable = json.load(open(trainable_json))
    if pre:  # preflight in this interpreter (onnx 1.17)
        from beats_compiler.training.preflight import preflight
        r = preflight(m, trainable)
        if not r.ok:
            out[path] = "preflight: " + r.summary()
            continue
        m = r.model
    frozen = [t.name for t in m.graph.initializer if t.name not in trainable]
    with tempfile.TemporaryDirectory() as d:
        try:
            artifacts.generate_artifacts(m, requires_grad=trainable, frozen_params=frozen,
                                         loss=artifacts.LossType.CrossEntropyLoss,
                                         optimizer=artifacts.OptimType.AdamW, artifact_directory=d)
            out[path] = sorted(os.listdir(d))
        except Exception as exc:
            out[path] = "generate_artifacts: " + str(exc)[-300:]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.ort_training
def test_real_exports_pass_preflight_and_ort_training_accepts_them(real_inserted, tmp_path):
    jobs = []
    for name, (m, trainable) in real_inserted.items():
        r = preflight(m, trainable)
        assert r.ok, f"{name}: {r.summary()}"
        if name == "bert":
            text = " ".join(r.fixes)
            assert "added Mean/InvStdDev outputs" in text and "private copies" in text
            assert r.stats["nodes_on_gradient_path"] > 50
        else:
            assert r.fixes == []
            assert "Conv" in r.stats["ops_on_gradient_path"]
        if name == "cnn":
            assert_same_on_ort(m, r.model)
        (tmp_path / f"{name}.trainable.json").write_text(json.dumps(trainable))
        onnx.save(r.model, str(tmp_path / f"{name}.pre.onnx"))
        onnx.save(m, str(tmp_path / f"{name}.raw.onnx"))
        jobs.append([str(tmp_path / f"{name}.pre.onnx"), str(tmp_path / f"{name}.trainable.json"), False])
        jobs.append([str(tmp_path / f"{name}.raw.onnx"), str(tmp_path / f"{name}.trainable.json"), True])
    if not TRAIN_PY.is_file():
        pytest.fail(f"the training environment {TRAIN_PY} is missing: run ./scripts/ort-training-env.sh")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [str(TRAIN_PY), "-c", _GENERATE, json.dumps(jobs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
        check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"training interpreter failed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(line[len("RESULT ") :])
    for path, got in results.items():
        assert got == ["checkpoint", "eval_model.onnx", "optimizer_model.onnx", "training_model.onnx"], f"{path}: {got}"


@pytest.mark.slow
@pytest.mark.ort_training
def test_t5_tied_norm_weights_generate_ort_artifacts(tmp_path):
    """A TorchScript T5 (norm weights tied through Identity nodes), inserted with
    embeddings: ORT training 1.19.2 ends in "Duplicate definition of name
    (..._grad)" without the pre-flight, and generates the artifacts with it."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from fixtures.exporters import torchscript_export

    if not TRAIN_PY.is_file():
        pytest.fail(f"the training environment {TRAIN_PY} is missing: run ./scripts/ort-training-env.sh")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t5 = t5

        def forward(self, ids, dec):
            return self.t5(input_ids=ids, decoder_input_ids=dec, use_cache=False).logits.mean(1)

    ids = torch.randint(0, 50, (2, 6))
    torchscript_export(Logits().eval(), (ids, ids[:, :3]), str(tmp_path / "t5.onnx"), ["ids", "dec"], ["y"], None)
    from beats_compiler.cli import main

    assert main(["insert", str(tmp_path / "t5.onnx"), "--embeddings", "--min-size", "1", "--no-verify", "-q",
                 "-o", str(tmp_path / "ins.onnx")]) == 0
    trainable = json.loads((tmp_path / "ins.trainable.json").read_text())["trainable"]
    (tmp_path / "t.json").write_text(json.dumps(trainable))
    assert any(n.op_type == "Identity" for n in onnx.load(str(tmp_path / "ins.onnx")).graph.node)
    job = [str(tmp_path / "ins.onnx"), str(tmp_path / "t.json")]
    raw = [str(tmp_path / "raw.onnx"), str(tmp_path / "t.json")]
    (tmp_path / "raw.onnx").write_bytes((tmp_path / "ins.onnx").read_bytes())
    proc = subprocess.run(
        [str(TRAIN_PY), "-c", _GENERATE, json.dumps([job + [True], raw + [False]])],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=600, check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"training interpreter failed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(line[len("RESULT "):])
    assert results[job[0]] == ["checkpoint", "eval_model.onnx", "optimizer_model.onnx", "training_model.onnx"]
    assert "Duplicate definition of name" in results[raw[0]]  # what the pre-flight mends


@pytest.mark.slow
@pytest.mark.ort_training
def test_real_bert_without_legalization_fails_in_ort_training(real_inserted, tmp_path):
    """The trap the legalization exists for is real: ORT training 1.19.2
    rejects the unlegalized export with the opaque gradient-builder error."""
    if not TRAIN_PY.is_file():
        pytest.fail(f"the training environment {TRAIN_PY} is missing: run ./scripts/ort-training-env.sh")
    m, trainable = real_inserted["bert"]
    (tmp_path / "t.json").write_text(json.dumps(trainable))
    onnx.save(m, str(tmp_path / "raw.onnx"))
    job = json.dumps([[str(tmp_path / "raw.onnx"), str(tmp_path / "t.json"), False]])
    proc = subprocess.run(
        [str(TRAIN_PY), "-c", _GENERATE, job],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=600,
        check=False,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    (got,) = json.loads(line[len("RESULT ") :]).values()
    assert isinstance(got, str) and "gradient_builder_base.h" in got and "OutputDefs().size()" in got, got


_PROBE = r"""
import json, os, sys, tempfile, types
import numpy as np, onnx, onnxruntime
from onnx import TensorProto as T, helper, numpy_helper
pkg = types.ModuleType("onnxruntime.training")
pkg.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
sys.modules["onnxruntime.training"] = pkg
from onnxruntime.training import artifacts
out = {}
for op in json.loads(sys.argv[1]):
    nodes = [helper.make_node("Mul", ["x", "W"], ["t"]), helper.make_node(op, ["t"], ["y"], name="probe")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4, 3, 3])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)],
                          [numpy_helper.from_array(np.linspace(0.1, 0.9, 72, dtype=np.float32).reshape(2, 4, 3, 3), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    y = next(v for v in onnx.shape_inference.infer_shapes(m).graph.output if v.name == "y")
    m.graph.output[0].CopyFrom(y)
    with tempfile.TemporaryDirectory() as d:
        try:
            artifacts.generate_artifacts(m, requires_grad=["W"], loss=artifacts.LossType.MSELoss, artifact_directory=d)
            out[op] = "ok"
        except Exception as exc:
            out[op] = "unregistered" if "gradient builder has not been registered" in str(exc) else str(exc)[-300:]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.ort_training
def test_gradient_list_agrees_with_ort_training_wheel():
    """gradients.py against ORT training 1.19.2 itself: one-op models, with
    and without a registered gradient builder."""
    if not TRAIN_PY.is_file():
        pytest.fail(f"the training environment {TRAIN_PY} is missing: run ./scripts/ort-training-env.sh")
    listed = [
        "Relu",
        "Sigmoid",
        "Tanh",
        "Exp",
        "Log",
        "Sqrt",
        "Neg",
        "Abs",
        "Erf",
        "Sin",
        "Cos",
        "Reciprocal",
        "LeakyRelu",
        "Identity",
        "Softmax",
        "LogSoftmax",
        "Flatten",
        "ReduceMean",
        "ReduceSum",
        "ReduceL2",
        "ReduceLogSumExp",
        "GlobalAveragePool",
        "Dropout",
        "Trilu",
        "Clip",
        "Squeeze",
    ]
    unlisted = [
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Elu",
        "Selu",
        "Softplus",
        "HardSigmoid",
        "HardSwish",
        "Tan",
        "Atan",
        "Asin",
        "Acos",
        "Sinh",
        "Cosh",
        "Celu",
        "Softsign",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceSumSquare",
        "ReduceLogSum",
        "GlobalMaxPool",
        "Shrink",
        "Hardmax",
        "LpNormalization",
    ]
    proc = subprocess.run(
        [str(TRAIN_PY), "-c", _PROBE, json.dumps(listed + unlisted)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, f"training interpreter failed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    got = json.loads(line[len("RESULT ") :])
    for op in listed:
        assert G.has_gradient(op, "", 17) and got[op] == "ok", (op, got[op])
    for op in unlisted:
        assert not G.has_gradient(op, "", 17) and got[op] == "unregistered", (op, got[op])
