"""The real-model tier of issue 14: 16 architecture families from real
exporters (fixtures/real_families.py: torchvision's ViT, Swin, ConvNeXt,
EfficientNet, RegNet, MobileNetV3; BERT with token_type_ids, RoBERTa,
DistilBERT, GPT-2 with a KV cache, Llama with and without one, T5, the Whisper
encoder; LSTM and GRU; each through the TorchScript and the dynamo exporter)
plus onnxruntime's int8 and fp16 conversions, random weights, tried as a new
user would: no --inputs.

Per model: the default compile verifies on generated inputs (and on the
family's realistic inputs); ``--target gpu`` verifies; ``insert`` then
``fold`` gives back the original node list and byte-identical weights;
``--target npu --calib random`` verifies at cosine >= 0.99 or fails with one
line naming the pass and the node (``NPU_FAILS``), or is refused with one line
naming the node.  Nothing reaches stderr (the library never prints; ONNX
Runtime's and the quantizer's logging stay quiet).

The exports are cached in .cache/real-families (about 100 s to build cold).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

import beats_compiler as bc
from beats_compiler import reparam
from beats_compiler.errors import InputError
from beats_compiler.validate import sort_nodes
from fixtures import real_families as rf  # torch, transformers, torchvision are imported inside its builders

pytestmark = [pytest.mark.slow, pytest.mark.exporters]

NAMES = [s.name for s in rf.FAMILIES]

# npu models whose quantized accuracy misses the bar with random calibration: the
# compile fails (exit 1) with a one-line reason naming the pass and the node.
NPU_FAILS = {"vit-ts", "vit-dynamo", "llama-dynamo", "llama-kv-dynamo", "cnn-int8-qdq"}
# npu refuses these with one line naming the node (dynamic int8: no QNN kernels).
NPU_REFUSES = {"bert-int8-dynamic": "(DynamicQuantizeLinear) is quantized already"}
# insert refuses these: their weights are int8 already.
INSERT_REFUSES = {"bert-int8-dynamic": "quantized (MatMulInteger)", "cnn-int8-qdq": "quantized (DequantizeLinear"}


@pytest.fixture(scope="module")
def corpus():
    built = rf.build_all()
    failed = {n: b.error for n, b in built.items() if b.error}
    assert not failed, f"exports failed: {failed}"
    return {n: b.path for n, b in built.items()}


def _quiet(capfd) -> None:
    err = capfd.readouterr().err
    assert err == "", f"stderr: {err[:500]}"


@pytest.mark.parametrize("name", NAMES)
def test_default_compile_verifies_on_generated_and_real_inputs(corpus, name, capfd):
    r = bc.compile(str(corpus[name]))
    assert r.report.verified, r.report.failure_line()
    assert r.report.verify_input_source and "generated" in r.report.verify_input_source
    assert r.report.nodes_after <= r.report.nodes_before
    real = rf.SPECS[name].real_inputs()
    r2 = bc.compile(str(corpus[name]), inputs=real)
    assert r2.report.verified, r2.report.failure_line()
    _quiet(capfd)


@pytest.mark.parametrize("name", NAMES)
def test_gpu_verifies_and_keeps_symbolic_dims(corpus, name, capfd):
    original = onnx.load(str(corpus[name]))
    r = bc.compile(str(corpus[name]), "gpu")
    assert r.report.verified, r.report.failure_line()

    def dims(m):
        return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*m.graph.input, *m.graph.output]]

    assert dims(r.model) == dims(original)
    _quiet(capfd)


def _node_list(m: onnx.ModelProto):
    return [(n.op_type, n.domain, list(n.input), list(n.output)) for n in m.graph.node]


@pytest.mark.parametrize("name", NAMES)
def test_insert_then_fold_gives_back_the_original(corpus, name, capfd):
    if name in INSERT_REFUSES:
        with pytest.raises(InputError, match="the selection matches no weight: the weights are " +
                           re.escape(INSERT_REFUSES[name])):
            reparam.insert(str(corpus[name]))
        _quiet(capfd)
        return
    ins = reparam.insert(str(corpus[name]))
    assert ins.report.verified, ins.report.failure_line()
    assert len(ins.report.reparam["inserted"]) >= 1
    fold = reparam.fold(ins.model)
    assert fold.report.verified, fold.report.failure_line()
    original = onnx.load(str(corpus[name]))
    sort_nodes(original)  # onnxruntime's fp16 converter writes unsorted graphs; loading sorts them
    assert _node_list(fold.model) == _node_list(original)
    before = {t.name: t.SerializeToString() for t in original.graph.initializer}
    after = {t.name: t.SerializeToString() for t in fold.model.graph.initializer}
    assert after == before
    _quiet(capfd)


@pytest.mark.parametrize("name", NAMES)
def test_npu_verifies_or_names_the_node(corpus, name, capfd):
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    if name in NPU_REFUSES:
        with pytest.raises(InputError, match=r"npu: node '.+' " + re.escape(NPU_REFUSES[name])) as exc:
            bc.compile(str(corpus[name]), "npu", calib="random")
        assert len("beats-compile: error: " + str(exc.value)) <= 200
        _quiet(capfd)
        return
    r = bc.compile(str(corpus[name]), "npu", calib="random")
    acc = r.report.target_details["accuracy"]["outputs"]
    worst = min(o["cosine_min"] for o in acc)
    if name in NPU_FAILS:
        assert not r.report.verified and worst < 0.99
        line = r.report.failure_line()
        assert len("beats-compile: " + line) <= 200, line
        assert r.report.culprit and r.report.culprit.get("pass") and r.report.culprit.get("node"), r.report.culprit
        assert f"first differing pass: {r.report.culprit['pass']}" in line and r.report.culprit["node"][:40] in line
    else:
        assert r.report.verified and worst >= 0.99, r.report.failure_line()
    _quiet(capfd)


def test_the_corpus_covers_every_family_and_both_exporters():
    fams = {s.family for s in rf.FAMILIES}
    assert {"vit", "swin", "convnext", "efficientnet", "regnet", "mobilenetv3", "bert", "roberta", "distilbert",
            "gpt2", "llama", "t5", "whisper", "rnn", "int8", "fp16"} <= fams
    for fam in fams - {"int8", "fp16"}:
        exporters = {s.exporter for s in rf.FAMILIES if s.family == fam}
        assert exporters == {"torchscript", "dynamo"}, fam
    assert np.unique(NAMES).size == len(NAMES)


@pytest.mark.parametrize("name", ["t5-ts", "gpt2-kv-ts", "llama-dynamo"])
def test_tied_embeddings_insert_and_fold(corpus, name, capfd):
    """Weights read by several nodes (T5's shared embedding and lm_head, GPT-2's tied
    wte, norm weights shared through Identity): inserted once, folded back exactly."""
    ins = reparam.insert(str(corpus[name]), reparam.rp.Policy(rules=(reparam.rp.Rule(ops=(
        "MatMul", "Gemm", "Gather")),)))
    assert ins.report.verified, ins.report.failure_line()
    original = onnx.load(str(corpus[name]))
    tables = {n.input[0] for n in original.graph.node if n.op_type == "Gather"}
    assert any(w["weight"] in tables and len(w["consumers"]) >= 1 for w in ins.report.reparam["inserted"])
    fold = reparam.fold(ins.model)
    assert fold.report.verified, fold.report.failure_line()
    assert _node_list(fold.model) == _node_list(original)
    assert {t.name: t.SerializeToString() for t in fold.model.graph.initializer} == \
        {t.name: t.SerializeToString() for t in original.graph.initializer}
    _quiet(capfd)


def test_a_qnn_crash_is_reported_naming_the_node(corpus, capfd):
    """Without transpose_to_reshape, the QNN backend aborts (an assertion in its
    layout handling) on the dynamo ConvNeXt's layer-scale Transpose after a Gather:
    the child-process build turns that into one line naming the node (exit 4)."""
    pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
    from beats_compiler.targets.qnn import QnnCrash

    with pytest.raises(QnnCrash, match=r"crashes \(SIGABRT\) building its graph at node '.+' \(Transpose\)"):
        bc.compile(str(corpus["convnext-dynamo"]), "npu", calib="random", disable=["transpose_to_reshape"])
    _quiet(capfd)
