"""``beats-compile train`` (issue 4): the loop over ORT training artifacts on
tiny models and synthetic tasks: loss drops and accuracy rises, resume equals
an uninterrupted run, early stop keeps the best D/V, bad data is one line and
exit 2, and the adapter folds into a model that reproduces the trained
logits with the original node count."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from beats_compiler import reparam
from beats_compiler.errors import InputError
from beats_compiler.training import generate_artifacts, train
from beats_compiler.training.loop import lr_at
from tests.training.test_artifacts import (blobs, conv_model, insert_file, mlp_model, ok, one_line_error, run_cli,
                                           save_npz)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    src = insert_file(mlp_model(), d / "mlp.inserted.onnx")
    generate_artifacts(src, d / "art", loss="ce", lr=0.01)
    return {"dir": d, "art": d / "art", "src": src,
            "train": save_npz(d / "train.npz", blobs(256, 1)), "eval": save_npz(d / "eval.npz", blobs(128, 2))}


def _ort_logits(model_path, x) -> np.ndarray:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"x": x})[0]


def test_train_cli_learns_and_folds(capsys, task, tmp_path):
    run, folded = tmp_path / "run", tmp_path / "deploy.onnx"
    proc = ok(run_cli(capsys, "train", task["art"], "--data", task["train"], "--eval", task["eval"], "--epochs", "3",
                      "--batch-size", "32", "--schedule", "cosine", "--warmup", "3", "--out-dir", run,
                      "--fold", folded))
    assert "eval accuracy" in proc.stdout and str(folded) in proc.stdout.replace("\n", "")
    m = json.loads((run / "metrics.json").read_text())
    losses = [h["train_loss"] for h in m["epochs"]]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
    assert m["epochs"][-1]["eval_accuracy"] >= m["initial_eval"]["eval_accuracy"] + 0.3
    assert m["epochs"][-1]["eval_accuracy"] >= 0.8
    assert m["epochs"][-1]["eval_loss"] < m["initial_eval"]["eval_loss"]
    assert m["trainable_params"] == 2 * (8 * 16 + 16 * 3)
    assert all(h["steps"] == 8 and h["steps_per_s"] > 0 and h["lr"] > 0 for h in m["epochs"])
    assert (run / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in ("checkpoint", "loop_state.json", "adapter.npz"):
        assert (run / f).is_file(), f
    # The adapter is small (D/V only); ORT's checkpoint also holds the frozen weights and optimizer state.
    assert m["sizes"]["adapter_bytes"] < m["sizes"]["checkpoint_bytes"]

    # Folded: the original's nodes, and the trained function.  Independent
    # check here: the inserted model carrying the adapter's D/V, on ORT.
    adapter = reparam.Adapter.load(run / "adapter.npz")
    fmodel = onnx.load(str(folded))
    assert [n.op_type for n in fmodel.graph.node] == [n.op_type for n in mlp_model().graph.node]
    ins = onnx.load(str(task["art"] / "inserted.onnx"))
    for t in ins.graph.initializer:
        if t.name in adapter.values:
            t.CopyFrom(onnx.numpy_helper.from_array(adapter.values[t.name].astype(np.float32), t.name))
    x = blobs(64, 9)["x"]
    trained = ort.InferenceSession(ins.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    assert np.abs(_ort_logits(folded, x) - trained).max() <= 1e-4
    v_names = [r.V for r in adapter.records]
    assert all(np.abs(adapter.values[v]).max() > 0 for v in v_names)  # V moved from 0

    # `beats-compile fold` applies the adapter to the inserted model, and to the base model.
    out2 = tmp_path / "again.onnx"
    ok(run_cli(capsys, "fold", task["art"] / "inserted.onnx", "--adapter", run / "adapter.npz", "-o", out2, "-q"))
    assert np.abs(_ort_logits(out2, x) - _ort_logits(folded, x)).max() <= 1e-6
    base = tmp_path / "base.onnx"
    base.write_bytes(mlp_model().SerializeToString())
    out3 = tmp_path / "from_base.onnx"
    ok(run_cli(capsys, "fold", base, "--adapter", run / "adapter.npz", "-o", out3, "-q"))
    assert np.abs(_ort_logits(out3, x) - _ort_logits(folded, x)).max() <= 1e-5


def test_resume_continues_like_an_uninterrupted_run(task, tmp_path):
    # A constant schedule (with warmup): a 1-epoch run resumed to 3 epochs has
    # the same learning rates as a 3-epoch run (decaying schedules depend on
    # the total number of steps, so a run must be resumed with its own --epochs).
    kw = dict(eval_data=task["eval"], batch_size=32, lr=0.003, schedule="constant", warmup=3, curve=False)
    full = train(task["art"], task["train"], epochs=3, out_dir=tmp_path / "full", **kw)
    first = train(task["art"], task["train"], epochs=1, out_dir=tmp_path / "split", **kw)
    assert first.metrics["epochs_run"] == 1
    resumed = train(task["art"], task["train"], epochs=3, out_dir=tmp_path / "split", resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7)
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6, abs=1e-7)
        assert a["lr"] == b["lr"]
    fa, fb = np.load(full.adapter), np.load(resumed.adapter)
    for k in fa.files:
        if not k.startswith("__"):
            np.testing.assert_allclose(fa[k], fb[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="schedule was constant"):  # the lr of a resumed run must match
        train(task["art"], task["train"], epochs=5, out_dir=tmp_path / "split", resume=True,
              **{**kw, "schedule": "linear"})
    # Nothing left to do: resuming a finished run trains no more steps.
    again = train(task["art"], task["train"], epochs=3, out_dir=tmp_path / "split", resume=True, **kw)
    assert again.metrics["steps"] == resumed.metrics["steps"]


def test_early_stop_keeps_the_best_values(task, tmp_path):
    # Eval labels are shifted by one class: the better the model learns the
    # training task, the worse it does on this eval set.
    bad_eval = save_npz(tmp_path / "shifted.npz", blobs(96, 3, flip=True))
    res = train(task["art"], task["train"], eval_data=bad_eval, epochs=6, batch_size=32, lr=0.01, patience=2,
                out_dir=tmp_path / "run", curve=False)
    m = res.metrics
    assert m["stopped_early"] and m["epochs_run"] < 6
    assert m["best_epoch"] == 1 and m["kept"] == "best (epoch 1)"
    assert m["monitor"] == "eval_accuracy"
    best = np.load(tmp_path / "run" / "best_params.npz")
    adapter = reparam.Adapter.load(res.adapter)
    for k in best.files:
        np.testing.assert_array_equal(best[k], adapter.values[k])


def test_bad_data_is_one_line_exit_2(capsys, task, tmp_path):
    d = blobs(16, 4)
    art = task["art"]
    wrong_name = save_npz(tmp_path / "a.npz", {"inputs": d["x"], "labels": d["labels"]})
    one_line_error(run_cli(capsys, "train", art, "--data", wrong_name), 2, "missing x", "unexpected inputs")
    wrong_shape = save_npz(tmp_path / "b.npz", {"x": d["x"][:, :5], "labels": d["labels"]})
    one_line_error(run_cli(capsys, "train", art, "--data", wrong_shape), 2, "'x'", "[N, 8]")
    wrong_dtype = save_npz(tmp_path / "c.npz", {"x": d["x"], "labels": d["labels"].astype(np.float32)})
    one_line_error(run_cli(capsys, "train", art, "--data", wrong_dtype), 2, "'labels'", "int64")
    counts = save_npz(tmp_path / "d.npz", {"x": d["x"], "labels": d["labels"][:10]})
    one_line_error(run_cli(capsys, "train", art, "--data", counts), 2, "10 examples")
    out_of_range = save_npz(tmp_path / "e.npz", {"x": d["x"], "labels": d["labels"] + 3})
    one_line_error(run_cli(capsys, "train", art, "--data", out_of_range), 2, "[0, 3)")
    one_line_error(run_cli(capsys, "train", art, "--data", tmp_path / "none.npz"), 2, "not found")
    one_line_error(run_cli(capsys, "train", tmp_path, "--data", wrong_name), 2, "not a beats artifacts folder")
    one_line_error(run_cli(capsys, "train", art, "--data", wrong_name, "--epochs", "0"), 2, "--epochs")
    one_line_error(run_cli(capsys, "train", art, "--data", task["train"], "--resume", "--out-dir", tmp_path / "r"), 2,
                   "nothing to resume")
    # --label names the label array.
    renamed = save_npz(tmp_path / "f.npz", {"x": d["x"], "y": d["labels"]})
    ok(run_cli(capsys, "train", art, "--data", renamed, "--label", "y", "--epochs", "1", "--out-dir",
               tmp_path / "r2", "-q", "--no-curve"))


def test_conv_classifier_trains(tmp_path):
    src = insert_file(conv_model(), tmp_path / "cnn.inserted.onnx")
    generate_artifacts(src, tmp_path / "art", loss="ce", lr=0.02)
    r = np.random.default_rng(5)
    y = r.integers(0, 2, 192)
    img = r.standard_normal((192, 1, 6, 6)).astype(np.float32) * 0.5
    img[y == 1, :, :3, :] += 1.0  # class 1: bright top half
    data = save_npz(tmp_path / "img.npz", {"img": img[:128], "labels": y[:128].astype(np.int64)})
    ev = save_npz(tmp_path / "img_eval.npz", {"img": img[128:], "labels": y[128:].astype(np.int64)})
    res = train(tmp_path / "art", data, eval_data=ev, epochs=3, batch_size=16, fold=tmp_path / "cnn.onnx",
                curve=False)
    h = res.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["eval_accuracy"] > res.metrics["initial_eval"]["eval_accuracy"]
    assert res.fold_max_abs_diff <= 1e-4
    assert res.folded_node_count == len(conv_model().graph.node)


def test_lr_schedules():
    assert [lr_at(s, 10, 1.0, "constant", 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(2, 10, 1.0, "linear", 2) == 1.0 and lr_at(10, 10, 1.0, "linear", 2) == 0.0
    assert lr_at(6, 10, 1.0, "linear", 2) == pytest.approx(0.5)
    assert lr_at(0, 10, 1.0, "cosine", 0) == 1.0 and lr_at(5, 10, 1.0, "cosine", 0) == pytest.approx(0.5)
    assert lr_at(10, 10, 1.0, "cosine", 0) == pytest.approx(0.0, abs=1e-12)
    assert all(math.isfinite(lr_at(s, 1, 1e-3, "cosine", 5)) for s in range(8))


def token_model(vocab: int = 12, dim: int = 8, classes: int = 3) -> onnx.ModelProto:
    """Token classifier: Gather(embedding, ids) [B, S, dim] -> MatMul -> logits [B, S, classes]."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(3)
    inits = [numpy_helper.from_array((r.standard_normal((vocab, dim)) * 0.5).astype(np.float32), "E"),
             numpy_helper.from_array((r.standard_normal((dim, classes)) * 0.1).astype(np.float32), "W")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["logits"])]
    g = helper.make_graph(nodes, "tok", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", classes])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_token_classifier_with_ignored_padding_trains(tmp_path):
    """Token-level cross-entropy ([B, S, C] logits, [B, S] labels, -100 on padding) through
    artifacts and train: padding neither counts in the loss nor in the accuracy."""
    src = insert_file(token_model(), tmp_path / "tok.inserted.onnx", ops=("MatMul",))
    generate_artifacts(src, tmp_path / "art", loss="ce", lr=0.05)
    r = np.random.default_rng(7)

    def data(n):
        ids = r.integers(0, 12, (n, 6))
        labels = (ids % 3).astype(np.int64)  # the class is a function of the token
        pad = r.random((n, 6)) < 0.3
        labels[pad] = -100
        return {"ids": ids.astype(np.int64), "labels": labels}

    tr, ev = save_npz(tmp_path / "t.npz", data(96)), save_npz(tmp_path / "e.npz", data(48))
    res = train(tmp_path / "art", tr, eval_data=ev, epochs=6, batch_size=16, fold=tmp_path / "tok.onnx", curve=False)
    h = res.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["eval_accuracy"] >= 0.9 > res.metrics["initial_eval"]["eval_accuracy"]
    assert res.fold_max_abs_diff <= 1e-4
    # The accuracy counted only the labelled tokens: recompute it on the folded model.
    e = dict(np.load(ev))
    sess = ort.InferenceSession(str(tmp_path / "tok.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(["logits"], {"ids": e["ids"]})[0].argmax(-1)
    keep = e["labels"] != -100
    assert abs(float((pred == e["labels"])[keep].mean()) - res.metrics["best"]) < 1e-9


def test_fold_verifies_on_the_training_examples(tmp_path):
    """A two-row embedding (BERT's token_type_ids): inputs generated for verification
    index past it, so `--fold` must verify on the saved examples, not on generated ones."""
    from passes import reparam as rp

    ids = np.random.default_rng(5).integers(0, 2, (32, 4)).astype(np.int64)
    data = {"ids": ids, "labels": ids.copy()}
    res = reparam.insert(token_model(vocab=2), rp.Policy((rp.Rule(ops=("MatMul",), min_size=8),), 0, 0.02),
                         inputs={"ids": ids[:2]}, measure_latency=False)
    src = tmp_path / "tt.inserted.onnx"
    src.write_bytes(res.model.SerializeToString())
    generate_artifacts(src, tmp_path / "art", loss="ce", lr=0.05)
    out = train(tmp_path / "art", save_npz(tmp_path / "t.npz", data), epochs=1, batch_size=8,
                fold=tmp_path / "tt.onnx", curve=False)
    assert out.fold_max_abs_diff <= 1e-4 and out.folded_node_count == 2
