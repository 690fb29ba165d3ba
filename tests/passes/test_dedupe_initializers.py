"""dedupe_initializers: identical constants become one.  It looks at the first
64 KiB first (read from the file for external data) and hashes in full only
what still matches: same result."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes import DedupeInitializers, to_graph, to_model
from tests.helpers import apply, assert_same_on_ort, f32, init_names, make_model, ops, vi

H = helper.make_node


def dedupe(m):
    out, (res,) = apply(m, DedupeInitializers())
    assert_same_on_ort(m, out)
    _, (res2,) = apply(out, DedupeInitializers())
    assert not res2.modified
    return out, res


def test_identical_initializers_merged():
    w = f32(3, 3)
    m = make_model([H("Add", ["x", "w1"], ["a"]), H("Mul", ["a", "w2"], ["b"]), H("Sub", ["b", "w3"], ["y"])],
                   [vi("x", [3, 3])], [vi("y", [3, 3])], {"w1": w, "w2": w.copy(), "w3": f32(3, 3, seed=9)})
    out, res = dedupe(m)
    assert init_names(out) == ["w1", "w3"]
    assert [list(n.input) for n in out.graph.node] == [["x", "w1"], ["a", "w1"], ["b", "w3"]]
    assert res.stats == {"merged": 1, "bytes_saved": 36}


def test_same_bytes_other_dtype_or_shape_kept():
    raw = np.arange(6, dtype=np.int32)
    m = make_model(
        [H("Cast", ["x"], ["xi"], to=TensorProto.INT32), H("Add", ["xi", "a"], ["p"]), H("Add", ["p", "b"], ["q"]),
         H("Cast", ["q"], ["qf"], to=TensorProto.FLOAT), H("Add", ["qf", "c"], ["y"])],
        [vi("x", [2, 3])], [vi("y", [2, 3])],
        {"a": raw.reshape(2, 3), "b": raw.reshape(1, 2, 3)[0:1].reshape(2, 3) + 0, "c": raw.view(np.float32).reshape(2, 3)})
    # a and b are equal (merged); c has the same bytes as a but another dtype.
    out, res = dedupe(m)
    assert init_names(out) == ["a", "c"] and res.stats["merged"] == 1
    m2 = make_model([H("Add", ["x", "a"], ["p"]), H("Add", ["p", "b"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])],
                    {"a": np.ones((1, 3), np.float32), "b": np.ones((3,), np.float32)})
    out, res = dedupe(m2)
    assert init_names(out) == ["a", "b"] and not res.modified


def test_nan_and_signed_zero():
    nan = np.array([np.nan, 1.0], np.float32)
    m = make_model([H("Add", ["x", "a"], ["p"]), H("Add", ["p", "b"], ["q"]), H("Mul", ["q", "z"], ["r"]),
                    H("Div", ["r", "nz"], ["y"])], [vi("x", [2])], [vi("y", [2])],
                   {"a": nan, "b": nan.copy(), "z": np.array([0.0, 1.0], np.float32),
                    "nz": np.array([-0.0, 1.0], np.float32)})
    out, res = dedupe(m)
    # NaN payloads that are bit-identical merge; 0.0 and -0.0 differ in bytes.
    assert init_names(out) == ["a", "nz", "z"] and res.stats["merged"] == 1


def test_graph_output_initializer_names_kept():
    w = f32(2)
    m = make_model([H("Add", ["x", "w1"], ["y"]), H("Identity", ["w2"], ["z"])], [vi("x", [2])],
                   [vi("y", [2]), vi("z", [2])], {"w1": w, "w2": w.copy()})
    out, _ = dedupe(m)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert ops(out) == ["Add", "Identity"]


def _probe_model():
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


def _check_probe(out, m):
    used = {n.input[1] for n in out.graph.node}
    assert used == {"a", "late", "early"}  # "same" merged into "a"; "late" and "early" kept
    assert_same_on_ort(m, out, {"x": np.ones((64, 1024), np.float32)}, rtol=0, atol=0)


def test_probe_in_memory():
    m = _probe_model()
    g, env = to_graph(m)
    res = DedupeInitializers()(g)
    assert res.stats["merged"] == 1
    _check_probe(to_model(g, env), m)


def test_probe_external_data(tmp_path):
    m = _probe_model()
    onnx.save(_probe_model(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    g, env = to_graph(lazy, tmp_path)
    res = DedupeInitializers()(g)
    assert res.stats["merged"] == 1
    # the export keeps the references into m.data, beside which it is saved
    onnx.save(to_model(g, env), tmp_path / "out.onnx")
    _check_probe(onnx.load(tmp_path / "out.onnx"), m)

