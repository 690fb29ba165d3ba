"""dedupe_transposed_initializers: B == A^T, B's readers read A through Gemm's trans flags."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper

import passes.dedupe_transposed_initializers as td
import passes.graph
from passes import to_graph, to_model
from passes.convert import ExternalValues
from passes.dedupe_transposed_initializers import (
    _SAMPLES,
    DedupeTransposedInitializers,
    _positions,
)
from tests.helpers import (
    apply,
    assert_same_on_ort,
    f32,
    init_names,
    make_model,
    ops,
    vi,
)

H = helper.make_node
V, E = 40, 8  # vocabulary, width: wte [V, E], its transposed copy [E, V]


def dedupe(m, feeds=None, **kw):
    p = DedupeTransposedInitializers(min_bytes=kw.pop("min_bytes", 0))
    out, (res,) = apply(m, p)
    assert_same_on_ort(m, out, feeds, rtol=1e-5, atol=1e-5)
    again, (res2,) = apply(out, p)
    assert not res2.modified and ops(again) == ops(out)  # idempotent
    return out, res


def lm_head(x_shape, *, head=(), y_shape=None, opset=17, wt=None, extra_inits=None):
    """Gather from wte, and a head (default MatMul(x, wt)) that reads wte^T, stored separately."""
    wte = f32(V, E, seed=1)
    inits = {"wte": wte, "wt": wte.T.copy() if wt is None else wt, **(extra_inits or {})}
    nodes = [H("Gather", ["wte", "ids"], ["emb"]), *(head or [H("MatMul", ["x", "wt"], ["y"])])]
    y_shape = y_shape or list(x_shape[:-1]) + [V]
    ins = [vi("ids", [3], TensorProto.INT64), vi("x", list(x_shape))]
    return make_model(nodes, ins, [vi("emb", [3, E]), vi("y", y_shape)], inits, opset=opset)


def feeds(x_shape):
    return {"ids": np.array([0, 5, V - 1], np.int64), "x": f32(*x_shape, seed=2)}


def gemm(m):
    (g,) = [n for n in m.graph.node if n.op_type == "Gemm"]
    return list(g.input), {a.name: helper.get_attribute_value(a) for a in g.attribute}


def test_matmul_2d_becomes_gemm():
    out, res = dedupe(lm_head([6, E]), feeds([6, E]))
    assert ops(out) == ["Gather", "Gemm"] and init_names(out) == ["wte"]
    assert gemm(out) == (["x", "wte"], {"transB": 1})
    assert res.stats == {"compared": 1, "merged": 1, "bytes_saved": V * E * 4, "readers_rewritten": 1}


@pytest.mark.parametrize("opset", [17, 14])
def test_matmul_3d_dynamic_batch(opset):
    m = lm_head(["B", "S", E], opset=opset)
    out, res = dedupe(m, feeds([2, 5, E]))
    assert_same_on_ort(m, out, feeds([1, 1, E]))
    assert_same_on_ort(m, out, feeds([3, 0, E]))  # an empty dim stays empty (allowzero)
    want = ["Gather", "Flatten", "Gemm", "Shape", "Concat", "Reshape"]
    if opset < 15:
        want.insert(4, "Slice")
    assert ops(out) == want and "wte" in init_names(out) and "wt" not in init_names(out)
    assert res.stats["nodes_added"] == len(want) - 2


def test_matmul_4d_static_lead():
    out, res = dedupe(lm_head([2, 3, 4, E]), feeds([2, 3, 4, E]))
    assert ops(out) == ["Gather", "Flatten", "Gemm", "Reshape"] and res.stats["nodes_added"] == 2


def test_matmul_3d_of_reshaped_2d_reads_the_2d_tensor():
    # x3 = Reshape(x, [1, -1, E]) of a 2-D x: the Gemm reads x, no Flatten
    head = [H("Reshape", ["x", "s3"], ["x3"]), H("MatMul", ["x3", "wt"], ["y"])]
    m = lm_head(["M", E], head=head, y_shape=[1, "M", V], extra_inits={"s3": np.array([1, -1, E], np.int64)})
    out, _ = dedupe(m, feeds([6, E]))
    assert ops(out) == ["Gather", "Reshape", "Gemm", "Shape", "Concat", "Reshape"]
    assert gemm(out)[0] == ["x", "wte"]


def test_matmul_3d_flattened_later_needs_no_reshape_back():
    head = [H("MatMul", ["x", "wt"], ["y3"]), H("Reshape", ["y3", "s2"], ["r"]), H("Relu", ["r"], ["y"])]
    m = lm_head(["B", "S", E], head=head, y_shape=["BS", V], extra_inits={"s2": np.array([-1, V], np.int64)})
    out, res = dedupe(m, feeds([2, 3, E]))
    assert ops(out) == ["Gather", "Flatten", "Gemm", "Relu"] and "nodes_added" not in res.stats


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_flipped(trans_b):
    wte = f32(V, E, seed=1)
    w = wte.T.copy() if trans_b == 0 else wte.copy()  # Gemm's B as the model stores it
    keep = wte if trans_b == 0 else wte.T.copy()  # Gather reads the other one
    m = make_model([H("Gather", ["g", "ids"], ["emb"]),
                    H("Gemm", ["x", "w", "c"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)],
                   [vi("ids", [3], TensorProto.INT64), vi("x", [6, E])],
                   [vi("emb", [3, keep.shape[1]]), vi("y", [6, V])],
                   {"g": keep, "w": w, "c": f32(V, seed=3)})
    out, _ = dedupe(m, {"ids": np.array([0, 1, 2], np.int64), "x": f32(6, E, seed=2)})
    inputs, attrs = gemm(out)
    assert inputs == ["x", "g", "c"] and attrs == {"transB": 1 - trans_b, "alpha": 0.5, "beta": 2.0}
    assert init_names(out) == ["c", "g"]


def test_first_operand_flips_trans_a():
    wte = f32(V, E, seed=1)
    m = make_model([H("Gather", ["wte", "ids"], ["emb"]), H("MatMul", ["wt", "x"], ["y"]),
                    H("Gemm", ["wt", "x"], ["z"], transA=0)],
                   [vi("ids", [3], TensorProto.INT64), vi("x", [V, 5])],
                   [vi("emb", [3, E]), vi("y", [E, 5]), vi("z", [E, 5])], {"wte": wte, "wt": wte.T.copy()})
    out, _ = dedupe(m, {"ids": np.array([1, 2, 3], np.int64), "x": f32(V, 5, seed=4)})
    assert ops(out) == ["Gather", "Gemm", "Gemm"] and init_names(out) == ["wte"]
    assert all(helper.get_attribute_value(n.attribute[0]) == 1 for n in out.graph.node[1:])


def test_batched_first_operand_left_alone():
    wte = f32(V, E, seed=1)
    m = make_model([H("Gather", ["wte", "ids"], ["emb"]), H("MatMul", ["wt", "x"], ["y"])],
                   [vi("ids", [3], TensorProto.INT64), vi("x", [2, V, 5])],
                   [vi("emb", [3, E]), vi("y", [2, E, 5])], {"wte": wte, "wt": wte.T.copy()})
    out, (res,) = apply(m, DedupeTransposedInitializers(min_bytes=0))
    assert not res.modified and res.stats == {"compared": 1, "kept_other_readers": 1}
    assert init_names(out) == ["wt", "wte"]


def test_near_transpose_left_alone():
    wt = f32(V, E, seed=1).T.copy()
    rows, cols = _positions((E, V))
    i, j = next((i, j) for i in range(E) for j in range(V) if not ((rows == i) & (cols == j)).any())
    wt[i, j] += 1e-6  # not at a sampled position: only the full compare sees it
    m = lm_head([6, E], wt=wt)
    out, (res,) = apply(m, DedupeTransposedInitializers(min_bytes=0))
    assert not res.modified and res.stats == {"compared": 1} and ops(out) == ["Gather", "MatMul"]
    wt[i, j] -= 1e-6
    wt[rows[5], cols[5]] = -wt[rows[5], cols[5]]  # at a sampled position: never compared in full
    out, (res,) = apply(lm_head([6, E], wt=wt), DedupeTransposedInitializers(min_bytes=0))
    assert not res.modified and res.stats == {}


def test_negative_zero_is_not_equal():
    wte = f32(V, E, seed=1)
    wte[3, 4] = 0.0
    wt = wte.T.copy()
    wt[4, 3] = -0.0
    out, (res,) = apply(lm_head([6, E], wt=wt), DedupeTransposedInitializers(min_bytes=0))
    assert not res.modified and ops(out) == ["Gather", "MatMul"]


def test_other_reader_keeps_both():
    m = lm_head([E, E], head=[H("MatMul", ["x", "wt"], ["m"]), H("Add", ["m", "wt"], ["y"])])
    out, (res,) = apply(m, DedupeTransposedInitializers(min_bytes=0))
    assert not res.modified and res.stats == {"compared": 1, "kept_other_readers": 1}
    assert init_names(out) == ["wt", "wte"]


def test_cheaper_side_is_dropped():
    # Dropping wt costs 3 nodes (its reader is a 3-D MatMul), dropping wte none (a 2-D MatMul).
    wte = f32(V, E, seed=1)
    m = make_model([H("MatMul", ["x3", "wt"], ["y"]), H("MatMul", ["x2", "wte"], ["z"])],
                   [vi("x3", ["B", "S", E]), vi("x2", [2, V])], [vi("y", ["B", "S", V]), vi("z", [2, E])],
                   {"wte": wte, "wt": wte.T.copy()})
    out, res = dedupe(m, {"x3": f32(2, 3, E), "x2": f32(2, V)})
    assert ops(out) == ["MatMul", "Gemm"] and init_names(out) == ["wt"] and "nodes_added" not in res.stats


def test_small_tensors_skipped_by_default():
    out, (res,) = apply(lm_head([6, E]), DedupeTransposedInitializers())
    assert not res.modified and ops(out) == ["Gather", "MatMul"]


def test_external_data(tmp_path):
    m = lm_head(["B", "S", E])
    onnx.save(lm_head(["B", "S", E]), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    g, env = to_graph(onnx.load(tmp_path / "m.onnx", load_external_data=False), tmp_path)
    res = DedupeTransposedInitializers(min_bytes=0)(g)
    assert res.stats["merged"] == 1
    onnx.save(to_model(g, env), tmp_path / "out.onnx")  # its references into m.data, beside it
    out = onnx.load(tmp_path / "out.onnx")
    assert "wt" not in init_names(out)
    assert_same_on_ort(m, out, feeds([2, 3, E]), rtol=1e-5, atol=1e-5)


PROBE_BYTES = 2 * (4 + _SAMPLES) * 4  # per tensor: 36 sampled elements of it and 36 of its transpose, float32


def external(m, tmp_path, inline=()):
    """m's graph with its initializers in m.data, except those named in ``inline``."""
    m = onnx.ModelProto.FromString(m.SerializeToString())  # onnx.save moves m's own tensors out
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for t in model.graph.initializer:
        if t.name in inline:
            external_data_helper.load_external_data_for_tensor(t, str(tmp_path))
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return to_graph(model, tmp_path)


class _Counted:
    def __init__(self, f, log):
        self.f, self.log = f, log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def seek(self, pos):
        return self.f.seek(pos)

    def readinto(self, buf):
        n = self.f.readinto(buf)
        self.log.append(n)
        return n


def run_counted(g, monkeypatch, block_bytes=None):
    """Run the pass on g; returns its result and the size of every read of external data.
    Loading an external tensor whole fails the test."""
    log = []
    real_open = passes.graph.open_external  # every read of an external tensor's bytes goes through it

    def open_counted(tensor, base_dir):
        f, offset, length = real_open(tensor, base_dir)
        return _Counted(f, log), offset, length

    with monkeypatch.context() as mp:
        mp.setattr(passes.graph, "open_external", open_counted)
        mp.setattr(ExternalValues, "load", lambda self: pytest.fail(f"{self.tensor.name} loaded whole"))
        if block_bytes is not None:
            mp.setattr(td, "_BLOCK_BYTES", block_bytes)
        res = DedupeTransposedInitializers(min_bytes=0)(g)
    return res, log


@pytest.mark.parametrize("block_bytes", [64, 256])  # 4x4 tiles (runs within rows); wte's tiles span whole rows
@pytest.mark.parametrize("inline", [(), ("wte",)])
def test_external_pair_compared_tile_by_tile(tmp_path, monkeypatch, block_bytes, inline):
    m = lm_head([6, E])
    g, env = external(m, tmp_path, inline)
    res, log = run_counted(g, monkeypatch, block_bytes)
    assert res.stats == {"compared": 1, "merged": 1, "bytes_saved": V * E * 4, "readers_rewritten": 1}
    # each external tensor: its probes, then every element once; never more than a tile in one read
    assert sum(log) == (2 - len(inline)) * (PROBE_BYTES + V * E * 4) and max(log) <= block_bytes
    onnx.save(to_model(g, env), tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    assert init_names(out) == ["wte"] and ops(out) == ["Gather", "Gemm"]
    assert_same_on_ort(m, out, feeds([6, E]), rtol=1e-5, atol=1e-5)


def test_external_probe_mismatch_reads_only_probes(tmp_path, monkeypatch):
    wt = f32(V, E, seed=1).T.copy()
    rows, cols = _positions((E, V))
    wt[rows[5], cols[5]] = -wt[rows[5], cols[5]]
    g, _ = external(lm_head([6, E], wt=wt), tmp_path)
    res, log = run_counted(g, monkeypatch)
    assert not res.modified and res.stats == {}
    assert sum(log) == 2 * PROBE_BYTES and max(log) == 4  # one element per read


def test_external_full_compare_stops_at_first_differing_tile(tmp_path, monkeypatch):
    wt = f32(V, E, seed=1).T.copy()
    sampled = set(zip(*_positions((E, V)))) | {(j, i) for i, j in zip(*_positions((V, E)))}
    i, j = next((i, j) for i in range(4) for j in range(4) if (i, j) not in sampled)  # in the first 4x4 tile
    wt[i, j] += 1e-6
    g, _ = external(lm_head([6, E], wt=wt), tmp_path)
    res, log = run_counted(g, monkeypatch, block_bytes=64)
    assert not res.modified and res.stats == {"compared": 1}
    assert sum(log) == 2 * PROBE_BYTES + 2 * 64  # the first tile of each, no more

