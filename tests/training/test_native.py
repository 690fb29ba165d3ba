"""``beats-compile artifacts`` in its default format (the gradient pass on
current onnxruntime, ``beats_compiler.training.native``): the files and
manifest it writes, the pre-flight's refusal of an op without a gradient rule
on the path to the loss, and ``NativeTrainer``'s steps (I/O binding with two
OrtValue sets swapped each step) against the train-step model run with plain
``run()`` and numpy feeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from beats_compiler import reparam
from beats_compiler.errors import InputError
from beats_compiler.training import generate_artifacts
from beats_compiler.training.native import NativeTrainer
from passes.gradient import RULES
from tests.training.test_artifacts import blobs, insert_file, mlp_model, ok, one_line_error, run_cli

FEATURES, HIDDEN, CLASSES = 16, 32, 3  # W1 is 2 KiB: stored in weights.data, not inside the models
NATIVE_FILES = {"train_step.onnx", "eval_model.onnx", "weights.data", "params.npz", "inserted.onnx",
                "beats_artifacts.json"}
NO_RULE = "Floor"
assert NO_RULE not in RULES


def _mlp(**kw) -> onnx.ModelProto:
    return mlp_model(features=FEATURES, hidden=HIDDEN, classes=CLASSES, **kw)


@pytest.fixture(scope="module")
def inserted(tmp_path_factory) -> Path:
    return insert_file(_mlp(), tmp_path_factory.mktemp("native") / "mlp.inserted.onnx")


def _manifest(art: Path) -> dict:
    return json.loads((art / "beats_artifacts.json").read_text())


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def _data(n: int, seed: int) -> dict:
    return blobs(n, seed, classes=CLASSES, features=FEATURES)


# --------------------------------------------------------------------------- what is written


def test_default_format_files_and_manifest(inserted, tmp_path):
    before = inserted.read_bytes()
    out = tmp_path / "art"
    res = generate_artifacts(inserted, out, lr=0.02, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-7)
    assert set(res.files) == NATIVE_FILES
    assert {p.name for p in out.iterdir()} == NATIVE_FILES  # nothing of ORT training's format
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary folder left
    assert inserted.read_bytes() == before and (out / "inserted.onnx").read_bytes() == before

    man = _manifest(out)
    assert man == res.manifest
    assert man["format"] == 1 and man["engine"] == "beats"
    expected = reparam.trainable_manifest(onnx.load(str(inserted)))
    names = expected["trainable"]
    assert man["trainable"]["names"] == names and man["trainable"]["count"] == len(names) == 4
    assert man["trainable"]["params"] == 2 * (FEATURES * HIDDEN + HIDDEN * CLASSES)
    assert man["trainable"]["bytes"] == 4 * man["trainable"]["params"]
    assert man["frozen"]["count"] == len(expected["frozen"]) == 3
    assert man["frozen"]["params"] == FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES
    assert man["state"] == {p: [f"{p}.adam_m", f"{p}.adam_v"] for p in names}
    assert man["loss"] == "ce" and man["loss_output"] == "logits" and man["ignore_index"] == -100
    assert man["label"] == {"name": "labels", "dtype": "int64", "shape": ["N"]}
    assert man["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", FEATURES]}]
    assert man["eval_outputs"] == ["loss", "logits"] and man["classes"] == CLASSES
    assert man["optimizer"] == {"name": "adamw", "lr": 0.02, "weight_decay": 0.01, "betas": [0.9, 0.99],
                                "eps": 1e-7, "momentum": None}
    assert man["preflight"]["ok"] and man["preflight"]["problems"] == [] and man["preflight"]["fixes"] == []
    assert man["versions"]["onnxruntime"] == ort.__version__
    assert man["files"] == {f: (out / f).stat().st_size for f in NATIVE_FILES - {"beats_artifacts.json"}}

    train = onnx.load(str(out / "train_step.onnx"), load_external_data=False)
    ev = onnx.load(str(out / "eval_model.onnx"), load_external_data=False)
    gr = man["graph"]
    assert gr["train_nodes"] == len(train.graph.node) and gr["eval_nodes"] == len(ev.graph.node)
    assert gr["backward_nodes"] > 0 and gr["optimizer_nodes"] > 0
    assert gr["train_nodes"] >= gr["eval_nodes"] + gr["backward_nodes"] + gr["optimizer_nodes"]
    state = [s for p in names for s in man["state"][p]]
    assert [i.name for i in train.graph.input] == ["x", *names, "labels", "lr", "step", *state]
    assert [o.name for o in train.graph.output] == ["loss", *[n + ".next" for p in names for n in [p, *man["state"][p]]]]
    assert [i.name for i in ev.graph.input] == ["x", *names, "labels"]

    # The frozen W1 is stored once, in weights.data, which both models point at.
    def external(m):
        return {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    assert set(external(train)) == set(external(ev)) == {"W1"}
    assert external(train) == external(ev) and external(ev)["W1"]["location"] == "weights.data"
    assert (out / "weights.data").stat().st_size == 4 * FEATURES * HIDDEN
    w1 = onnx.numpy_helper.to_array(next(t for t in _mlp().graph.initializer if t.name == "W1"))
    loaded = onnx.load(str(out / "eval_model.onnx"))
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(next(t for t in loaded.graph.initializer
                                                                  if t.name == "W1")), w1)

    # params.npz: the inserted model's D/V (V = 0: the model's own function at the start).
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(inserted)).graph.initializer}
    with np.load(out / "params.npz") as z:
        assert sorted(z.files) == sorted(names)
        for n in names:
            np.testing.assert_array_equal(z[n], inits[n])
    # The eval model, fed the starting D/V, gives the inserted model's logits.
    x = _data(10, 3)["x"]
    sess = ort.InferenceSession(str(out / "eval_model.onnx"), providers=["CPUExecutionProvider"])
    loss, logits = sess.run(None, {"x": x, "labels": np.zeros(10, np.int64), **{n: inits[n] for n in names}})
    want = ort.InferenceSession(str(inserted), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(loss)


def test_default_format_through_the_cli(capsys, inserted, tmp_path):
    out = tmp_path / "art"
    proc = ok(run_cli(capsys, "artifacts", inserted, "-o", out, "--loss", "mse", "--optimizer", "sgd", "--lr", "0.1",
                      "--momentum", "0.9", "--weight-decay", "0.001"))
    assert "trainable (D/V)" in proc.stdout and "momentum 0.9" in proc.stdout
    assert {p.name for p in out.iterdir()} == NATIVE_FILES
    man = _manifest(out)
    names = man["trainable"]["names"]
    assert man["engine"] == "beats" and man["trainable"]["count"] == 4
    assert man["state"] == {p: [f"{p}.momentum"] for p in names}
    assert man["loss"] == "mse" and man["ignore_index"] is None and "classes" not in man
    assert man["label"] == {"name": "target", "dtype": "float32", "shape": ["N", CLASSES]}
    assert man["optimizer"] == {"name": "sgd", "lr": 0.1, "weight_decay": 0.001, "betas": None, "eps": None,
                                "momentum": 0.9}
    train = onnx.load(str(out / "train_step.onnx"), load_external_data=False)
    assert man["graph"]["train_nodes"] == len(train.graph.node)
    assert [o.name for o in train.graph.output] == ["loss", *[n + ".next" for p in names for n in (p, p + ".momentum")]]
    # plain SGD: no state at all
    out2 = tmp_path / "art2"
    ok(run_cli(capsys, "artifacts", inserted, "-o", out2, "--optimizer", "sgd", "-q"))
    assert _manifest(out2)["state"] == {p: [] for p in names}
    # the ORT-only refusal does not apply to the default format
    ok(run_cli(capsys, "artifacts", inserted, "-o", tmp_path / "art3", "--format", "beats", "--optimizer", "sgd",
               "--weight-decay", "0.1", "-q"))


# --------------------------------------------------------------------------- the pre-flight


def _with_node(op: str, *, where: str, name: str = "odd", domain: str = "") -> onnx.ModelProto:
    """The MLP with one more ``op`` node: ``path`` between the Relu and the second
    MatMul (on the path from W1's D/V to the loss); ``input`` on x (before every
    trainable); ``side`` on the logits, to a second output (after the loss output)."""
    m = _mlp()
    g = m.graph
    if where == "path":
        for n in g.node:
            n.output[:] = ["h3_in" if o == "h3" else o for o in n.output]
        g.node.insert(3, helper.make_node(op, ["h3_in"], ["h3"], name=name, domain=domain))
    elif where == "input":
        for n in g.node:
            n.input[:] = ["x_in" if i == "x" else i for i in n.input]
        g.node.insert(0, helper.make_node(op, ["x"], ["x_in"], name=name, domain=domain))
    else:
        g.node.append(helper.make_node(op, ["logits"], ["side"], name=name, domain=domain))
        g.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["N", CLASSES]))
    if domain:
        m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


def test_an_op_without_gradient_rule_on_the_path_is_refused(capsys, tmp_path):
    src = insert_file(_with_node(NO_RULE, where="path", name="the_floor"), tmp_path / "floor.onnx")
    out = tmp_path / "art"
    err = one_line_error(run_cli(capsys, "artifacts", src, "-o", out), 2, NO_RULE, "'the_floor'", "gradient")
    assert "1 problem" in err and "on the path" in err
    _nothing_written(tmp_path, out)
    with pytest.raises(InputError, match=f"no gradient rule for {NO_RULE}"):  # the API: the same InputError
        generate_artifacts(src, out)
    _nothing_written(tmp_path, out)


def _add_custom_op(src: Path, dst: Path, where: str) -> Path:
    """A custom-domain op added to an inserted model (ORT cannot run it, so insert
    could not verify a model holding it)."""
    m = onnx.load(str(src))
    g = m.graph
    if where == "path":
        for n in g.node:
            n.output[:] = ["h3_in" if o == "h3" else o for o in n.output]
        k = next(i for i, n in enumerate(g.node) if n.op_type == "Relu") + 1
        g.node.insert(k, helper.make_node("Mystery", ["h3_in"], ["h3"], name="custom", domain="com.example"))
    else:
        g.node.append(helper.make_node("Mystery", ["logits"], ["side"], name="custom", domain="com.example"))
        g.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, ["N", CLASSES]))
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    dst.write_bytes(m.SerializeToString())
    return dst


def test_a_custom_domain_op_on_the_path_is_named(capsys, inserted, tmp_path):
    src = _add_custom_op(inserted, tmp_path / "custom.onnx", "path")
    out = tmp_path / "art"
    one_line_error(run_cli(capsys, "artifacts", src, "-o", out), 2, "com.example:Mystery", "'custom'")
    _nothing_written(tmp_path, out)


def _one_step(art: Path) -> float:
    tr = NativeTrainer(art, _manifest(art))
    d = _data(8, 1)
    loss = tr.step(d, np.arange(8), 0.01)
    assert np.isfinite(loss)
    assert all(np.isfinite(v).all() for v in tr.state().values())
    return loss


def test_the_same_op_off_the_path_is_accepted(capsys, inserted, tmp_path):
    # On the input, before every trainable: it stays in the train step, which needs no gradient through it.
    src = insert_file(_with_node(NO_RULE, where="input", name="the_floor"), tmp_path / "floor_in.onnx")
    ok(run_cli(capsys, "artifacts", src, "-o", tmp_path / "a1", "-q"))
    assert NO_RULE in [n.op_type for n in onnx.load(str(tmp_path / "a1" / "train_step.onnx")).graph.node]
    _one_step(tmp_path / "a1")
    # After the loss output, to another output: not in the train step at all.
    src = insert_file(_with_node(NO_RULE, where="side", name="the_floor"), tmp_path / "floor_side.onnx")
    ok(run_cli(capsys, "artifacts", src, "-o", tmp_path / "a2", "-q"))
    assert NO_RULE not in [n.op_type for n in onnx.load(str(tmp_path / "a2" / "train_step.onnx")).graph.node]
    _one_step(tmp_path / "a2")
    # A custom-domain op (ORT could not even run it) off the path.
    src = _add_custom_op(inserted, tmp_path / "custom_side.onnx", "side")
    ok(run_cli(capsys, "artifacts", src, "-o", tmp_path / "a3", "-q"))
    assert _manifest(tmp_path / "a3")["loss_output"] == "logits"
    _one_step(tmp_path / "a3")


def test_a_model_without_dv_is_refused(capsys, tmp_path):
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(_mlp().SerializeToString())
    out = tmp_path / "art"
    one_line_error(run_cli(capsys, "artifacts", plain, "-o", out), 2, "no D/V", "beats-compile insert")
    _nothing_written(tmp_path, out)
    with pytest.raises(InputError, match="no D/V"):
        generate_artifacts(plain, out)
    _nothing_written(tmp_path, out)


# --------------------------------------------------------------------------- NativeTrainer


class Reference:
    """The train-step and eval models run with plain ``run()`` and numpy feeds,
    the parameters and optimizer state carried in numpy."""

    def __init__(self, art: Path, man: dict):
        self.train = ort.InferenceSession(str(art / "train_step.onnx"), providers=["CPUExecutionProvider"])
        self.eval = ort.InferenceSession(str(art / "eval_model.onnx"), providers=["CPUExecutionProvider"])
        self.params = man["trainable"]["names"]
        with np.load(art / "params.npz") as z:
            self.values = {k: z[k].copy() for k in z.files}
        self.values.update({s: np.zeros_like(self.values[p]) for p in self.params for s in man["state"][p]})
        self.steps = 0

    def step(self, arrays: dict, idx, lr: float) -> float:
        self.steps += 1
        feeds = {"x": arrays["x"][idx], "labels": arrays["labels"][idx], "lr": np.asarray(lr, np.float32),
                 "step": np.asarray(self.steps, np.float32), **self.values}
        outs = dict(zip([o.name for o in self.train.get_outputs()], self.train.run(None, feeds)))
        for k in self.values:
            self.values[k] = outs[k + ".next"]
        return float(outs["loss"])

    def eval_run(self, arrays: dict, idx):
        return self.eval.run(None, {"x": arrays["x"][idx], "labels": arrays["labels"][idx],
                                    **{p: self.values[p] for p in self.params}})


def _same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("opts", [dict(optimizer="adamw", weight_decay=0.01, lr=0.02),
                                  dict(optimizer="sgd", momentum=0.9, weight_decay=0.01, lr=0.1)],
                         ids=["adamw", "sgd-momentum"])
def test_native_trainer_equals_plain_runs(inserted, tmp_path, opts):
    art = tmp_path / "art"
    generate_artifacts(inserted, art, **opts)
    man = _manifest(art)
    tr, ref = NativeTrainer(art, man), Reference(art, man)
    assert sorted(tr.state()) == sorted(ref.values)
    d = _data(64, 5)
    order = np.random.default_rng(0).permutation(64)
    sizes = [8, 8, 5, 8, 3, 16, 8]  # an odd number of steps, and batch sizes that change between them
    start = 0
    previous = tr.values()
    for k, n in enumerate(sizes):
        idx = order[start:start + n]
        start += n
        lr = opts["lr"] * (1 + 0.25 * (k % 3))
        got = tr.step(d, idx, lr)
        want = ref.step(d, idx, lr)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6), k
        assert tr.step_count == k + 1
        _same(tr.state(), ref.values, f"after step {k + 1}")
        now = tr.values()
        assert any(not np.array_equal(now[p], previous[p]) for p in now), f"step {k + 1} changed nothing"
        previous = now
    v_names = [p for p in man["trainable"]["names"] if p.endswith("beats_V")]
    assert all(np.abs(tr.values()[v]).max() > 0 for v in v_names)  # V moved from 0

    # Evaluation reads the current set (after an odd number of steps: the second one).
    idx = np.arange(20)
    want_loss, want_logits = ref.eval_run(d, idx)
    np.testing.assert_allclose(tr.logits(d, idx), want_logits, rtol=1e-6, atol=1e-6)
    loss, acc = tr.evaluate(d, 20, 20, False)
    assert loss == pytest.approx(float(want_loss), rel=1e-6, abs=1e-6)
    assert acc == pytest.approx(float((want_logits.argmax(-1) == d["labels"][idx]).mean()))

    # set_values (how the loop restores the best epoch's D/V) writes the set the next step reads.
    with np.load(art / "params.npz") as z:
        start_values = {k: z[k] for k in z.files}
    tr.set_values(start_values)
    ref.values.update({k: v.copy() for k, v in start_values.items()})
    _same(tr.state(), ref.values, "after set_values")
    for k in range(2):
        idx = order[start:start + 8]
        start += 8
        assert tr.step(d, idx, opts["lr"]) == pytest.approx(ref.step(d, idx, opts["lr"]), rel=1e-6, abs=1e-6)
        _same(tr.state(), ref.values, f"after set_values and {k + 1} more steps")
