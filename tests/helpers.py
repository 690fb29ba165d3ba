"""The one shared numerical check: two models must agree on ONNX Runtime."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from beats_compiler.inputs import generate_inputs


def session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimize: bool = False) -> list:
    return session(model, optimize).run(None, dict(feeds))


def assert_same_on_ort(
    original: onnx.ModelProto,
    result: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> list:
    """Run both models on ONNX Runtime (graph optimizations off, so ORT's own
    rewrites cannot hide ours) and assert every output matches; returns the
    original's outputs."""
    onnx.checker.check_model(result)
    s0 = session(original)
    if feeds is None:
        feeds = generate_inputs(s0, (2, 3, 4, 5), seed)
    want = s0.run(None, dict(feeds))
    got = session(result).run([o.name for o in s0.get_outputs()], dict(feeds))
    assert len(want) == len(got)
    for o, a, b in zip(s0.get_outputs(), want, got):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"{o.name}: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype, f"{o.name}: dtype {a.dtype} != {b.dtype}"
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=o.name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=o.name)
    return want


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, **kw) -> onnx.ModelProto:
    """A checked model from helper-made parts; initializers may be numpy arrays keyed by name."""
    inits = [numpy_helper.from_array(v, k) for k, v in dict(initializers).items()] if isinstance(initializers, dict) else list(initializers)
    g = helper.make_graph(nodes, "test", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)
    onnx.checker.check_model(m)
    return m


def vi(name: str, shape, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def apply(model: onnx.ModelProto, *passes) -> tuple[onnx.ModelProto, list]:
    """Run ``passes`` once each, in order, on a copy of ``model`` through the
    protobuf boundary; returns the exported model and each pass's result."""
    from passes import to_graph, to_model

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph, env = to_graph(copy)
    results = [p(graph) for p in passes]
    return to_model(graph, env), results


def init_names(model: onnx.ModelProto) -> list[str]:
    return sorted(t.name for t in model.graph.initializer)


def all_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the graph and of every subgraph (depth first)."""
    out: list[str] = []

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            out.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        walk(sub)

    walk(model.graph)
    return out


def f32(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
