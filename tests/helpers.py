"""The one shared numerical check: two models must agree on ONNX Runtime.
Imports passes/ at most (never beats_compiler), so the pass tests stay
independent of the driver."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimize: bool = False) -> list:
    return session(model, optimize).run(None, dict(feeds))


# ORT input type -> numpy dtype, for the inputs made up when a test gives none.
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_, "tensor(string)": np.str_,
}


def random_feeds(sess: ort.InferenceSession, sizes=(2, 3, 4, 5), seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``sess``: its symbolic dims bound to ``sizes`` in order of first
    appearance (the last size repeats; every unnamed dim is a dim of its own),
    floats ~ N(0, 1), integers in 0..3, random bools, strings "a" (the same
    values as the driver's generator makes for a graph it knows nothing of)."""
    keys: dict[str, None] = {}
    shapes = []
    unnamed = 0
    for a in sess.get_inputs():
        ks = []
        for d in a.shape:
            if isinstance(d, int) and d >= 0:
                ks.append(d)
                continue
            key = d if isinstance(d, str) and d else f"?{unnamed}"
            unnamed += 0 if isinstance(d, str) and d else 1
            keys.setdefault(key, None)
            ks.append(key)
        shapes.append(ks)
    bound = {k: sizes[min(i, len(sizes) - 1)] for i, k in enumerate(keys)}
    rng = np.random.default_rng(seed)
    feeds = {}
    for a, ks in zip(sess.get_inputs(), shapes):
        if a.type not in _ORT_TYPES:
            raise ValueError(f"input {a.name!r} has type {a.type}; give the test's feeds")
        dt = np.dtype(_ORT_TYPES[a.type])
        shape = tuple(bound[k] if isinstance(k, str) else k for k in ks)
        if dt.kind in "US":
            feeds[a.name] = np.full(shape, "a", dtype=object)
        elif dt.kind == "f":
            feeds[a.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[a.name] = rng.integers(0, 4, size=shape).astype(dt)
        else:
            feeds[a.name] = rng.integers(0, 2, size=shape).astype(bool)
    return feeds


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
        feeds = random_feeds(s0, (2, 3, 4, 5), seed)
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
