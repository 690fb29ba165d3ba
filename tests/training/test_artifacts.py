"""``beats-compile artifacts --format ort``: ONNX Runtime training's on-device
artifacts for inserted models (the optional export), with D/V the only
trainable tensors.

In the main environment the command delegates to the training interpreter
(``.venv-train``, made on first use by scripts/ort-training-env.sh through the
``ort_training`` marker's fixture in tests/training/conftest.py).  The artifacts are loaded back with ORT's
own training API (CheckpointState, Module, Optimizer) in the training
interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import reparam
from beats_compiler.cli import main
from beats_compiler.training import env as tenv
from passes import reparam as rp

pytestmark = pytest.mark.ort_training

ORT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")


# --------------------------------------------------------------------------- models and data


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8  # both onnx 1.17 and 1.23 take it
    return m


def mlp_model(classes: int = 3, features: int = 8, hidden: int = 16, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {"W1": (rng.standard_normal((features, hidden)) * 0.3).astype(np.float32),
             "b1": np.zeros(hidden, np.float32),
             "W2": (rng.standard_normal((hidden, classes)) * 0.3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h2"]),
             helper.make_node("Relu", ["h2"], ["h3"]), helper.make_node("MatMul", ["h3", "W2"], ["logits"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits, opset)


def conv_model(classes: int = 2) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm on 1x6x6 images."""
    rng = np.random.default_rng(1)
    inits = {"K": (rng.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32), "kb": np.zeros(4, np.float32),
             "G": (rng.standard_normal((classes, 4)) * 0.3).astype(np.float32), "gb": np.zeros(classes, np.float32)}
    nodes = [helper.make_node("Conv", ["img", "K", "kb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "G", "gb"], ["logits"], transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 1, 6, 6])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)


def insert_file(model: onnx.ModelProto, path: Path, ops=("MatMul", "Gemm", "Conv")) -> Path:
    policy = rp.Policy((rp.Rule(ops=tuple(ops), min_size=8),), 0, 0.02)
    result = reparam.insert(model, policy, measure_latency=False)
    assert result.report.verified
    path.write_bytes(result.model.SerializeToString())
    return path


def blobs(n: int, seed: int, classes: int = 3, features: int = 8, noise: float = 1.5, flip: bool = False) -> dict:
    """A separable (with noise) classification task: class centres in R^features."""
    centres = np.random.default_rng(123).standard_normal((classes, features)).astype(np.float32) * 1.5
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    x = (centres[y] + noise * r.standard_normal((n, features))).astype(np.float32)
    labels = (y + 1) % classes if flip else y
    return {"x": x, "labels": labels.astype(np.int64)}


def save_npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


class Proc:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(capsys, *args) -> Proc:
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return Proc(code, out, err)


def ok(proc: Proc) -> Proc:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc


def one_line_error(proc: Proc, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("beats-compile: "), err
    for n in needles:
        assert n in err, err
    return err


def in_training_python(script: str, *args) -> str:
    """Run ``script`` in the training interpreter with the torch-free import shim."""
    code = "from beats_compiler.training.env import import_ort_training\n" + textwrap.dedent(script)
    proc = subprocess.run([tenv.find_training_python(), "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(tenv.REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def inserted_mlp(tmp_path_factory) -> Path:
    return insert_file(mlp_model(), tmp_path_factory.mktemp("mlp") / "mlp.inserted.onnx")


# --------------------------------------------------------------------------- tests


def test_artifacts_cli_writes_loadable_ort_artifacts(capsys, inserted_mlp, tmp_path):
    before = inserted_mlp.read_bytes()
    out = tmp_path / "art"
    proc = ok(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", out, "--lr", "0.01", "--weight-decay", "0.01",
                      "--betas", "0.9,0.99", "--eps", "1e-7"))
    assert "trainable (D/V)" in proc.stdout and "frozen" in proc.stdout
    assert inserted_mlp.read_bytes() == before  # input untouched
    for f in (*ORT_FILES, "inserted.onnx", "beats_artifacts.json"):
        assert (out / f).is_file(), f
    assert (out / "inserted.onnx").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "art"]  # nothing else written
    man = json.loads((out / "beats_artifacts.json").read_text())
    expected = reparam.trainable_manifest(onnx.load(str(inserted_mlp)))
    assert man["trainable"]["names"] == expected["trainable"]
    assert man["frozen"]["count"] == len(expected["frozen"])
    assert man["trainable"]["params"] == 2 * (8 * 16 + 16 * 3)  # full: D and V shaped like W1 and W2
    assert man["frozen"]["params"] == 8 * 16 + 16 + 16 * 3
    assert man["loss"] == "ce" and man["loss_output"] == "logits"
    assert man["label"] == {"name": "labels", "dtype": "int64", "shape": ["N"]}
    assert man["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 8]}]
    assert man["optimizer"] == {"name": "adamw", "lr": 0.01, "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1e-7}
    assert man["versions"]["onnxruntime_training"].startswith("1.19.")
    # ORT's own training API loads them: D/V require grad, the rest does not;
    # the AdamW settings are in the optimizer graph.
    got = json.loads(in_training_python("""
        import json, sys, numpy as np, onnx
        _, _, api = import_ort_training()
        d = sys.argv[1]
        state = api.CheckpointState.load_checkpoint(d + "/checkpoint")
        module = api.Module(d + "/training_model.onnx", state, d + "/eval_model.onnx")
        opt = api.Optimizer(d + "/optimizer_model.onnx", module)
        x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
        loss, logits = module(x, np.array([0, 1, 2, 0], np.int64))
        opt.step()
        node = [n for n in onnx.load(d + "/optimizer_model.onnx").graph.node if n.op_type == "AdamWOptimizer"][0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        params = dict(iter(state.parameters))  # (name, Parameter) pairs
        print(json.dumps({"grad": sorted(n for n, p in params.items() if p.requires_grad),
                          "frozen": sorted(n for n, p in params.items() if not p.requires_grad),
                          "inputs": module.input_names(), "outputs": module.output_names(),
                          "logits": list(logits.shape), "loss": float(loss), "attrs": attrs}))
    """, out))
    assert got["grad"] == sorted(expected["trainable"])
    assert got["frozen"] == sorted(expected["frozen"])
    assert got["inputs"] == ["x", "labels"] and got["outputs"][1] == "logits" and got["logits"] == [4, 3]
    assert np.isfinite(got["loss"])
    assert got["attrs"]["alpha"] == pytest.approx(0.9) and got["attrs"]["beta"] == pytest.approx(0.99)
    assert got["attrs"]["weight_decay"] == pytest.approx(0.01) and got["attrs"]["epsilon"] == pytest.approx(1e-7)


def test_artifacts_mse_sgd_on_a_conv_model(tmp_path):
    from beats_compiler.training import generate_artifacts

    src = insert_file(conv_model(), tmp_path / "cnn.inserted.onnx")
    res = generate_artifacts(src, tmp_path / "art", loss="mse", optimizer="sgd", lr=0.1, format="ort")
    m = res.manifest
    assert m["loss"] == "mse" and m["label"] == {"name": "target", "dtype": "float32", "shape": ["N", 2]}
    assert m["optimizer"]["name"] == "sgd" and m["optimizer"]["betas"] is None
    assert m["trainable"]["count"] == 4  # D/V of K and G
    ops = [n.op_type for n in onnx.load(str(tmp_path / "art" / "optimizer_model.onnx")).graph.node]
    assert ops == ["SGDOptimizerV2"]
    assert set(res.files) >= {*ORT_FILES, "inserted.onnx", "beats_artifacts.json"}


def test_not_an_inserted_model_is_bad_input(capsys, tmp_path):
    p = tmp_path / "plain.onnx"
    p.write_bytes(mlp_model().SerializeToString())
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", p, "-o", tmp_path / "art"), 2, "no D/V")
    assert not (tmp_path / "art").exists()


def test_bad_options_are_bad_input(capsys, inserted_mlp, tmp_path):
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", tmp_path / "a", "--output", "nope"), 2, "nope")
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", tmp_path / "a", "--optimizer", "sgd",
                           "--weight-decay", "0.1"), 2, "weight decay")
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", tmp_path / "missing.onnx", "-o", tmp_path / "a"), 2, "no such file")
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", tmp_path / "no" / "such" / "dir"), 2,
                   "does not exist")
    assert not (tmp_path / "a").exists()


def _declared_opset_23(tmp_path, extra_node=None) -> Path:
    # Inserted at opset 17, then declared opset 23 (the ops used are unchanged
    # since): the training environment's onnx 1.17 cannot insert at 23 itself.
    src = insert_file(mlp_model(), tmp_path / "m23.inserted.onnx")
    m = onnx.load(str(src))
    m.opset_import[0].version = 23
    m.ir_version = 11 if onnx.IR_VERSION >= 11 else m.ir_version
    if extra_node is not None:  # put an op after the logits: the loss reads its output
        logits = m.graph.output[0].name
        for n in m.graph.node:
            n.output[:] = [o if o != logits else "pre_" + o for o in n.output]
            n.input[:] = [i if i != logits else "pre_" + i for i in n.input]
        m.graph.node.append(helper.make_node(extra_node, ["pre_" + logits], [logits], name="the_" + extra_node.lower()))
    src.write_bytes(m.SerializeToString())
    return src


NEW_ONNX = onnx.defs.onnx_opset_version() >= 23  # the main environment's onnx can convert opset 23 down


def test_opset_23_model_is_converted_to_21_before_generating(capsys, tmp_path):
    src = _declared_opset_23(tmp_path)
    before = src.read_bytes()
    if not NEW_ONNX:  # in-process under onnx 1.17: one clear problem, nothing written
        err = one_line_error(run_cli(capsys, "artifacts", "--format", "ort", src, "-o", tmp_path / "art"), 2)
        assert "23" in err
        assert not (tmp_path / "art").exists()
        return
    proc = run_cli(capsys, "artifacts", "--format", "ort", src, "-o", tmp_path / "art")
    assert proc.returncode == 0, proc.stderr
    man = json.loads((tmp_path / "art" / "beats_artifacts.json").read_text())
    assert man["versions"]["model_opset"] == 21 and man["versions"]["model_ir_version"] <= 10
    assert any("21" in f for f in man["preflight"]["fixes"]), man["preflight"]["fixes"]
    # the copy kept for folding is the model given, not the converted one
    assert (tmp_path / "art" / "inserted.onnx").read_bytes() == before == src.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_opset_23_model_with_an_op_without_gradient_gets_the_report_and_exit_2(capsys, tmp_path):
    src = _declared_opset_23(tmp_path, extra_node="Floor")
    err = one_line_error(run_cli(capsys, "artifacts", "--format", "ort", src, "-o", tmp_path / "art"), 2)
    if NEW_ONNX:
        assert "Floor" in err and "the_floor" in err and "gradient" in err
    else:
        assert "23" in err
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_missing_training_env_says_how_to_get_it(capsys, inserted_mlp, tmp_path, monkeypatch):
    monkeypatch.setenv(tenv.ENV_VAR, str(tmp_path / "no-python"))
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", tmp_path / "a"), 2, tenv.ENV_VAR, "ort-training-env.sh")
    monkeypatch.delenv(tenv.ENV_VAR)
    monkeypatch.setattr(tenv, "in_training_env", lambda: False)
    monkeypatch.setattr(tenv, "DEFAULT_VENV", tmp_path / "no-venv")
    err = one_line_error(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", tmp_path / "a"), 2, "./scripts/ort-training-env.sh",
                         "pip install -r scripts/train-requirements.txt", "--no-deps -e .", tenv.ENV_VAR)
    assert "onnxruntime-training-cpu 1.19.2" in err
    assert not (tmp_path / "a").exists()


def test_torch_free_import_shim():
    out = in_training_python("""
        import sys
        artifacts, onnxblock, api = import_ort_training()
        print(sorted(m for m in ("torch", "onnxruntime.training.optim") if m in sys.modules),
              artifacts.LossType.CrossEntropyLoss.name, api.Module.__name__)
    """)
    assert out.split() == ["[]", "CrossEntropyLoss", "Module"]


def test_a_crashing_worker_is_an_internal_error(capsys, inserted_mlp, tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'Segmentation fault in the gradient builder' >&2\nexit 139\n")
    fake.chmod(0o755)
    monkeypatch.setenv(tenv.ENV_VAR, str(fake))
    one_line_error(run_cli(capsys, "artifacts", "--format", "ort", inserted_mlp, "-o", tmp_path / "a"), 3, "internal error",
                   "code 139", "Segmentation fault")
    assert not (tmp_path / "a").exists()
