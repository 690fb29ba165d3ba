"""Measure ONNX reverse-mode autodiff engines on beats-compile's model families.

    PY=/path/to/python-with-onnx_ad-and-onnxsim
    $PY bench/gradient_engines.py WORK [--project-python .venv/bin/python] [--models minilm,cnn,mnv3]
        [--engines onnx-ad,onnxsim,beats]

Engines: ``onnx_ad.reverse`` (onnx-ad 0.3.0), ``onnxsim.graph_grad.build_backward``
(onnxsim 0.8.1) and ``beats``, this repository's gradient pass (``passes.gradient.build_gradient``
on the ``passes.convert.to_graph`` graph, as ``tests/passes/gradient/harness.py`` uses it).
Models (built with the project's own scripts through ``--project-python``, which needs
torch/transformers; this interpreter only needs onnx, onnxruntime, numpy, onnx-ad and
onnxsim, plus the project's own dependencies -- onnx-graphsurgeon, networkx -- for ``beats``;
e.g. ``PYTHONPATH=/tmp/adpkg .venv/bin/python`` with onnx-ad installed into /tmp/adpkg):

* ``minilm``: ``python -m fixtures.training_sets WORK --task minilm`` + ``beats-compile insert``
* ``cnn``:    the same with ``--task cnn``
* ``mnv3``:   ``tests/targets/vision_models.mobilenet_v3_small(num_classes=4)`` at 64x64,
  exported with ``vision_models.export`` and inserted with the cnn policy.

For each inserted model the trainable initializers (``inserted.trainable.json``) become graph
inputs and a scalar loss is appended: ``loss = -ReduceMean(GatherElements(LogSoftmax(logits),
labels))`` (cross-entropy, int64 ``labels[batch]``).  Then per library:

a) ops on the trainables->loss path without a rule (and the error text of the attempt);
   for onnxsim the missing rules are then supplied with ``register_gradient`` (the rules in
   ``EXTRA_ONNXSIM_RULES`` below) so the other columns can still be measured;
b) exactness against central finite differences of the float64-cast forward model, on random
   coordinates and one random direction (and, for mnv3, dL/dimage against torch autograd
   in float64); for the engines that can differentiate the float64-cast model (onnx-ad,
   beats) also that float64 derivative model;
c) nodes added, op histogram;
d) ORT CPU forward+backward step time (2 threads, median of 20, batch 16, MiniLM seq 32);
e) whether batch/seq stay symbolic, and a run + directional check at a second shape;
f) generation time.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
RUNS = 20
BATCH = 16
SEQ = 32
CHECK_BATCH = 4          # exactness (b)
SECOND = (5, 17)         # (batch, seq) of the second-shape run (e)
N_COORDS = 6
FD_EPS = 1e-6            # float64 central differences
SEED = 0


# --------------------------------------------------------------------------- models
def build_models(work: Path, py: str, names: list[str]) -> None:
    """Build the inserted models with the project's own scripts (cached)."""
    beats = str(Path(py).parent / "beats-compile")
    for name in names:
        d = work / name
        if (d / "inserted.onnx").exists():
            continue
        if name in ("minilm", "cnn"):
            subprocess.run([py, "-m", "fixtures.training_sets", str(work), "--task", name], cwd=ROOT, check=True)
        else:
            d.mkdir(parents=True, exist_ok=True)
            code = ("import onnx, torch, sys; from tests.targets import vision_models as vm;"
                    "m = vm.mobilenet_v3_small(num_classes=4);"
                    "onnx.save(vm.export(m, size=64), sys.argv[1] + '/model.onnx');"
                    "torch.save(m.state_dict(), sys.argv[1] + '/torch_state.pt')")
            subprocess.run([py, "-c", code, str(d)], cwd=ROOT, check=True)
            (d / "policy.json").write_text(json.dumps({"rules": [
                {"ops": ["Gemm"], "min_size": 0, "factorization": "full"},
                {"ops": ["Conv"], "min_size": 0, "factorization": "rank:4"}], "seed": 0}))
        subprocess.run([beats, "insert", str(d / "model.onnx"), "-o", str(d / "inserted.onnx"),
                        "--config", str(d / "policy.json"), "-q"], cwd=ROOT, check=True)


def training_model(path: Path, reduction: str = "mean", static: dict | None = None):
    """Trainables as graph inputs, plus a scalar cross-entropy output ``loss``.

    ``reduction``: "mean" (ReduceMean over the batch) or "sumdiv" (ReduceSum divided by the
    batch size read at run time).  ``static``: {dim_param: size} to pin symbolic input dims."""
    model = onnx.load(str(path))
    trainable = json.loads(path.with_name(path.name[:-5] + ".trainable.json").read_text())["trainable"]
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    keep = [t for t in g.initializer if t.name not in set(trainable)]
    for name in trainable:
        t = inits[name]
        g.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    del g.initializer[:]
    g.initializer.extend(keep)
    batch = g.output[0].type.tensor_type.shape.dim[0]
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, [batch.dim_param or batch.dim_value])
    g.input.append(labels)
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "loss_axis1"))
    g.node.extend([
        helper.make_node("LogSoftmax", ["logits"], ["loss_logp"], axis=1),
        helper.make_node("Unsqueeze", ["labels", "loss_axis1"], ["loss_labels2"]),
        helper.make_node("GatherElements", ["loss_logp", "loss_labels2"], ["loss_picked"], axis=1),
        helper.make_node("Neg", ["loss_mean"], ["loss"]),
    ])
    if reduction == "mean":
        g.node.insert(len(g.node) - 1, helper.make_node("ReduceMean", ["loss_picked"], ["loss_mean"], keepdims=0))
    else:
        g.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "loss_axis0"))
        tail = [helper.make_node("ReduceSum", ["loss_picked"], ["loss_sum"], keepdims=0),
                helper.make_node("Shape", ["labels"], ["loss_shape"]),
                helper.make_node("Gather", ["loss_shape", "loss_axis0"], ["loss_n64"], axis=0),
                helper.make_node("Cast", ["loss_n64"], ["loss_n"], to=TensorProto.FLOAT),
                helper.make_node("Div", ["loss_sum", "loss_n"], ["loss_mean"])]
        for n in tail:
            g.node.insert(len(g.node) - 1, n)
    if static:
        for v in g.input:
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param in static:
                    d.dim_value = static[d.dim_param]
        for v in g.output:
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param in static:
                    d.dim_value = static[d.dim_param]
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return model, trainable


FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def path_nodes(model: onnx.ModelProto, sources: list[str], sink: str) -> list[onnx.NodeProto]:
    """The nodes on a differentiable path from any of ``sources`` to ``sink``, in graph
    order: a node's outputs carry the dependence on only if they are floating point (a
    ``Shape``/``Gather``/``Concat`` chain that reads an activation's shape does not)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    live = set(sources)
    down = []
    for n in model.graph.node:
        if n.op_type not in ("Shape", "Size") and any(i in live for i in n.input):
            floats = [o for o in n.output if dtype.get(o, TensorProto.FLOAT) in FLOATS]
            live.update(floats)
            if floats:
                down.append(n)
    need = {sink}
    path = []
    for n in reversed(down):
        if any(o in need for o in n.output):
            need.update(i for i in n.input if i in live)
            path.append(n)
    return path[::-1]


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """float32 -> float64 everywhere (initializers, I/O, Cast/Constant/ConstantOfShape)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    del g.value_info[:]
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return m


# --------------------------------------------------------------------------- onnxsim extra rules
def _rule_logsoftmax(ctx, node, g):
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    b = ctx.b
    s = b.op("ReduceSum", [g, ctx.int64_const([axis])], keepdims=1)
    return [b.sub(g, b.mul(b.op("Exp", [node.output[0]]), s))]


def _rule_gather_elements(ctx, node, g):
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    b = ctx.b
    zeros = b.mul(node.input[0], b.const(0.0))
    return [b.op("ScatterElements", [zeros, node.input[1], g], axis=axis, reduction="add"), None]


def _rule_hardswish(ctx, node, g):
    b, x = ctx.b, node.input[0]
    mid = b.add(b.mul(x, b.const(1.0 / 3.0)), b.const(0.5))
    d = b.op("Where", [b.op("Less", [x, b.const(-3.0)]), b.const(0.0),
                       b.op("Where", [b.op("Greater", [x, b.const(3.0)]), b.const(1.0), mid])])
    return [b.mul(g, d)]


def _rule_hardsigmoid(ctx, node, g):
    alpha = next((a.f for a in node.attribute if a.name == "alpha"), 0.2)
    b, y = ctx.b, node.output[0]
    inside = b.op("And", [b.op("Greater", [y, b.const(0.0)]), b.op("Less", [y, b.const(1.0)])])
    return [b.mul(g, b.mul(b.op("Cast", [inside], to=TensorProto.FLOAT), b.const(alpha)))]


def _rule_flatten(ctx, node, g):
    return [ctx.b.op("Reshape", [g, ctx.b.op("Shape", [node.input[0]])])]


EXTRA_ONNXSIM_RULES = {"LogSoftmax": _rule_logsoftmax, "GatherElements": _rule_gather_elements,
                       "HardSwish": _rule_hardswish, "HardSigmoid": _rule_hardsigmoid,
                       "Flatten": _rule_flatten}


# --------------------------------------------------------------------------- engines
class Engine:
    name = ""
    float64 = False  # can differentiate the float64-cast model (the "f64" column)

    def rules(self) -> set[str]:
        raise NotImplementedError

    def build(self, model, wrt):
        """-> (model with outputs loss + one gradient per ``wrt``, {wrt: output name})"""
        raise NotImplementedError

    def feeds_extra(self, dtype=np.float32) -> dict:
        return {}


class OnnxAD(Engine):
    name = "onnx-ad 0.3.0"
    float64 = True

    def rules(self):
        from onnx_ad import rules
        return set(rules.REVERSE)

    def build(self, model, wrt):
        import onnx_ad
        out = onnx_ad.reverse(model, inputs=list(wrt), outputs=["loss"], layout="onnx")
        return out, {w: "adj_" + w for w in wrt}

    def feeds_extra(self, dtype=np.float32):
        return {"adj_loss": np.ones([1], dtype)}


class OnnxsimGraphGrad(Engine):
    name = "onnxsim 0.8.1 graph_grad"

    def __init__(self):
        from onnxsim import graph_grad
        self.gg = graph_grad
        self.registered = []

    def rules(self):
        """The stock rule set: without what this script (or anyone) registered."""
        return set(self.gg.supported_ops()) - set(self.gg._CUSTOM_RULES)

    def register_missing(self, ops):
        for op in sorted(ops):
            if op in EXTRA_ONNXSIM_RULES and op not in self.gg.supported_ops():
                self.gg.register_gradient(op, EXTRA_ONNXSIM_RULES[op])
                self.registered.append(op)

    def build(self, model, wrt):
        from onnxsim import qat_graph
        declared = {v.name: v for v in model.graph.input}
        gg = self.gg
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {}
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = v.type.tensor_type
            if t.HasField("shape"):
                shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                       for d in t.shape.dim)
        for t in model.graph.initializer:
            shapes[t.name] = tuple(t.dims)
        b = qat_graph.GraphBuilder(prefix="gg_")
        seed = b.const(1.0, "seed")
        nodes = path_nodes(model, list(wrt), "loss")
        grads = gg.build_backward(b, nodes, shapes, {"loss": seed}, list(wrt))
        out = onnx.ModelProto()
        out.CopyFrom(model)
        g = out.graph
        g.node.extend(b.nodes)
        g.initializer.extend(b.initializer)
        names = {}
        for w in wrt:
            names[w] = "grad_" + w
            g.node.append(helper.make_node("Identity", [grads[w]], [names[w]]))
            dims = [d.dim_value or d.dim_param for d in declared[w].type.tensor_type.shape.dim]
            g.output.append(helper.make_tensor_value_info(names[w], TensorProto.FLOAT, dims))
        if b.functions:
            out.functions.extend(b.functions)
            for dom in {f.domain for f in b.functions}:
                out.opset_import.append(helper.make_opsetid(dom, 1))
            out = onnx.inliner.inline_local_functions(out)
        return out, names


class BeatsGradient(Engine):
    """This repository's gradient pass, used as ``tests/passes/gradient/harness.py`` does."""

    name = "beats (passes/gradient)"
    float64 = True

    def __init__(self):
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from passes import convert, gradient
        self.convert, self.gradient = convert, gradient

    def rules(self):
        return set(self.gradient.RULES)

    def build(self, model, wrt):
        graph, env = self.convert.to_graph(model)
        res = self.gradient.build_gradient(graph, "loss", list(wrt))
        tensors = graph.tensors()
        names = {}
        for w in wrt:
            t = res.grads[w]
            t.dtype, t.shape = tensors[w].dtype, tensors[w].shape
            graph.outputs.append(t)
            names[w] = t.name
        return self.convert.to_model(graph, env), names


# --------------------------------------------------------------------------- running
def session(model: onnx.ModelProto, threads=THREADS):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def reference(model):
    """onnx's ReferenceEvaluator, with three ops replaced: onnx 1.23.2's GatherElements fails
    on MiniLM's (``cannot reshape array of size 1 into shape (1,32)``), its LayerNormalization
    computes the statistics in float32 (stash_type=1, the only one it implements) and its Erf
    rounds through float32 (``np.vectorize(erf, otypes=["f"])``); either puts float32 noise
    into float64 finite differences."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        def _run(self, data, indices, axis=None):
            axis = 0 if axis is None else axis
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[axis], indices), axis),)

    class LayerNormalization(OpRun):
        def _run(self, x, scale, bias=None, axis=None, epsilon=None, stash_type=None):
            axes = tuple(range(-1 if axis is None else axis, 0)) if (axis or -1) < 0 else \
                tuple(range(axis, x.ndim))
            mean = x.mean(axis=axes, keepdims=True)
            y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + (epsilon or 1e-5))
            y = y * scale
            return (y + bias if bias is not None else y,)

    class Erf(OpRun):
        def _run(self, x):
            import math
            return (np.vectorize(math.erf, otypes=[x.dtype])(x),)

    return ReferenceEvaluator(model, new_ops=[GatherElements, LayerNormalization, Erf])


class Forward64:
    """The float64 forward model; ORT if it has every float64 kernel, else onnx's reference."""

    def __init__(self, model):
        self.model = to_double(model)
        try:
            self.sess = session(self.model)
            self.runtime = "onnxruntime"
        except Exception as e:  # noqa: BLE001 -- a missing double kernel
            self.sess = reference(self.model)
            self.runtime = "onnx.reference (ORT: %s)" % str(e).splitlines()[0][:100]

    def loss(self, feeds):
        f = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
        if self.runtime == "onnxruntime":
            return float(self.sess.run(["loss"], f)[0])
        return float(self.sess.run(["loss"], f)[0])


def data(name: str, work: Path, batch: int, seq: int, rng) -> dict:
    if name == "mnv3":
        return {"image": rng.standard_normal((batch, 3, 64, 64)).astype(np.float32),
                "labels": rng.integers(0, 4, batch).astype(np.int64)}
    d = np.load(work / name / "train.npz")
    idx = rng.choice(len(d["labels"]), batch, replace=False)
    out = {}
    for k in d.files:
        a = d[k][idx]
        out[k] = a[:, :seq] if (name == "minilm" and a.ndim == 2) else a
    if name == "minilm":
        out["attention_mask"][:, 0] = 1
    return out


def initial_values(path: Path, wrt) -> dict:
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in set(wrt)}


def rel(a, b):
    den = max(abs(a), abs(b))
    return 0.0 if den < 1e-12 else abs(a - b) / den


def exactness(fwd64, grads, theta, feeds, rng):
    """Central differences of the float64 model on N_COORDS coordinates (half drawn
    uniformly, half at the largest |g| of a randomly drawn tensor) and along one random
    direction.  Coordinate error: |g - fd| / max(|g|, |fd|, 1e-3 * max|g| over all tensors),
    the floor keeping the FD noise (~1e-10 absolute) on ~zero entries from counting."""
    base = {**feeds, **theta}
    floor = 1e-3 * max(float(np.abs(g).max()) for g in grads.values())
    errs, coords = [], []
    keys = sorted(theta)
    for k in range(N_COORDS):
        w = keys[rng.integers(len(keys))]
        i = int(rng.integers(theta[w].size)) if k % 2 == 0 else int(np.abs(grads[w]).argmax())
        p, m = dict(base), dict(base)
        vp, vm = theta[w].astype(np.float64).ravel().copy(), theta[w].astype(np.float64).ravel().copy()
        vp[i] += FD_EPS
        vm[i] -= FD_EPS
        p[w], m[w] = vp.reshape(theta[w].shape), vm.reshape(theta[w].shape)
        fd = (fwd64.loss(p) - fwd64.loss(m)) / (2 * FD_EPS)
        an = float(grads[w].ravel()[i])
        errs.append(abs(an - fd) / max(abs(an), abs(fd), floor, 1e-30))
        coords.append((w, i, an, fd))
    return max(errs), coords, directional(fwd64, grads, theta, feeds, rng)


def directional(fwd64, grads, theta, feeds, rng):
    v = {w: rng.standard_normal(theta[w].shape) for w in theta}
    p = {**feeds, **{w: theta[w].astype(np.float64) + FD_EPS * v[w] for w in theta}}
    m = {**feeds, **{w: theta[w].astype(np.float64) - FD_EPS * v[w] for w in theta}}
    fd = (fwd64.loss(p) - fwd64.loss(m)) / (2 * FD_EPS)
    an = float(sum(np.sum(grads[w].astype(np.float64) * v[w]) for w in theta))
    return rel(an, fd), an, fd


def step_time(sess, feeds):
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(RUNS):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def symbolic_inputs(model):
    out = {}
    for v in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        if any(isinstance(d, str) and d for d in dims):
            out[v.name] = dims
    return out


def one_line(e: BaseException) -> str:
    """First line of the error, plus the ONNX node a rule was handling when it was raised."""
    s = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
    node, tb = None, e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals.get("node")
        if isinstance(local, onnx.NodeProto):
            node = local
        tb = tb.tb_next
    if node is not None and (node.name or node.output[0]) not in s:
        s += " [in %s %s]" % (node.op_type, node.name or node.output[0])
    return s[:260]


# --------------------------------------------------------------------------- torch reference
def torch_image_grad(py: str, work: Path, feeds) -> np.ndarray | None:
    """dL/dimage of the original torch MobileNetV3-small in float64 (project interpreter)."""
    d = work / "mnv3"
    np.savez(d / "torch_in.npz", **feeds)
    code = """
import sys, numpy as np, torch
from tests.targets import vision_models as vm
d = sys.argv[1]
m = vm.mobilenet_v3_small(num_classes=4); m.load_state_dict(torch.load(d + '/torch_state.pt')); m = m.double().eval()
f = np.load(d + '/torch_in.npz'); x = torch.tensor(f['image'], dtype=torch.float64, requires_grad=True)
loss = torch.nn.functional.cross_entropy(m(x), torch.tensor(f['labels'])); loss.backward()
np.save(d + '/torch_dx.npy', x.grad.numpy())
"""
    try:
        subprocess.run([py, "-c", code, str(d)], cwd=ROOT, check=True, capture_output=True)
    except Exception:  # noqa: BLE001
        return None
    return np.load(d / "torch_dx.npy")


# --------------------------------------------------------------------------- main
ATTEMPTS = [  # (label, loss reduction, static dims): tried in order until one builds
    ("dynamic", "mean", None),
    ("dynamic, ReduceSum/N loss", "sumdiv", None),
    ("static batch=%d seq=%d" % (BATCH, SEQ), "mean", {"batch": BATCH, "seq": SEQ}),
    ("static, then onnxsim.simplify", "mean", {"batch": BATCH, "seq": SEQ}),
]


def simplified(model):
    import onnxsim
    out, ok = onnxsim.simplify(model)
    return out


def measure(name, work, engine, py, report):
    path = work / name / "inserted.onnx"
    row = {"model": name, "engine": engine.name, "attempts": []}
    for label, reduction, static in ATTEMPTS:
        model, wrt = training_model(path, reduction, static)
        if label.endswith("onnxsim.simplify"):
            try:
                model = simplified(model)
            except Exception as e:  # noqa: BLE001
                row["attempts"].append("%s: %s" % (label, one_line(e)))
                continue
        nodes = path_nodes(model, wrt, "loss")
        path_ops = collections.Counter(n.op_type for n in nodes)
        row.setdefault("path_ops", dict(path_ops))
        missing = sorted(set(path_ops) - engine.rules())
        row.setdefault("missing", missing)
        if isinstance(engine, OnnxsimGraphGrad) and missing:
            engine.register_missing(missing)  # so the remaining columns can be measured
            row["registered"] = sorted(set(missing) & set(engine.gg.supported_ops()))
        t = time.perf_counter()
        try:
            bwd, names = engine.build(model, wrt)
        except Exception as e:  # noqa: BLE001
            row["attempts"].append("%s: %s" % (label, one_line(e)))
            continue
        row["gen_s"] = time.perf_counter() - t
        row["config"] = label
        break
    else:
        return row
    theta = initial_values(path, wrt)
    row["trainables"], row["trainable_params"] = len(wrt), int(sum(v.size for v in theta.values()))
    row["nodes_fwd"] = len(model.graph.node)
    row["nodes_added"] = len(bwd.graph.node) - len(model.graph.node)
    added = collections.Counter(n.op_type for n in bwd.graph.node) - collections.Counter(
        n.op_type for n in model.graph.node)
    row["hist"] = added.most_common(10)
    row["symbolic_inputs"] = {k: v for k, v in symbolic_inputs(bwd).items() if k not in theta}
    try:
        onnx.checker.check_model(bwd)
        row["checker"] = "ok"
    except Exception as e:  # noqa: BLE001
        row["checker"] = one_line(e)
    try:
        t = time.perf_counter()
        sess = session(bwd)
        row["session_s"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001
        row["ort_error"] = one_line(e)
        return row
    key = (name, row["config"])
    if ("fwd64",) + key not in report:
        report[("fwd64",) + key] = Forward64(model)
    fwd64 = report[("fwd64",) + key]
    row["fd_runtime"] = fwd64.runtime
    extra = engine.feeds_extra()
    check_batch = BATCH if static else CHECK_BATCH
    # (b) exactness
    feeds = data(name, work, check_batch, SEQ, np.random.default_rng(SEED))
    try:
        out = sess.run(list(names.values()), {**feeds, **theta, **extra})
        grads = {w: o.reshape(theta[w].shape) for w, o in zip(names, out)}
        row["coord_err"], row["coords"], row["dir"] = exactness(
            fwd64, grads, theta, feeds, np.random.default_rng(SEED))
    except Exception as e:  # noqa: BLE001
        row["run_error_b"] = one_line(e)
    # (d) step time at batch 16, and the forward (with loss) alone for scale
    feeds16 = {**data(name, work, BATCH, SEQ, np.random.default_rng(SEED + 1)), **theta}
    try:
        row["step_ms"] = step_time(sess, {**feeds16, **extra})
        if ("fwd_ms",) + key not in report:
            report[("fwd_ms",) + key] = step_time(session(model), feeds16)
        row["fwd_ms"] = report[("fwd_ms",) + key]
    except Exception as e:  # noqa: BLE001
        row["run_error_d"] = one_line(e)
    # (e) a second shape, with a directional check of the gradient there
    b2, s2 = SECOND
    feeds2 = data(name, work, b2, s2, np.random.default_rng(SEED + 2))
    try:
        out = sess.run(list(names.values()), {**feeds2, **theta, **extra})
        grads2 = {w: o.reshape(theta[w].shape) for w, o in zip(names, out)}
        row["dir2"] = directional(fwd64, grads2, theta, feeds2, np.random.default_rng(SEED + 3))
    except Exception as e:  # noqa: BLE001
        row["run_error_e"] = one_line(e)
    # torch autograd: dL/dimage of MobileNetV3-small (float64 torch model)
    if name == "mnv3":
        ref = torch_image_grad(py, work, feeds)
        if ref is None:
            row["torch_error"] = "torch reference not computed (project interpreter)"
        else:
            try:
                bx, nx = engine.build(model, ["image"])
                dx = session(bx).run([nx["image"]], {**feeds, **theta, **extra})[0].reshape(ref.shape)
                row["torch_dx_err"] = float(np.abs(dx - ref).max() / np.abs(ref).max())
            except Exception as e:  # noqa: BLE001
                row["torch_error"] = one_line(e)
    # float64 derivative model (not onnxsim: its GraphBuilder emits float32 constants)
    if engine.float64:
        try:
            b64, n64 = engine.build(to_double(model), wrt)
            try:
                sess64, row["rt64"] = session(b64), "onnxruntime"
            except Exception as e:  # noqa: BLE001
                sess64, row["rt64"] = reference(b64), "onnx.reference (ORT: %s)" % one_line(e)[:100]
            f64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in {**feeds, **theta}.items()}
            out = sess64.run(list(n64.values()), {**f64, **engine.feeds_extra(np.float64)})
            g64 = {w: np.asarray(o).reshape(theta[w].shape) for w, o in zip(n64, out)}
            row["coord_err64"], row["coords64"], row["dir64"] = exactness(
                fwd64, g64, theta, feeds, np.random.default_rng(SEED))
        except Exception as e:  # noqa: BLE001
            row["err64"] = one_line(e)
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows):
    lines = ["| model | engine | missing rules on path | failed attempts -> measured configuration | gen s | nodes added | "
             "coord max rel err (f32) | dir rel err (f32) | f64 coord / dir rel err | torch dL/dx rel err | "
             "fwd ms | fwd+bwd ms | symbolic dims kept | 2nd shape run (dir rel err) |",
             "|" + "---|" * 14]
    for r in rows:
        miss = ", ".join(r["missing"]) or "none"
        if r.get("registered"):
            miss += " (supplied via register_gradient)"
        err = "<br>".join(r["attempts"]) or "none"
        err += "<br>**measured: %s**" % r["config"] if "config" in r else "<br>**no attempt built**"
        f64 = "-"
        if "coord_err64" in r:
            f64 = "%.1e / %.1e" % (r["coord_err64"], r["dir64"][0])
        elif "err64" in r:
            f64 = "error: " + r["err64"]
        sym = "; ".join("%s%s" % (k, v) for k, v in r.get("symbolic_inputs", {}).items()) or "-"
        second = "-"
        if "dir2" in r:
            second = "ok (%.1e)" % r["dir2"][0]
        elif "run_error_e" in r:
            second = "error: " + r["run_error_e"]
        torch_ = fmt(r.get("torch_dx_err"), ".1e") if "torch_error" not in r else "error: " + r["torch_error"]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["model"], r["engine"], miss, err.replace("|", "/"), fmt(r.get("gen_s"), ".2f"),
            r.get("nodes_added", "-"), fmt(r.get("coord_err"), ".1e"),
            fmt(r["dir"][0] if "dir" in r else None, ".1e"), f64, torch_,
            fmt(r.get("fwd_ms"), ".1f"), fmt(r.get("step_ms"), ".1f") if "run_error_d" not in r
            else "error: " + r["run_error_d"], sym, second))
    lines.append("")
    lines.append("| model | engine | added-op histogram (top 10) |")
    lines.append("|---|---|---|")
    for r in rows:
        if "hist" in r:
            lines.append("| %s | %s | %s |" % (r["model"], r["engine"],
                                               ", ".join("%s %d" % kv for kv in r["hist"])))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--models", default="minilm,cnn,mnv3")
    ap.add_argument("--engines", default="onnx-ad,onnxsim,beats")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.models.split(",")
    build_models(args.work, args.project_python, names)
    engines = {"onnx-ad": OnnxAD, "onnxsim": OnnxsimGraphGrad, "beats": BeatsGradient}
    report, rows = {}, []
    for name in names:
        for e in args.engines.split(","):
            t = time.perf_counter()
            row = measure(name, args.work, engines[e](), args.project_python, report)
            row["total_s"] = time.perf_counter() - t
            rows.append(row)
            print("# done", name, e, "%.0fs" % row["total_s"], file=sys.stderr, flush=True)
    try:
        import onnx_ad
        ad_version = onnx_ad.__version__
    except ImportError:
        ad_version = "not installed"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        head = "?"
    print("python %s, onnx %s, onnxruntime %s, numpy %s, onnx-ad %s, beats-compile %s; %s, %d CPUs, loadavg %s" % (
        platform.python_version(), onnx.__version__, ort.__version__, np.__version__,
        ad_version, head, platform.machine(), os.cpu_count(), open("/proc/loadavg").read().strip()))
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
