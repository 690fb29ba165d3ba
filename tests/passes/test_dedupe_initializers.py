"""dedupe_initializers: identical constants become one."""

import numpy as np
from onnx import TensorProto, helper

from passes import DedupeInitializers
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
