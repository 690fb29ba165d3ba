"""Issue 13: whole-model gradients of the trainables on one batch agree with
torch autograd on the PyTorch module the ONNX came from.

For each model (all-MiniLM-L6-v2 with a classification head, the small CNN,
torchvision's MobileNetV3-small):

    torch module -> export (TorchScript, opset 17) -> beats-compile insert --config
    -> random non-zero D/V (A/B) for every trainable (V = 0 at insertion would
       make half the gradients trivially comparable)
    -> the train step of the gradient pass (``passes.train_step``, SGD), with
       each trainable's gradient tensor added as an output, run on ONNX Runtime
       CPU in float32
    -> the same in torch (float64): the module with every selected weight
       replaced (``torch.func.functional_call``) by W + delta, delta built from
       the same D/V values by the reparameterization's own formula
       (``passes.reparam.delta``, transcribed), mean cross-entropy, autograd.

Which torch weight an ONNX weight came from is found by value: the exporter
keeps a Linear weight as is (Gemm, transB=1) or transposed (MatMul), keeps a
Conv weight as is, or folds the following BatchNorm into it (eval mode:
``W0 = W * s`` per output channel, ``s = gamma / sqrt(var + eps)``).  In the
last case the torch weight becomes ``W + delta / s``, so that the folded
weight is ``W0 + delta`` exactly as in the ONNX graph.

Checked per trainable: max|g_onnx - g_torch| / max|g_torch| <= 1e-3, the
gradient is non-trivial, every trainable is covered and every Linear/Conv
module of the torch model is reparameterized.  The forward (logits, loss) is
checked first, so a mismatch of the setup is not blamed on the gradients.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from beats_compiler.cli import main
from beats_compiler.reparam import manifest_path, trainable_manifest
from fixtures import training_sets as ts
from passes import reparam as rp
from passes.convert import to_graph, to_model
from passes.train_step import LOSS, LR, NEXT, STEP, LossSpec, OptimizerSpec, build_train_step

pytestmark = [pytest.mark.slow, pytest.mark.exporters]

GRAD_RTOL = 1e-3  # the acceptance bound, per tensor, relative to the tensor's largest |gradient|
FORWARD_RTOL = 1e-4  # logits / loss, float32 ORT vs float64 torch
LABEL = "labels"


# --------------------------------------------------------------------------- ONNX side


def _insert(capsys, model: Path, policy: dict, out: Path) -> onnx.ModelProto:
    cfg = out.with_name(out.stem + ".policy.json")
    cfg.write_text(json.dumps(policy))
    capsys.readouterr()
    try:
        code = main(["insert", str(model), "-o", str(out), "--config", str(cfg), "-q"])
    except SystemExit as exc:
        code = exc.code
    o, e = capsys.readouterr()
    assert code == 0, (code, o[-2000:], e[-2000:])
    m = onnx.load(str(out))
    assert json.loads(manifest_path(out).read_text()) == trainable_manifest(m)
    return m


def _records(model: onnx.ModelProto) -> list[rp.Record]:
    text = next(e.value for e in model.metadata_props if e.key == rp.RECORD_KEY)
    return rp.load_records(text)


def _random_values(rec: rp.Record, w0: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Non-zero D and V (or A, B) with |delta| about a tenth of W0's spread."""
    shp = rp.shapes_for(rec.shape, rec.axis, rec.factorization, rec.rank)
    scale = 0.1 * float(np.std(w0)) or 0.01
    vals = {rec.D: 1.0 + 0.5 * rng.standard_normal(shp["D"])}
    if rec.V:
        vals[rec.V] = scale * rng.standard_normal(shp["V"])
    else:
        inn = shp["A"][0]
        vals[rec.A] = rng.standard_normal(shp["A"]) / math.sqrt(inn)
        vals[rec.B] = scale * math.sqrt(inn / rec.rank) * rng.standard_normal(shp["B"])
    return {k: v.astype(np.float32) for k, v in vals.items()}


def _grad_tensor(train, param: str):
    """The gradient that the SGD update of ``param`` reads: <p>.next = Identity(Sub(p, Mul(grad, lr)))."""
    nxt = train.tensors()[param + NEXT]
    ident = nxt.inputs[0]
    sub = ident.inputs[0].inputs[0]
    mul = sub.inputs[1].inputs[0]
    assert (ident.op, sub.op, mul.op) == ("Identity", "Sub", "Mul"), (param, ident.op, sub.op, mul.op)
    assert sub.inputs[0].name == param and mul.inputs[1].name == LR, param
    return mul.inputs[0]


def _onnx_run(model: onnx.ModelProto, trainable: list[str], values: dict[str, np.ndarray],
              feeds: dict[str, np.ndarray], labels: np.ndarray) -> tuple[dict[str, np.ndarray], float, np.ndarray]:
    """(gradients by trainable, loss, logits) from the gradient pass's train step and eval graphs on ORT."""
    graph, env = to_graph(model)
    step = build_train_step(graph, trainable, LossSpec("ce", "logits", LABEL), OptimizerSpec("sgd"))
    assert not step.unreached, step.unreached
    assert all(not s for s in step.state.values())  # plain SGD: no optimizer state inputs
    grads = {p: _grad_tensor(step.train, p) for p in trainable}
    tensors = step.train.tensors()
    for p, g in grads.items():
        g.dtype, g.shape = np.float32, list(tensors[p].shape)
    step.train.outputs = step.train.outputs + [grads[p] for p in trainable]
    train_m, eval_m = to_model(step.train, env), to_model(step.eval, env)
    lr = np.array(0.5, np.float32)
    run_feeds = {**feeds, LABEL: labels, **values}
    sess = ort.InferenceSession(train_m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [LOSS] + [p + NEXT for p in trainable] + [grads[p].name for p in trainable]
    out = sess.run(names, {**run_feeds, LR: lr, STEP: np.array(1.0, np.float32)})
    n = len(trainable)
    loss, nexts, gvals = out[0], out[1:1 + n], out[1 + n:]
    for p, nx, g in zip(trainable, nexts, gvals):  # the update the train step outputs uses that gradient
        np.testing.assert_allclose(nx, values[p] - lr * g, rtol=1e-6, atol=1e-6 * float(np.abs(values[p]).max()))
    ev = ort.InferenceSession(eval_m.SerializeToString(), providers=["CPUExecutionProvider"])
    ev_loss, logits = ev.run([LOSS, "logits"], run_feeds)
    np.testing.assert_allclose(ev_loss, loss, rtol=1e-5)
    return dict(zip(trainable, gvals)), float(loss), logits


# --------------------------------------------------------------------------- torch side


def _torch_sites(module) -> dict[str, tuple[object, object]]:
    """Every Linear / Conv2d by name, with the per-channel scale of the
    BatchNorm2d that follows it in a Sequential (None when there is none)."""
    import torch
    from torch import nn

    sites = {}
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            sites[name] = (m, None)
    for name, m in module.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for (n1, a), (_, b) in zip(kids, kids[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    s = (b.weight / torch.sqrt(b.running_var + b.eps)).detach().double()
                    sites[f"{name}.{n1}" if name else n1] = (a, s)
    return sites


def _match(rec: rp.Record, w0: np.ndarray, sites: dict) -> tuple[str, str]:
    """(torch module name, how) for the ONNX weight ``w0``: ``same`` (stored as
    is), ``T`` (transposed: MatMul) or ``bn`` (BatchNorm folded in)."""
    hits = []
    for name, (m, s) in sites.items():
        w = m.weight.detach().float().numpy()
        if w.shape == w0.shape and np.array_equal(w, w0):
            hits.append((name, "same"))
        elif w.ndim == 2 and w.T.shape == w0.shape and np.array_equal(w.T, w0):
            hits.append((name, "T"))
        elif s is not None and w.shape == w0.shape:
            folded = w.astype(np.float64) * s.numpy().reshape(-1, *[1] * (w.ndim - 1))
            if np.allclose(folded, w0, rtol=1e-5, atol=1e-6 * float(np.abs(w0).max())):
                hits.append((name, "bn"))
    assert len(hits) == 1, f"{rec.weight}: {len(hits)} torch weights match: {hits}"
    return hits[0]


def _delta_torch(rec: rp.Record, t: dict):
    """``passes.reparam.delta`` in torch (differentiable): D (.) V in the weight's ONNX layout."""
    import torch

    shape = list(rec.shape)
    d = t[rec.D]
    if rec.factorization == "full":
        return d * t[rec.V]
    bshape = [1] * len(shape)
    bshape[rec.axis] = shape[rec.axis]
    if rec.factorization == "vector":
        return d.reshape(bshape) * t[rec.V]
    mat = (t[rec.A] @ t[rec.B]) * d
    rest = [s for i, s in enumerate(shape) if i != rec.axis]
    return torch.movedim(mat.reshape(rest + [shape[rec.axis]]), -1, rec.axis)


def _torch_run(module, records, matches, values, args, labels):
    """(gradients by trainable, loss, logits) of the reparameterized module in float64."""
    import torch
    from torch.func import functional_call

    m64 = copy.deepcopy(module).double().eval().requires_grad_(False)  # only D/V (A/B) are leaves
    sites = _torch_sites(m64)
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}
    weights = {}
    for rec in records:
        name, how = matches[rec.weight]
        mod, s = sites[name]
        dlt = _delta_torch(rec, leaves)
        np.testing.assert_allclose(dlt.detach().numpy(), rp.delta(rec, values), rtol=1e-12, atol=1e-15)
        if how == "T":
            dlt = dlt.T
        elif how == "bn":
            dlt = dlt / s.reshape(-1, *[1] * (dlt.dim() - 1))
        weights[f"{name}.weight" if name else "weight"] = mod.weight + dlt
    targs = tuple(torch.from_numpy(a).double() if a.dtype.kind == "f" else torch.from_numpy(a) for a in args)
    logits = functional_call(m64, weights, targs)
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    grads = torch.autograd.grad(loss, [leaves[k] for k in values])
    return {k: g.numpy() for k, g in zip(values, grads)}, float(loss.detach()), logits.detach().numpy()


# --------------------------------------------------------------------------- the check


def _parity(capsys, tmp: Path, module, exported: Path, policy: dict, feeds: dict[str, np.ndarray],
            labels: np.ndarray, *, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    inserted = _insert(capsys, exported, policy, tmp / "inserted.onnx")
    manifest = trainable_manifest(inserted)
    records = _records(inserted)
    trainable = manifest["trainable"]
    assert trainable and sorted(trainable) == sorted(n for r in records for n in r.trainable)
    inits = {t.name: t for t in inserted.graph.initializer}
    sites = _torch_sites(module)
    rng = np.random.default_rng(seed)
    values, matches = {}, {}
    for rec in records:
        w0 = onnx.numpy_helper.to_array(inits[rec.weight])
        for n in (rec.V, rec.B):  # as inserted: the function unchanged
            if n:
                assert not onnx.numpy_helper.to_array(inits[n]).any(), n
        matches[rec.weight] = _match(rec, w0, sites)
        values.update(_random_values(rec, w0, rng))
    # every Linear / Conv of the torch module is reparameterized, each once
    assert sorted(m for m, _ in matches.values()) == sorted(sites), set(sites) ^ {m for m, _ in matches.values()}
    t1 = time.perf_counter()
    g_onnx, loss_onnx, logits_onnx = _onnx_run(inserted, trainable, values, feeds, labels)
    t2 = time.perf_counter()
    g_torch, loss_torch, logits_torch = _torch_run(module, records, matches, values, tuple(feeds.values()), labels)
    t3 = time.perf_counter()
    # the forward first: same function, same D/V
    scale = float(np.abs(logits_torch).max())
    assert np.abs(logits_onnx - logits_torch).max() <= FORWARD_RTOL * scale, (logits_onnx, logits_torch)
    assert abs(loss_onnx - loss_torch) <= FORWARD_RTOL * abs(loss_torch), (loss_onnx, loss_torch)
    assert set(g_onnx) == set(g_torch) == set(trainable)
    errors, bad = {}, []
    for p in trainable:
        go, gt = g_onnx[p].astype(np.float64), g_torch[p]
        assert go.shape == gt.shape, (p, go.shape, gt.shape)
        ref = float(np.abs(gt).max())
        assert ref > 1e-12 and np.isfinite(go).all() and np.abs(go).max() > 0, f"{p}: trivial gradient ({ref})"
        errors[p] = float(np.abs(go - gt).max()) / ref
        if errors[p] > GRAD_RTOL:
            bad.append(p)
    worst = max(errors, key=errors.get)
    report = {"trainables": len(trainable), "weights": len(records), "max_rel_err": errors[worst], "worst": worst,
              "loss": loss_torch, "logits_rel_err": float(np.abs(logits_onnx - logits_torch).max()) / scale,
              "seconds": {"insert+match": round(t1 - t0, 1), "onnx": round(t2 - t1, 1), "torch": round(t3 - t2, 1)}}
    print(json.dumps(report))
    assert not bad, "gradients off by more than {}: {}".format(
        GRAD_RTOL, ", ".join(f"{p} ({errors[p]:.2e}, {matches.get(_weight_of(records, p))})" for p in bad))
    return report


def _weight_of(records, name: str) -> str | None:
    return next((r.weight for r in records if name in r.trainable), None)


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    module = ts.minilm_classifier()
    path = tmp_path_factory.mktemp("minilm") / "model.onnx"
    ts.export_minilm_classifier(path, model=module)
    sents, labels = ts.make_sentences(1, "train", seed=0)  # one sentence per class: batch 4
    feeds = ts.tokenize(sents, seq_len=16)
    assert (feeds["attention_mask"] == 0).any(), "want some padding in the batch"
    return module, path, feeds, labels


# Every layout the reparameterization has, on MatMul and Gemm: rank:R branch
# (the policy the MiniLM flow trains with), and full / vector / rank:R weight.
_MINILM_WEIGHT_LAYOUTS = {"rules": [{"ops": ["Gemm"], "min_size": 0, "factorization": "vector"},
                                    {"ops": ["MatMul"], "min_size": 500000, "factorization": "full"},  # FFN
                                    {"ops": ["MatMul"], "factorization": "rank:8"}], "seed": 0}  # attention


@pytest.mark.parametrize("policy", [ts.minilm_policy(8, "branch"), _MINILM_WEIGHT_LAYOUTS],
                         ids=["rank8-branch", "full-vector-rank8-weight"])
def test_minilm_gradients_match_torch(capsys, tmp_path, minilm, policy):
    module, path, feeds, labels = minilm
    report = _parity(capsys, tmp_path, module, path, policy, feeds, labels)
    assert report["weights"] == 37  # 36 encoder Linears (MatMul) + the head (Gemm)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    module = ts.pretrained_cnn()
    path = tmp_path_factory.mktemp("cnn") / "model.onnx"
    ts.export_cnn(path, model=module)
    x, y = ts.make_images(2, seed=5)  # batch 8
    return module, path, {"input": x}, y


# cnn_policy(4), and one with full and vector factorizations on Conv and a branch on the Gemm.
_CNN_MIXED = {"rules": [{"ops": ["Conv"], "include": ["features.0.*"], "min_size": 0, "factorization": "full"},
                        {"ops": ["Conv"], "include": ["features.2.*"], "min_size": 0, "factorization": "vector"},
                        {"ops": ["Conv"], "min_size": 0, "factorization": "rank:2"},
                        {"ops": ["Gemm"], "min_size": 0, "factorization": "rank:2", "layout": "branch"}], "seed": 1}


@pytest.mark.parametrize("policy", [ts.cnn_policy(4), _CNN_MIXED], ids=["cnn_policy4", "full-vector-rank-branch"])
def test_cnn_gradients_match_torch(capsys, tmp_path, cnn, policy):
    module, path, feeds, labels = cnn
    report = _parity(capsys, tmp_path, module, path, policy, feeds, labels)
    assert report["weights"] == 5


def test_mobilenet_v3_small_gradients_match_torch(capsys, tmp_path):
    from fixtures.torchvision_models import export_mobilenet_v3_small, mobilenet_v3_small_module

    size = 64  # down to 2x2 at the last blocks: every pooling still averages several positions
    module = mobilenet_v3_small_module(seed=0, num_classes=4)
    path = export_mobilenet_v3_small(tmp_path / "model.onnx", seed=0, num_classes=4, image_size=size)
    x, y = ts.make_images(1, seed=7, size=size)  # batch 4
    report = _parity(capsys, tmp_path, module, Path(path), ts.cnn_policy(4), {"input": x}, y)
    assert report["weights"] == 54  # 52 Conv (BatchNorm folded into 34 of them) + 2 Gemm
