"""Issue 16, acceptance 1: two fine-tunes of one MiniLM classifier served from one
base by switching RunOptions, through the command line as a user runs it:

    export -> beats-compile insert (rank:8 branch, head full) -> artifacts
    -> train on task 1 (topics)   -> run_topic/adapter.npz
    -> train on task 2 (feelings) -> run_feeling/adapter.npz
    -> beats-compile adapter-base inserted.onnx -> base.onnx
    -> beats-compile export-adapter run_*/adapter.npz --base base.onnx -> *.onnx_adapter
    -> beats-compile fold inserted.onnx --adapter run_*/adapter.npz -> folded_*.onnx

Then ONE InferenceSession (``serving.AdapterSession(...).session``) serves both
fine-tunes and the base: each adapter's logits equal its folded model's within
1e-4, the base with no adapter equals the original export, each adapter is well
above chance on its own task (the two tasks: ``fixtures/training_sets.py``, topics
and feelings, four classes each, so both fine-tune the same exported model).

Needs torch (the exporter): run in .venv; deselected in .venv-train by ``-m 'not exporters'``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from beats_compiler import reparam
from beats_compiler.serving import AdapterSession
from fixtures import training_sets as ts  # torch, transformers are imported inside its builders
from tests.training.test_flows import cli_ok

pytestmark = [pytest.mark.slow, pytest.mark.exporters]

TASKS = ("topic", "feeling")
BATCH = 32


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batches(data: dict):
    n = len(data["labels"])
    for i in range(0, n, BATCH):
        yield {k: data[k][i:i + BATCH] for k in ("input_ids", "attention_mask")}


def _logits(sess: ort.InferenceSession, data: dict) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], feeds)[0] for feeds in _batches(data)])


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max())


def test_two_fine_tunes_one_base(capsys, tmp_path):
    d = tmp_path
    data = {"topic": ts.sentence_sets(n_train_per_class=32, n_eval_per_class=16),
            "feeling": ts.feeling_sets(n_train_per_class=32, n_eval_per_class=16)}
    epochs = {"topic": 1, "feeling": 2}  # 8 steps of 16 sentences per epoch
    ts.export_minilm_classifier(d / "model.onnx")
    (d / "policy.json").write_text(json.dumps(ts.minilm_policy(8, "branch")))
    for task, (train, ev) in data.items():
        np.savez(d / f"{task}_train.npz", **train)
        np.savez(d / f"{task}_eval.npz", **ev)

    cli_ok(capsys, "insert", d / "model.onnx", "-o", d / "inserted.onnx", "--config", d / "policy.json", "-q")
    cli_ok(capsys, "artifacts", d / "inserted.onnx", "-o", d / "art", "--loss", "ce", "--output", "logits",
         "--lr", 1e-3, "-q")
    for task in TASKS:  # two fine-tunes of the one inserted model
        cli_ok(capsys, "train", d / "art", "--data", d / f"{task}_train.npz", "--eval", d / f"{task}_eval.npz",
             "--epochs", epochs[task], "--batch-size", 16, "--out-dir", d / f"run_{task}", "--no-curve", "-q")
    adapters = {t: reparam.Adapter.load(d / f"run_{t}" / "adapter.npz") for t in TASKS}
    assert any(_max_diff(adapters["topic"].values[k], v) > 0 for k, v in adapters["feeling"].values.items())

    cli_ok(capsys, "adapter-base", d / "inserted.onnx", "-o", d / "base.onnx", "-q")
    for task in TASKS:
        cli_ok(capsys, "export-adapter", d / f"run_{task}" / "adapter.npz", "--base", d / "base.onnx",
             "-o", d / f"{task}.onnx_adapter", "-q")
        cli_ok(capsys, "fold", d / "inserted.onnx", "--adapter", d / f"run_{task}" / "adapter.npz",
             "-o", d / f"folded_{task}.onnx", "-q")

    # Each adapter is small: its file is a few percent of its folded model.
    for task in TASKS:
        size, folded_size = (d / f"{task}.onnx_adapter").stat().st_size, (d / f"folded_{task}.onnx").stat().st_size
        assert size < 0.1 * folded_size, (task, size, folded_size)

    serving = AdapterSession(d / "base.onnx", providers=["CPUExecutionProvider"])
    assert set(serving.parameters) == {n for r in reparam.get_records(onnx.load(str(d / "inserted.onnx")))
                                       for n in r.trainable}
    for task in TASKS:
        serving.load_adapter(task, d / f"{task}.onnx_adapter")
    assert sorted(serving.adapters) == sorted(TASKS)
    sess = serving.session  # the one InferenceSession that serves everything below
    assert isinstance(sess, ort.InferenceSession)
    options = {task: serving.run_options(task) for task in TASKS}

    # Interleaved on the one session: per batch, topic, feeling, no adapter, in turn.
    evals = {t: data[t][1] for t in TASKS}
    both = {k: np.concatenate([evals["topic"][k], evals["feeling"][k]]) for k in evals["topic"]}
    got: dict[str, list] = {"topic": [], "feeling": [], "base": []}
    for feeds in _batches(both):
        for task in TASKS:
            got[task].append(sess.run(["logits"], feeds, options[task])[0])
        got["base"].append(sess.run(["logits"], feeds)[0])
    got = {k: np.concatenate(v) for k, v in got.items()}

    # Each fine-tune equals its folded model; the base without adapter equals the export.
    diffs = {task: _max_diff(got[task], _logits(_session(d / f"folded_{task}.onnx"), both)) for task in TASKS}
    diffs["base"] = _max_diff(got["base"], _logits(_session(d / "model.onnx"), both))
    assert all(v <= 1e-4 for v in diffs.values()), diffs
    # The switch is real: the two fine-tunes and the base compute three different functions.
    assert _max_diff(got["topic"], got["feeling"]) > 1e-2
    assert min(_max_diff(got[t], got["base"]) for t in TASKS) > 1e-2

    # Each fine-tune learned its own task (chance: 0.25), the base did not.
    n_topic = len(evals["topic"]["labels"])
    split = {"topic": slice(0, n_topic), "feeling": slice(n_topic, None)}
    acc = {(a, t): float((got[a][split[t]].argmax(1) == evals[t]["labels"]).mean())
           for a in ("topic", "feeling", "base") for t in TASKS}
    assert acc[("topic", "topic")] >= 0.6 and acc[("feeling", "feeling")] >= 0.6, acc
    assert acc[("base", "topic")] <= 0.45 and acc[("base", "feeling")] <= 0.45, acc

    # The serving API's own run() gives the same numbers as the plain session with its RunOptions.
    feeds = next(_batches(both))
    for task in TASKS:
        np.testing.assert_array_equal(serving.run(["logits"], feeds, adapter=task)[0], got[task][:BATCH])
    print(f"adapter flow: max abs diff vs folded (base: vs the export) {diffs}, accuracy (adapter, task) {acc}")
