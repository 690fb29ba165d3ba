"""dedupe_initializers looks at the first 64 KiB first (read from the file for
external data) and hashes in full only what still matches: same result."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes import DedupeInitializers, to_graph, to_model
from tests.helpers import assert_same_on_ort, vi


def _model():
    a = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)  # 256 KiB
    late = a.copy()
    late[-1, -1] += 1.0  # same first 64 KiB, different bytes later
    early = a.copy()
    early[0, 0] += 1.0
    inits = {"a": a, "same": a.copy(), "late": late, "early": early}
    nodes = [helper.make_node("Add", ["x", k], [f"y_{k}"]) for k in inits]
    g = helper.make_graph(nodes, "g", [vi("x", [64, 1024])], [vi(f"y_{k}", [64, 1024]) for k in inits],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _check(out, m):
    used = {n.input[1] for n in out.graph.node}
    assert used == {"a", "late", "early"}  # "same" merged into "a"; "late" and "early" kept
    assert_same_on_ort(m, out, {"x": np.ones((64, 1024), np.float32)}, rtol=0, atol=0)


def test_in_memory():
    m = _model()
    g, env = to_graph(m)
    res = DedupeInitializers()(g)
    assert res.stats["merged"] == 1
    _check(to_model(g, env), m)


def test_external_data(tmp_path):
    m = _model()
    onnx.save(_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    g, env = to_graph(lazy, tmp_path)
    res = DedupeInitializers()(g)
    assert res.stats["merged"] == 1
    from beats_compiler.io import save_model

    save_model(to_model(g, env), tmp_path / "out.onnx", base_dir=tmp_path)
    _check(onnx.load(tmp_path / "out.onnx"), m)
