"""One check for every gradient rule: float64 finite differences.

``check_gradient(build, feeds, wrt)``: ``build(elem_type)`` returns a forward
model (float64 or float32 throughout); its float outputs are contracted with
fixed random cotangents into a scalar loss, the gradient pass differentiates
that loss with respect to the graph inputs ``wrt``, and:

- in float64 (onnx's reference evaluator) the analytic gradient must match
  central finite differences of the loss at sampled coordinates;
- in float32 on ONNX Runtime (graph optimizations on, as training runs it)
  the same gradient graph must agree with the float64 one.

``more_feeds`` repeats both checks at other input shapes (symbolic dims must
stay symbolic: nothing of the first shapes is baked in).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from passes.convert import to_graph, to_model
from passes.gradient import build_gradient

COT = "cot__"
LOSS = "loss__"


def _float_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output
            if o.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)]


def with_loss(model: onnx.ModelProto, elem: int) -> onnx.ModelProto:
    """``model`` plus cotangent inputs and the scalar ``loss__`` = sum_i <out_i, cot_i>."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for o in g.output:
        o.CopyFrom(inferred[o.name])
    terms = []
    for i, name in enumerate(_float_outputs(model)):
        cot = f"{COT}{i}"
        t = inferred[name].type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
            if t.HasField("shape") else None
        g.input.append(helper.make_tensor_value_info(cot, elem, shape))
        g.node.append(helper.make_node("Mul", [name, cot], [f"{cot}_prod"]))
        g.node.append(helper.make_node("ReduceSum", [f"{cot}_prod"], [f"{cot}_sum"], keepdims=0))
        terms.append(f"{cot}_sum")
    g.node.append(helper.make_node("Sum", terms, [LOSS]))
    g.output.append(helper.make_tensor_value_info(LOSS, elem, []))
    return m


def gradient_model(model: onnx.ModelProto, wrt: Sequence[str]) -> tuple[onnx.ModelProto, list[str], int]:
    """Loss model + backward; outputs the loss and then one gradient per ``wrt``."""
    graph, env = to_graph(model)
    res = build_gradient(graph, LOSS, list(wrt))
    names = []
    for w in wrt:
        t = res.grads[w]
        t.dtype, t.shape = graph.tensors()[w].dtype, graph.tensors()[w].shape
        graph.outputs.append(t)
        names.append(t.name)
    out = to_model(graph, env)
    return out, names, res.nodes_added


def _cotangents(model64: onnx.ModelProto, feeds: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    outs = ReferenceEvaluator(model64).run(_float_outputs(model64), dict(feeds))
    rng = np.random.default_rng(seed)
    return {f"{COT}{i}": rng.standard_normal(np.shape(o)).astype(np.float64) for i, o in enumerate(outs)}


def check_gradient(
    build: Callable[[int], onnx.ModelProto],
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    *,
    more_feeds: Sequence[Mapping[str, np.ndarray]] = (),
    seed: int = 0,
    samples: int = 24,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    ort_rtol: float = 2e-3,
    check_ort: bool = True,
) -> dict[str, np.ndarray]:
    """Assert the gradient pass is exact on ``build``'s model; returns the float64 gradients."""
    m64 = build(TensorProto.DOUBLE)
    loss64 = with_loss(m64, TensorProto.DOUBLE)
    grad64, names, _ = gradient_model(loss64, wrt)
    onnx.checker.check_model(grad64)
    ref_loss = ReferenceEvaluator(loss64)
    ref_grad = ReferenceEvaluator(grad64)
    result = {}
    for k, f in enumerate([feeds, *more_feeds]):
        f64 = {n: (np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)) for n, v in f.items()}
        f64.update(_cotangents(m64, f64, seed + k))
        got = ref_grad.run(names, f64)
        rng = np.random.default_rng(seed + 100 + k)
        for w, gw in zip(wrt, got):
            x = f64[w]
            assert gw.shape == x.shape, f"d/d{w}: gradient shape {gw.shape} != input shape {x.shape}"
            flat = np.arange(x.size) if x.size <= samples else rng.choice(x.size, samples, replace=False)
            fd = np.empty(len(flat))
            for j, idx in enumerate(flat):
                xp, xm = x.copy(), x.copy()
                xp.flat[idx] += eps
                xm.flat[idx] -= eps
                lp = ref_loss.run([LOSS], {**f64, w: xp})[0]
                lm = ref_loss.run([LOSS], {**f64, w: xm})[0]
                fd[j] = (float(lp) - float(lm)) / (2 * eps)
            an = gw.reshape(-1)[flat]
            scale = max(1.0, float(np.max(np.abs(fd))))
            np.testing.assert_allclose(an, fd, rtol=rtol, atol=rtol * scale, err_msg=f"d loss / d {w} (feeds #{k})")
            result[w] = gw
        if check_ort:
            m32 = build(TensorProto.FLOAT)
            grad32, names32, _ = gradient_model(with_loss(m32, TensorProto.FLOAT), wrt)
            sess = ort.InferenceSession(grad32.SerializeToString(), providers=["CPUExecutionProvider"])
            f32 = {n: (v.astype(np.float32) if v.dtype.kind == "f" else v) for n, v in f64.items()}
            got32 = sess.run(names32, f32)
            for w, g32, g64 in zip(wrt, got32, got):
                scale = max(1e-6, float(np.max(np.abs(g64))))
                err = float(np.max(np.abs(g32.astype(np.float64) - g64))) / scale if g64.size else 0.0
                assert err <= ort_rtol, f"ORT float32 d/d{w} differs from float64 by {err:.3g} relative (feeds #{k})"
    return result


def ort_check(build: Callable[[int], onnx.ModelProto], feeds, wrt: Sequence[str], *, samples: int | None = 16,
              eps: float = 1e-6, check_f32: bool = True, seed: int = 1) -> None:
    """The checks of ``check_gradient`` with ONNX Runtime in float64 instead of onnx's
    reference evaluator, for forms the latter runs inexactly or not at all: central
    finite differences at ``samples`` coordinates (None: all) for each of ``feeds``
    (one mapping or a list), then float32 on ORT against float64 (``check_f32``)."""
    def session(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    m64 = build(TensorProto.DOUBLE)
    loss = with_loss(m64, TensorProto.DOUBLE)
    grad64, names, _ = gradient_model(loss, wrt)
    fwd, bwd = session(loss), session(grad64)
    if check_f32:
        grad32, names32, _ = gradient_model(with_loss(build(TensorProto.FLOAT), TensorProto.FLOAT), wrt)
        bwd32 = session(grad32)
    rng = np.random.default_rng(seed)
    for k, f in enumerate([feeds] if isinstance(feeds, Mapping) else feeds):
        f = {n: (np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)) for n, v in f.items()}
        ys = session(m64).run(None, {i.name: f[i.name] for i in m64.graph.input})
        f.update({f"{COT}{i}": rng.standard_normal(y.shape) for i, y in enumerate(ys) if y.dtype == np.float64})
        got = bwd.run(names, f)
        for w, gw in zip(wrt, got):
            x = f[w]
            assert gw.shape == x.shape, f"d/d{w}: gradient shape {gw.shape} != input shape {x.shape}"
            flat = np.arange(x.size) if samples is None or x.size <= samples else \
                rng.choice(x.size, samples, replace=False)
            fd = np.empty(len(flat))
            for j, idx in enumerate(flat):
                xp, xm = x.copy(), x.copy()
                xp.flat[idx] += eps
                xm.flat[idx] -= eps
                fd[j] = (float(fwd.run([LOSS], {**f, w: xp})[0]) - float(fwd.run([LOSS], {**f, w: xm})[0])) / (2 * eps)
            np.testing.assert_allclose(gw.reshape(-1)[flat], fd, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(fd).max()),
                                       err_msg=f"d loss / d {w} (feeds #{k})")
        if check_f32:
            got32 = bwd32.run(names32, {n: (v.astype(np.float32) if v.dtype.kind == "f" else v) for n, v in f.items()})
            for w, gw, g32 in zip(wrt, got, got32):
                err = np.abs(g32 - gw).max() / max(1e-6, np.abs(gw).max()) if gw.size else 0.0
                assert err <= 2e-3, f"ORT float32 d/d{w} differs from float64 by {err:.3g} relative (feeds #{k})"


def vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes, inputs, outputs, opset: int = 17, initializers=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "grad_test", inputs, outputs, list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def one_op(op: str, inputs: Sequence[tuple[str, tuple | None]], *, order: Sequence[str] | None = None,
           consts: Mapping[str, np.ndarray] | None = None, n_out: int = 1, opset: int = 17,
           **attrs) -> Callable[[int], onnx.ModelProto]:
    """A builder for a one-node model: ``inputs`` are (name, shape) float graph
    inputs (shape entries may be dim names); ``consts`` are further operands given
    as initializers (integer arrays keep their type, float ones take the model's);
    ``order`` is the node's input list when it is not inputs then consts ("" for
    an empty optional input)."""
    consts = dict(consts or {})

    def build(elem: int) -> onnx.ModelProto:
        np_t = np.float64 if elem == TensorProto.DOUBLE else np.float32
        ins = [vi(n, elem, list(s) if s is not None else None) for n, s in inputs]
        inits = [onnx.numpy_helper.from_array(np.asarray(v).astype(np_t) if np.asarray(v).dtype.kind == "f"
                                              else np.asarray(v), n) for n, v in consts.items()]
        node_inputs = list(order) if order is not None else [n for n, _ in inputs] + list(consts)
        outs = [f"y{i}" for i in range(n_out)]
        node = helper.make_node(op, node_inputs, outs, **attrs)
        return model([node], ins, [vi(o, elem, None) for o in outs], opset=opset, initializers=inits)

    return build
