"""Robustness sweep: run the CLI on models nobody here wrote and print a table.

For each model: ``beats-compile M -o OUT --report R.json`` (exit code, node
counts, max abs diff, seconds, graph inputs/outputs kept with their dims), then
``insert`` (default ``full``, ``--factorization rank:4``, and ``rank:4 --layout
branch``) and ``fold`` of each inserted model, checking that the folded model
has the original's node list and initializer bytes.

    python bench/sweep_models.py                 # every source
    python bench/sweep_models.py --only light,skl --workdir /tmp/sweep -k gpt

Sources: the light model zoo of the onnx 1.17 backend data (``.cache``),
opset conversions of one of them, transformers models built from tiny configs
with random weights (TorchScript and dynamo exporters), small recurrent and
scripted-loop torch models, skl2onnx estimators and fp16 models.  Everything
is built offline (``HF_HUB_OFFLINE=1``); a builder whose dependency is missing
is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.exporters import dynamo_model, torchscript_model  # noqa: E402
from fixtures.real_models import hf_output, randomize_batchnorm  # noqa: E402

CLI = [sys.executable, "-c", "from beats_compiler.cli import main; raise SystemExit(main())"]
BACKEND = ROOT / ".cache" / "onnx-backend-data" / "1.17.0"


# ---------------------------------------------------------------- builders
# Each builder returns a list of (name, ModelProto).

def light_zoo():
    out = []
    for p in sorted((BACKEND / "light").glob("*.onnx")):
        out.append((p.stem, onnx.load(p)))
    return out


def opset_conversions():
    """A small CNN exported at opsets 7..17, and converted from 13 to 18..21 by onnx's version converter."""
    import torch
    from onnx import version_converter
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10),
                        nn.Softmax(-1))
    randomize_batchnorm(net, weight=None, bias=None)

    def export(v):
        return torchscript_model(net, (torch.randn(2, 3, 16, 16),), ["x"], ["y"],
                                 {"x": {0: "batch"}, "y": {0: "batch"}}, opset=v, do_constant_folding=False)

    out = []
    for v in (7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21):
        try:  # the TorchScript exporter where it can, the converter (up only) above
            m = export(v) if v <= 17 else version_converter.convert_version(export(13), v)
            out.append((f"cnn_opset{v}", m))
        except Exception as e:  # noqa: BLE001 - the converter's limits are not ours
            print(f"  (opset {v} conversion failed: {str(e)[:150]})", file=sys.stderr)
    return out


def pytorch_converted_ir3():
    """A few IR-3 models of the backend data (inputs listed with initializers)."""
    out = []
    for d in ("test_operator_lstm", "test_gru", "test_lstm", "test_operator_conv", "test_BatchNorm2d_eval",
              "test_Linear", "test_Embedding", "test_ConvTranspose2d"):
        for base in ("pytorch-converted", "pytorch-operator"):
            p = BACKEND / base / d / "model.onnx"
            if p.exists():
                out.append((f"pt_{d[5:]}", onnx.load(p)))
    return out


def transformers_models():
    import torch
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
           "out": {0: "batch", 1: "seq"}}
    dyn_b = dict(dyn, out={0: "batch"})
    out = []

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                            use_cache=False)).eval()
    out.append(("gpt2_ts", torchscript_model(hf_output(gpt2, "logits"), (ids, mask),
                                             ["input_ids", "attention_mask"], ["out"], dyn)))
    distil = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)).eval()
    out.append(("distilbert_ts", torchscript_model(hf_output(distil, "logits"), (ids, mask),
                                                   ["input_ids", "attention_mask"], ["out"], dyn_b)))
    roberta = tf.RobertaModel(tf.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64,
                                               max_position_embeddings=64)).eval()
    rid = ids % 97 + 2  # roberta positions start after the padding index
    out.append(("roberta_ts", torchscript_model(hf_output(roberta, "last_hidden_state"), (rid, mask),
                                                ["input_ids", "attention_mask"], ["out"], dyn)))
    t5 = tf.T5EncoderModel(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4)).eval()
    out.append(("t5enc_ts", torchscript_model(hf_output(t5, "last_hidden_state"), (ids, mask),
                                              ["input_ids", "attention_mask"], ["out"], dyn)))
    bart = tf.BartModel(tf.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1,
                                      encoder_attention_heads=4, decoder_attention_heads=4,
                                      encoder_ffn_dim=64, decoder_ffn_dim=64,
                                      max_position_embeddings=64)).eval().get_encoder()
    out.append(("bartenc_ts", torchscript_model(hf_output(bart, "last_hidden_state"), (ids, mask),
                                                ["input_ids", "attention_mask"], ["out"], dyn)))
    vit = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, num_labels=5)).eval()

    class V(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = vit

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    px = torch.randn(2, 3, 16, 16)
    out.append(("vit_ts", torchscript_model(V().eval(), (px,), ["pixel_values"], ["out"],
                                            {"pixel_values": {0: "batch"}, "out": {0: "batch"}})))

    # dynamo exporter
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=30)
    try:
        out.append(("gpt2_dynamo", dynamo_model(hf_output(gpt2, "logits"), (ids, mask),
                                                ["input_ids", "attention_mask"], ["out"],
                                                {"input_ids": {0: batch, 1: seq},
                                                 "attention_mask": {0: batch, 1: seq}})))
    except Exception as e:  # noqa: BLE001 - exporter limits are not ours
        print(f"  (gpt2_dynamo export failed: {type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    try:
        out.append(("distilbert_dynamo", dynamo_model(hf_output(distil, "logits"), (ids, mask),
                                                      ["input_ids", "attention_mask"], ["out"],
                                                      {"input_ids": {0: batch, 1: seq},
                                                       "attention_mask": {0: batch, 1: seq}})))
    except Exception as e:  # noqa: BLE001
        print(f"  (distilbert_dynamo export failed: {type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    try:
        out.append(("vit_dynamo", dynamo_model(V().eval(), (px,), ["pixel_values"], ["out"],
                                               {"pixel_values": {0: batch}})))
    except Exception as e:  # noqa: BLE001
        print(f"  (vit_dynamo export failed: {type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    return out


def torch_misc():
    import torch
    from torch import nn

    torch.manual_seed(0)
    out = []

    class RNN(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.emb = nn.Linear(6, 16)
            self.rnn = cell(16, 32, num_layers=2, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            h, _ = self.rnn(self.emb(x))
            return self.head(h[:, -1])

    x = torch.randn(2, 5, 6)
    for cell in (nn.LSTM, nn.GRU):
        m = RNN(cell).eval()
        out.append((f"{cell.__name__.lower()}_ts", torchscript_model(
            m, (x,), ["x"], ["y"], {"x": {0: "batch", 1: "time"}, "y": {0: "batch"}})))
    try:
        out.append(("lstm_dynamo", dynamo_model(RNN(nn.LSTM).eval(), (x,), ["x"], ["y"],
                                                {"x": {0: torch.export.Dim("batch", min=1, max=64)}})))
    except Exception as e:  # noqa: BLE001
        print(f"  (lstm_dynamo export failed: {type(e).__name__}: {str(e)[:200]})", file=sys.stderr)

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x, n: int):
            for _ in range(n):
                x = torch.tanh(self.lin(x))
            if x.sum() > 0:
                x = x * 2
            else:
                x = x - 1
            return x

    scripted = torch.jit.script(Loop().eval())
    out.append(("scripted_loop_ts", torchscript_model(scripted, (torch.randn(3, 32), 3), ["x", "n"], ["y"],
                                                      {"x": {0: "batch"}, "y": {0: "batch"}})))

    class Mixed(nn.Module):
        """Depthwise/grouped/transposed convs, norms, pooling, upsampling."""

        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.g = nn.Conv2d(16, 32, 1, groups=4)
            self.up = nn.ConvTranspose2d(32, 8, 2, stride=2)
            self.gn = nn.GroupNorm(2, 8)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = torch.relu(self.bn(self.c1(x)))
            x = nn.functional.hardswish(self.bn2(self.dw(x)))
            x = self.up(self.g(x))
            x = self.gn(x)
            x = nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
            x = x.mean((2, 3))
            return self.fc(self.ln(x))

    mixed = randomize_batchnorm(Mixed(), weight=None, bias=None)
    xi = torch.randn(2, 3, 16, 16)
    batch = {"x": {0: "batch"}, "y": {0: "batch"}}
    out.append(("mixed_cnn_ts", torchscript_model(mixed, (xi,), ["x"], ["y"], batch, do_constant_folding=False)))
    out.append(("mixed_cnn_ts_opset11", torchscript_model(mixed, (xi,), ["x"], ["y"], batch, opset=11)))
    out.append(("mixed_cnn_ts_opset9", torchscript_model(mixed, (xi,), ["x"], ["y"], batch, opset=9)))
    try:
        out.append(("mixed_cnn_dynamo", dynamo_model(mixed, (xi,), ["x"], ["y"],
                                                     {"x": {0: torch.export.Dim("batch", min=1, max=64)}})))
    except Exception as e:  # noqa: BLE001
        print(f"  (mixed_cnn_dynamo export failed: {type(e).__name__}: {str(e)[:200]})", file=sys.stderr)

    # fp16: a half-precision MLP through TorchScript
    mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval().half()
    out.append(("mlp_fp16_ts", torchscript_model(mlp, (torch.randn(2, 32).half(),), ["x"], ["y"], batch)))
    return out


def fp16_handbuilt():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float16), "w")
    b = numpy_helper.from_array(rng.standard_normal(48).astype(np.float16), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((48, 8)).astype(np.float16), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["n", 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["n", 8])], [w, b, w2])
    return [("mlp_fp16_hand", helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))]


def sklearn_models():
    from skl2onnx import to_onnx
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        GradientBoostingRegressor,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    from sklearn.svm import SVC

    X, y = make_classification(200, 12, n_informative=6, n_classes=3, random_state=0)
    X = X.astype(np.float32)
    out = []
    opts = {"zipmap": False}
    pipe = make_pipeline(StandardScaler(), PCA(6), SVC(probability=True)).fit(X, y)
    out.append(("skl_scaler_pca_svc", to_onnx(pipe, X[:2], options={SVC: opts} | {id(pipe): opts}, target_opset=17)))
    out.append(("skl_gbc", to_onnx(GradientBoostingClassifier(n_estimators=10).fit(X, y), X[:2],
                                   options={"zipmap": False}, target_opset=17)))
    out.append(("skl_gbr", to_onnx(GradientBoostingRegressor(n_estimators=10).fit(X, y.astype(np.float32)), X[:2],
                                   target_opset=17)))
    out.append(("skl_rf_zipmap", to_onnx(RandomForestClassifier(n_estimators=5, max_depth=4).fit(X, y), X[:2],
                                         target_opset=17)))
    out.append(("skl_kmeans", to_onnx(KMeans(3, n_init=2, random_state=0).fit(X), X[:2], target_opset=17)))
    out.append(("skl_logreg", to_onnx(LogisticRegression(max_iter=200).fit(X, y), X[:2],
                                      options={"zipmap": False}, target_opset=17)))
    out.append(("skl_mlp", to_onnx(MLPClassifier((64, 32), max_iter=50).fit(X, y), X[:2],
                                   options={"zipmap": False}, target_opset=17)))
    Xi = np.random.default_rng(0).integers(0, 5, (50, 3)).astype(np.int64)
    out.append(("skl_onehot_int", to_onnx(OneHotEncoder(handle_unknown="ignore").fit(Xi), Xi[:2], target_opset=17)))
    from skl2onnx.common.data_types import StringTensorType

    Xs = np.random.default_rng(0).choice(["red", "green", "blue"], (50, 2)).astype(object)
    out.append(("skl_onehot_string", to_onnx(OneHotEncoder(handle_unknown="ignore").fit(Xs),
                                             initial_types=[("s", StringTensorType([None, 2]))], target_opset=17)))
    return out


def ort_tools():
    """What ONNX Runtime's own tools write: dynamic and static (QDQ) quantization,
    and the transformers optimizer's com.microsoft fused ops."""
    import torch
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    out = []
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    base = torchscript_model(mlp, (torch.randn(2, 64),), ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})
    onnx.save(base, tmp / "mlp.onnx")
    quantize_dynamic(tmp / "mlp.onnx", tmp / "mlp_dyn.onnx", weight_type=QuantType.QInt8)
    out.append(("mlp_quant_dynamic", onnx.load(tmp / "mlp_dyn.onnx")))

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(tmp / "mlp.onnx", tmp / "mlp_qdq.onnx", Reader(), quant_format=QuantFormat.QDQ)
    out.append(("mlp_quant_qdq", onnx.load(tmp / "mlp_qdq.onnx")))
    quantize_static(tmp / "mlp.onnx", tmp / "mlp_qop.onnx", Reader(), quant_format=QuantFormat.QOperator)
    out.append(("mlp_quant_qoperator", onnx.load(tmp / "mlp_qop.onnx")))

    import transformers as tf
    from onnxruntime.transformers import optimizer

    bert = tf.BertModel(tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    m = torchscript_model(hf_output(bert, "last_hidden_state"), (ids, torch.ones(2, 8, dtype=torch.int64)),
                          ["input_ids", "attention_mask"], ["out"],
                          {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                           "out": {0: "batch", 1: "seq"}})
    opt = optimizer.optimize_model(m, model_type="bert", num_heads=4, hidden_size=32, opt_level=1)
    out.append(("bert_ort_fused", opt.model))
    return out


def edge_cases():
    """Hand-built corner cases of graph interfaces."""
    T = onnx.TensorProto
    H = helper.make_node
    V = helper.make_tensor_value_info
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")
    c = numpy_helper.from_array(np.arange(3, dtype=np.float32), "c")

    def model(nodes, ins, outs, inits=(), opset=17):
        return helper.make_model(helper.make_graph(nodes, "edge", ins, outs, list(inits)),
                                 opset_imports=[helper.make_opsetid("", opset)])

    out = [
        ("edge_passthrough", model([H("MatMul", ["x", "w"], ["y"])], [V("x", 1, ["N", 32])],
                                   [V("y", 1, ["N", 32]), V("x", 1, ["N", 32])], [w])),
        ("edge_initializer_output", model([H("MatMul", ["x", "w"], ["y"])], [V("x", 1, ["N", 32])],
                                          [V("y", 1, ["N", 32]), V("w", 1, [32, 32])], [w])),
        ("edge_no_nodes", model([], [V("x", 1, [2, 3])], [V("x", 1, [2, 3])])),
        ("edge_identity_outputs", model([H("Identity", ["x"], ["a"]), H("Identity", ["a"], ["b"]),
                                         H("MatMul", ["b", "w"], ["y"])], [V("x", 1, ["N", 32])],
                                        [V("a", 1, ["N", 32]), V("b", 1, ["N", 32]), V("y", 1, ["N", 32])], [w])),
        ("edge_scalar_and_bool", model([H("Where", ["m", "x", "s"], ["y"])],
                                       [V("m", T.BOOL, ["N"]), V("x", 1, ["N"]), V("s", 1, [])], [V("y", 1, ["N"])])),
        ("edge_unnamed_dims", model([H("Add", ["x", "y"], ["z"])], [V("x", 1, [None, 3]), V("y", 1, [None, 3])],
                                    [V("z", 1, [None, 3])])),
        ("edge_shared_symbol", model([H("Concat", ["x", "y"], ["z"], axis=1), H("Add", ["z", "z"], ["o"])],
                                     [V("x", 1, ["N", "A"]), V("y", 1, ["N", "B"])], [V("o", 1, ["N", None])])),
        ("edge_zero_dim", model([H("MatMul", ["x", "w"], ["y"])], [V("x", 1, [0, 32])], [V("y", 1, [0, 32])], [w])),
        ("edge_constant_output", model([H("Add", ["c", "c"], ["y"]), H("Mul", ["x", "y"], ["z"])],
                                       [V("x", 1, [3])], [V("y", 1, [3]), V("z", 1, [3])], [c])),
        ("edge_unshaped_output", model([H("MatMul", ["x", "w"], ["y"])], [V("x", 1, ["N", 32])],
                                      [V("y", 1, None)], [w])),
        ("edge_int_matmul", model([H("MatMul", ["x", "wi"], ["y"])], [V("x", T.INT32, ["N", 32])],
                                  [V("y", T.INT32, ["N", 32])],
                                  [numpy_helper.from_array(rng.integers(-3, 3, (32, 32)).astype(np.int32), "wi")])),
        ("edge_double", model([H("MatMul", ["x", "wd"], ["y"]), H("Softmax", ["y"], ["z"])],
                              [V("x", T.DOUBLE, ["N", 32])], [V("z", T.DOUBLE, ["N", 32])],
                              [numpy_helper.from_array(rng.standard_normal((32, 32)), "wd")])),
        ("edge_dup_output", model([H("MatMul", ["x", "w"], ["y"]), H("Relu", ["y"], ["r"])],
                                  [V("x", 1, ["N", 32])], [V("r", 1, ["N", 32]), V("y", 1, ["N", 32])], [w])),
    ]
    return out


SOURCES = {
    "light": light_zoo, "opset": opset_conversions, "ir3": pytorch_converted_ir3, "hf": transformers_models,
    "torch": torch_misc, "fp16": fp16_handbuilt, "skl": sklearn_models, "ort": ort_tools,
    "edge": edge_cases,
}


# ---------------------------------------------------------------- checks

def _io_sig(values, inits=()):
    """(name, type, dims) of each value; initializer-backed inputs (IR < 4 lists
    every initializer as an input) are not part of the interface."""
    out = []
    for v in values:
        if v.name in inits:
            continue
        t = v.type
        if t.HasField("tensor_type"):
            dims = tuple((d.dim_param or d.dim_value) if (d.HasField("dim_param") or d.HasField("dim_value")) else "?"
                         for d in t.tensor_type.shape.dim) if t.tensor_type.HasField("shape") else None
            out.append((v.name, t.tensor_type.elem_type, dims))
        else:
            out.append((v.name, t.WhichOneof("value"), None))
    return out


def _sig(m):
    inits = {t.name for t in m.graph.initializer}
    return _io_sig(m.graph.input, inits), _io_sig(m.graph.output)


def _nodes(m):
    return [(n.op_type, n.domain, tuple(n.input), tuple(n.output),
             tuple(a.SerializeToString(deterministic=True) for a in n.attribute)) for n in m.graph.node]


def _inits(m, base_dir):
    from onnx.external_data_helper import load_external_data_for_model

    m = onnx.ModelProto.FromString(m.SerializeToString())
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        load_external_data_for_model(m, str(base_dir))
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer}


# Documented exit-2 refusals (README, exit codes): not bugs of ours, listed apart.
_REFUSALS = ("ONNX Runtime cannot load the original model", "inserting needs opset", "matches no weight",
             "invalid model")


def _problem(problems, refusals, rc, text):
    (refusals if rc == 2 and any(r in text for r in _REFUSALS) else problems).append(text)


def _run(args, timeout):
    t0 = time.perf_counter()
    try:
        p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "T", "timeout", time.perf_counter() - t0
    msg = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [""])[-1]
    return p.returncode, msg, time.perf_counter() - t0


def sweep_one(name, path, work, timeout, problems, refusals):
    row = {"model": name}
    orig = onnx.load(path, load_external_data=False)
    sig = _sig(orig)
    out, rep = work / f"{name}.beats.onnx", work / f"{name}.report.json"
    rc, msg, secs = _run([path, "-o", out, "--report", rep, "-q", "--debug"], timeout)
    row["compile"] = rc
    row["secs"] = secs
    if rc in (0, 1) and rep.exists():
        r = json.loads(rep.read_text())
        row["nodes"] = f"{r['nodes_before']}->{r['nodes_after']}"
        row["diff"] = r["max_abs_diff"]
        if rc == 0 and r["verified"] is not True:
            problems.append(f"{name}: compile exit 0 but verified={r['verified']}")
    if rc != 0:
        _problem(problems, refusals, rc, f"{name}: compile exit {rc}: {msg}")
    if rc == 0:
        res = onnx.load(out, load_external_data=False)
        if _sig(res) != sig:
            problems.append(f"{name}: compile changed graph inputs/outputs: {str(sig)[:300]} -> {str(_sig(res))[:300]}")
            row["io"] = "CHANGED"
        else:
            row["io"] = "ok"
    big = [t for t in orig.graph.initializer if t.data_type in (1, 10, 11, 16) and np.prod(t.dims) >= 1024]
    if not big and rc == 0:
        # weights made by nodes (e.g. ConstantOfShape in the light zoo): reparameterize the
        # compiled model, where they have become initializers
        path, orig = out, onnx.load(out, load_external_data=False)
        row["model"] = name = name + "*"
    base_nodes, base_inits = _nodes(orig), _inits(orig, path.parent)
    for tag, extra in (("full", []), ("rank4", ["--factorization", "rank:4"]),
                       ("branch", ["--factorization", "rank:4", "--layout", "branch"]),
                       ("all", ["--factorization", "vector", "--min-size", "1", "--embeddings"])):
        ins, fold = work / f"{name.rstrip('*')}.{tag}.inserted.onnx", work / f"{name.rstrip('*')}.{tag}.folded.onnx"
        rc, msg, _ = _run(["insert", path, "-o", ins, "-q", "--debug", *extra], timeout)
        cell = str(rc)
        if rc == 2 and "matches no weight" in msg:
            row[tag] = "none"  # nothing to reparameterize: a usage error, as documented
            continue
        if rc != 0:
            _problem(problems, refusals, rc, f"{name}: insert {tag} exit {rc}: {msg}")
        else:
            im = onnx.load(ins, load_external_data=False)
            if _sig(im) != sig:
                problems.append(f"{name}: insert {tag} changed graph inputs/outputs")
                cell += "!io"
            n_ins = len(im.graph.node) - len(orig.graph.node)
            rc2, msg2, _ = _run(["fold", ins, "-o", fold, "-q", "--debug"], timeout)
            if rc2 != 0:
                problems.append(f"{name}: fold {tag} exit {rc2}: {msg2}")
                cell += f"/fold{rc2}"
            else:
                fm = onnx.load(fold, load_external_data=False)
                same = _nodes(fm) == base_nodes and _inits(fm, fold.parent) == base_inits
                same_io = _sig(fm) == sig
                if not same:
                    problems.append(f"{name}: fold(insert {tag}) not identical to the original")
                if not same_io:
                    problems.append(f"{name}: fold(insert {tag}) changed graph inputs/outputs")
                cell += f"(+{n_ins})" + ("=" if same and same_io else "!=")
        row[tag] = cell
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SOURCES), help="comma-separated sources: " + ",".join(SOURCES))
    ap.add_argument("-k", default="", help="only models whose name contains this")
    ap.add_argument("--workdir", default=None, help="keep models and outputs here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    models = []
    for src in args.only.split(","):
        try:
            built = SOURCES[src]()
        except ImportError as e:
            print(f"skipped source {src}: {e}", file=sys.stderr)
            continue
        except Exception:  # noqa: BLE001 - a broken builder is reported, the sweep goes on
            print(f"builder {src} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        for name, m in built:
            if args.k in name:
                p = work / f"{name}.onnx"
                onnx.save(m, p)
                models.append((name, p))
    problems: list[str] = []
    refusals: list[str] = []
    rows = []
    hdr = f"{'model':28} {'compile':>7} {'nodes':>11} {'max diff':>9} {'secs':>6} {'io':>4}  insert full / rank:4 / branch / vector-all (+nodes, fold ==)"
    print(hdr)
    print("-" * len(hdr))
    for name, p in models:
        row = sweep_one(name, p, work, args.timeout, problems, refusals)
        rows.append(row)
        d = row.get("diff")
        ds = "-" if d is None else (d if isinstance(d, str) else f"{d:.1e}")
        print(f"{row['model']:28} {row['compile']!s:>7} {row.get('nodes', '-'):>11} {ds:>9} {row['secs']:6.1f} "
              f"{row.get('io', '-'):>4}  {row['full']} / {row['rank4']} / {row['branch']} / {row['all']}", flush=True)
    print()
    print(f"{len(models)} models, {len(problems)} problems, {len(refusals)} documented refusals (exit 2)")
    for p in problems:
        print("  " + p)
    if refusals:
        print("refusals:")
        for p in sorted({r.split(": ", 1)[0] + ": " + r.rsplit("exit 2: ", 1)[-1][:160] for r in refusals}):
            print("  " + p)
    if tmp:
        tmp.cleanup()
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
