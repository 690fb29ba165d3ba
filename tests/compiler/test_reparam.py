"""The Beats reparameterization on hand-built graphs (issue 3).

For every weight-carrying op, the exporter chains in front of a weight,
shared and fp16 weights, every factorization and both layouts:

- insert keeps the function (max abs diff <= 1e-6 on ONNX Runtime), records
  what it did in the model, names and counts the trainable tensors;
- fold(insert(m)) has m's exact node list and byte-identical weights;
- with random nonzero D/V, fold equals the unfolded model on ORT and the
  numpy formula W0 + D (.) V; unfold(fold(x)) gives x back;
- insert is idempotent; bad requests are one-line InputErrors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import InputError
from beats_compiler import reparam as api
from passes import reparam as rp
from tests.helpers import assert_same_on_ort, f32, make_model, run, vi

H = helper.make_node
INSERT_ATOL = 1e-6  # insert must not change the function (V = 0)
FP32 = dict(rtol=1e-4, atol=1e-5)  # trained, unfolded vs folded: fp32 rounding only
FP16 = dict(rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- the graphs


@dataclass
class Case:
    model: onnx.ModelProto
    weights: dict[str, int | None]  # selected weight -> output-channel axis in its own layout (None: unknown)
    feeds: dict[str, np.ndarray]
    rule: dict = field(default_factory=dict)  # extra Rule kwargs
    branch: bool = False  # the branch layout applies
    tol: dict = field(default_factory=lambda: FP32)


def _x(*shape, seed=10, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def matmul() -> Case:
    m = make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 32])], [vi("y", ["N", 48])],
                   {"w": f32(32, 48)})
    return Case(m, {"w": 1}, {"x": _x(3, 32)}, branch=True)


def matmul_3d_input() -> Case:
    m = make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", "S", 32])], [vi("y", ["B", "S", 40])],
                   {"w": f32(32, 40)})
    return Case(m, {"w": 1}, {"x": _x(2, 5, 32)}, branch=True)


def gemm(trans_b: int) -> Callable[[], Case]:
    def build() -> Case:
        w = f32(48, 32) if trans_b else f32(32, 48)
        m = make_model([H("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=trans_b, beta=0.5)],
                       [vi("x", [4, 32])], [vi("y", [4, 48])], {"w": w, "b": f32(48, seed=1)})
        return Case(m, {"w": 0 if trans_b else 1}, {"x": _x(4, 32)}, branch=True)

    return build


def conv() -> Case:
    m = make_model([H("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                   [vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 16, 8, 8])], {"w": f32(16, 4, 3, 3), "b": f32(16, seed=1)})
    return Case(m, {"w": 0}, {"x": _x(2, 4, 8, 8)}, rule={"min_size": 64})


def conv_grouped() -> Case:
    m = make_model([H("Conv", ["x", "w"], ["y"], name="conv", group=2)],
                   [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 16, 4, 4])], {"w": f32(16, 2, 3, 3)})
    return Case(m, {"w": 0}, {"x": _x(2, 4, 6, 6)}, rule={"min_size": 64})


def conv_transpose() -> Case:
    m = make_model([H("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2])],
                   [vi("x", ["N", 8, 5, 5])], [vi("y", ["N", 6, 11, 11])], {"w": f32(8, 6, 3, 3), "b": f32(6, seed=1)})
    return Case(m, {"w": 1}, {"x": _x(2, 8, 5, 5)}, rule={"min_size": 64})


def gather() -> Case:
    ids = np.array([[1, 5, 99], [0, 0, 42]], np.int64)
    m = make_model([H("Gather", ["table", "ids"], ["y"], name="embed")],
                   [vi("ids", ["B", "S"], TensorProto.INT64)], [vi("y", ["B", "S", 32])], {"table": f32(100, 32)})
    return Case(m, {"table": 1}, {"ids": ids}, rule={"ops": ("Gather",)})


def transposed() -> Case:
    """torch Linear as exporters write it: MatMul(x, Transpose(W[out, in]))."""
    m = make_model([H("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]), H("MatMul", ["x", "wt"], ["y"], name="mm")],
                   [vi("x", ["N", 32])], [vi("y", ["N", 48])], {"w": f32(48, 32)})
    return Case(m, {"w": 0}, {"x": _x(3, 32)}, branch=True)


def cast_chain() -> Case:
    """An fp16 weight cast to fp32 in front of its consumer (mixed precision)."""
    m = make_model([H("Cast", ["w"], ["wf"], name="cast", to=TensorProto.FLOAT), H("MatMul", ["x", "wf"], ["y"], name="mm")],
                   [vi("x", ["N", 32])], [vi("y", ["N", 48])], {"w": f32(32, 48).astype(np.float16)})
    return Case(m, {"w": 1}, {"x": _x(3, 32)}, tol=dict(rtol=1e-3, atol=1e-3))


def reshape_chain() -> Case:
    """A flat weight reshaped in front of its consumer: the output axis is not
    known through the Reshape, so only ``full`` applies."""
    m = make_model([H("Reshape", ["w", "shape"], ["wr"], name="reshape"), H("MatMul", ["x", "wr"], ["y"], name="mm")],
                   [vi("x", ["N", 32])], [vi("y", ["N", 48])],
                   {"w": f32(32 * 48), "shape": np.array([32, 48], np.int64)})
    return Case(m, {"w": None}, {"x": _x(3, 32)})


def shared() -> Case:
    """One weight read by two MatMuls (one through a Transpose-free path, one
    directly): one D/V pair."""
    m = make_model([H("MatMul", ["x1", "w"], ["y1"], name="mm1"), H("MatMul", ["x2", "w"], ["y2"], name="mm2")],
                   [vi("x1", ["N", 32]), vi("x2", ["M", 32])], [vi("y1", ["N", 48]), vi("y2", ["M", 48])],
                   {"w": f32(32, 48)})
    return Case(m, {"w": 1}, {"x1": _x(3, 32), "x2": _x(2, 32, seed=11)}, branch=True)


def fp16() -> Case:
    m = make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 32], TensorProto.FLOAT16)],
                   [vi("y", ["N", 48], TensorProto.FLOAT16)], {"w": (f32(32, 48) * 0.2).astype(np.float16)})
    return Case(m, {"w": 1}, {"x": _x(3, 32, dtype=np.float16)}, tol=FP16)


def fp64() -> Case:
    m = make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 32], TensorProto.DOUBLE)],
                   [vi("y", ["N", 48], TensorProto.DOUBLE)], {"w": np.random.default_rng(0).standard_normal((32, 48))})
    return Case(m, {"w": 1}, {"x": _x(3, 32, dtype=np.float64)})


def mlp() -> Case:
    """Unnamed nodes, a bias the policy must not select (too small), two weights."""
    m = make_model(
        [H("MatMul", ["x", "l1.weight"], ["h"]), H("Add", ["h", "l1.bias"], ["hb"]), H("Relu", ["hb"], ["r"]),
         H("MatMul", ["r", "head.weight"], ["y"])],
        [vi("x", ["N", 32])], [vi("y", ["N", 40])],
        {"l1.weight": f32(32, 64), "l1.bias": f32(64, seed=1), "head.weight": f32(64, 40, seed=2)})
    return Case(m, {"l1.weight": 1, "head.weight": 1}, {"x": _x(3, 32)}, rule={"min_size": 1000}, branch=True)


CASES: dict[str, Callable[[], Case]] = {
    "matmul": matmul, "matmul_3d_input": matmul_3d_input, "gemm_transB0": gemm(0), "gemm_transB1": gemm(1),
    "conv": conv, "conv_grouped": conv_grouped, "conv_transpose": conv_transpose, "gather": gather,
    "transpose_chain": transposed, "cast_chain": cast_chain, "reshape_chain": reshape_chain, "shared": shared,
    "fp16": fp16, "fp64": fp64, "mlp": mlp,
}
FACTORIZATIONS = ("full", "vector", "rank:4")


def configs():
    for name, build in CASES.items():
        case = build()
        for fact in FACTORIZATIONS:
            if fact != "full" and None in case.weights.values():
                continue
            yield pytest.param(name, fact, "weight", id=f"{name}-{fact}-weight")
            if fact.startswith("rank") and case.branch:
                yield pytest.param(name, fact, "branch", id=f"{name}-{fact}-branch")


CONFIGS = list(configs())


# --------------------------------------------------------------------------- helpers


def policy(case: Case, fact: str, layout: str = "weight", **kw) -> rp.Policy:
    rule = {"min_size": 256, **case.rule, "factorization": fact, "layout": layout, **kw}
    return rp.Policy((rp.Rule(**rule),))


def nodes(model: onnx.ModelProto) -> list[tuple]:
    return [(n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node]


def node_bytes(model: onnx.ModelProto) -> list[bytes]:
    return [n.SerializeToString(deterministic=True) for n in model.graph.node]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_bytes(model: onnx.ModelProto) -> dict[str, tuple]:
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def records(model: onnx.ModelProto) -> list[rp.Record]:
    found = [e.value for e in model.metadata_props if e.key == rp.RECORD_KEY]
    assert len(found) <= 1
    return rp.load_records(found[0] if found else None)


def with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name], numpy_helper.to_array(t).dtype), t.name))
    return out


def trained_values(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Random nonzero D, V, A, B for every record (as if trained)."""
    rng = np.random.default_rng(seed)
    ws = weights(model)
    vals = {}
    for r in records(model):
        if r.D:
            vals[r.D] = (1 + 0.5 * rng.standard_normal(ws[r.D].shape)).astype(np.float32)
        for n in (r.V, r.A, r.B):
            if n:
                vals[n] = (0.3 * rng.standard_normal(ws[n].shape)).astype(np.float32)
    return vals


def expected_fold(w0: np.ndarray, axis: int, fact: str, vals: dict, rec: rp.Record) -> np.ndarray:
    """W0 + D (.) V written out in numpy, from the issue's definitions."""
    d = vals[rec.D].astype(np.float64)
    along = [1] * w0.ndim
    along[axis] = w0.shape[axis]
    if fact == "full":
        dlt = d * vals[rec.V]
    elif fact == "vector":
        dlt = d.reshape(along) * vals[rec.V]
    else:
        m = (vals[rec.A].astype(np.float64) @ vals[rec.B]) * d  # [in, out]: x @ A @ B * D in the consumer's terms
        rest = [s for i, s in enumerate(w0.shape) if i != axis]
        dlt = np.moveaxis(m.reshape(rest + [w0.shape[axis]]), -1, axis)
    return (w0.astype(np.float64) + dlt).astype(w0.dtype)


def param_count(shape, axis, fact) -> int:
    size = math.prod(shape)
    out = shape[axis] if axis is not None else None
    if fact == "full":
        return 2 * size
    if fact == "vector":
        return size + out
    r = int(fact.split(":")[1])
    return out + r * (size // out + out)


_cache: dict = {}


def inserted(name: str, fact: str, layout: str):
    """(case, insert result) for one configuration, computed once per session."""
    key = (name, fact, layout)
    if key not in _cache:
        case = CASES[name]()
        _cache[key] = (case, api.insert(case.model, policy(case, fact, layout), measure_latency=False,
                                        inputs=case.feeds))
    return _cache[key]


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- insert


@pytest.mark.parametrize("name,fact,layout", CONFIGS)
def test_insert_keeps_the_function(name, fact, layout):
    case, res = inserted(name, fact, layout)
    r = res.report
    assert r.verified is True and r.max_abs_diff <= INSERT_ATOL, r.outputs
    assert r.command == "insert"
    assert_same_on_ort(case.model, res.model, case.feeds, rtol=0, atol=INSERT_ATOL)
    # W0 stays, bit for bit, under its own name
    before, after = weight_bytes(case.model), weight_bytes(res.model)
    for w in case.weights:
        assert after[w] == before[w], w


@pytest.mark.parametrize("name,fact,layout", CONFIGS)
def test_insert_records_names_and_counts(name, fact, layout):
    case, res = inserted(name, fact, layout)
    recs = records(res.model)
    assert [r.weight for r in recs] == list(case.weights)
    ws = weights(res.model)
    kind = fact.split(":")[0]
    for r in recs:
        w = case.weights[r.weight]
        shape = list(ws[r.weight].shape)
        assert (r.factorization, r.layout, r.shape) == (kind, layout, shape)
        assert r.dtype == ws[r.weight].dtype.name
        if w is not None:
            assert r.axis == w
        want_names = {"D": f"{r.weight}.beats_D"}
        if kind == "rank":
            assert r.rank == 4
            want_names.update(A=f"{r.weight}.beats_A", B=f"{r.weight}.beats_B")
        else:
            want_names.update(V=f"{r.weight}.beats_V")
        assert {k: getattr(r, k) for k in ("D", "V", "A", "B") if getattr(r, k)} == want_names
        # shapes: D, V like W (full); D [out], V like W (vector); D [out], A [in, R], B [R, out]
        out = shape[r.axis]
        inn = math.prod(shape) // out
        want_shapes = {"full": {"D": shape, "V": shape}, "vector": {"D": [out], "V": shape},
                       "rank": {"D": [out], "A": [inn, 4], "B": [4, out]}}[kind]
        for k, s in want_shapes.items():
            t = ws[getattr(r, k)]
            assert list(t.shape) == s and t.dtype == np.float32, (k, t.shape, t.dtype)
        # V (or B) is zero, D is not
        assert not np.any(ws[r.V or r.B]) and np.all(ws[r.D] != 0)
    info = res.report.reparam
    assert [w["weight"] for w in info["inserted"]] == list(case.weights)
    for row in info["inserted"]:
        want = param_count(list(ws[row["weight"]].shape), case.weights[row["weight"]] if kind != "full" else None, fact)
        assert row["trainable_params"] == want, row
    assert info["trainable_params"] == info["trainable_params_total"] == sum(r["trainable_params"] for r in info["inserted"])
    # trainable.json: trainable vs frozen partition the initializers
    manifest = api.trainable_manifest(res.model)
    names = [t.name for t in res.model.graph.initializer]
    assert sorted(manifest["trainable"] + manifest["frozen"]) == sorted(names)
    assert set(manifest["trainable"]) == {n for r in recs for n in r.trainable}
    assert not set(manifest["trainable"]) & set(case.weights)  # W0 is frozen


def test_trainable_parameter_counts_by_formula():
    case = matmul()  # W [32, 48]: in 32, out 48
    for fact, want in (("full", 2 * 32 * 48), ("vector", 32 * 48 + 48), ("rank:4", 48 + 4 * (32 + 48))):
        r = api.insert(case.model, policy(case, fact), verify=False).report.reparam
        assert r["trainable_params"] == want, fact
        assert r["model_params"] == 32 * 48 + want


def test_shared_weight_gets_one_pair():
    case, res = inserted("shared", "full", "weight")
    assert len(records(res.model)) == 1
    assert [n for n in nodes(res.model) if n[0] == "MatMul"] == [
        ("MatMul", "mm1", ["x1", "w.beats_W"], ["y1"]), ("MatMul", "mm2", ["x2", "w.beats_W"], ["y2"])]
    assert sorted(t.name for t in res.model.graph.initializer) == ["w", "w.beats_D", "w.beats_V"]
    assert res.report.reparam["inserted"][0]["consumers"] == ["MatMul", "MatMul"]


def test_weight_layout_structure_fp16_computes_in_fp32():
    case, res = inserted("fp16", "full", "weight")
    assert [n[0] for n in nodes(res.model)] == ["Mul", "Cast", "Add", "Cast", "MatMul"]
    casts = [n for n in res.model.graph.node if n.op_type == "Cast"]
    assert casts[0].input == ["w"] and casts[0].attribute[0].i == TensorProto.FLOAT
    assert casts[1].attribute[0].i == TensorProto.FLOAT16 and casts[1].output == ["w.beats_W"]
    assert weights(res.model)["w"].dtype == np.float16


def test_fp64_weight_is_never_rounded_through_fp32():
    case, res = inserted("fp64", "full", "weight")
    ops = [n[0] for n in nodes(res.model)]
    assert "Cast" in ops and weights(res.model)["w"].dtype == np.float64
    cast = next(n for n in res.model.graph.node if n.op_type == "Cast")
    assert cast.attribute[0].i == TensorProto.DOUBLE  # the delta is widened, not W0 narrowed
    assert_same_on_ort(case.model, res.model, case.feeds, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n]().branch])
def test_branch_layout_structure(name):
    case, res = inserted(name, "rank:4", "branch")
    m = res.model
    recs = records(m)
    by_out = {o: n for n in m.graph.node for o in n.output}
    original = [n.SerializeToString() for n in case.model.graph.node]

    def as_original(n):  # the same node as in the input model, but for a renamed output
        c = onnx.NodeProto()
        c.CopyFrom(n)
        for i, o in enumerate(c.output):
            if o in r.renamed:
                c.output[i] = r.renamed[o]
        return c

    for r in recs:
        # W0 is read only by the original node(s) (or their exporter chain), never by the side path
        readers = [n for n in m.graph.node if r.weight in n.input]
        assert readers and all(n.name not in r.nodes and as_original(n).SerializeToString() in original
                               for n in readers)
        # side path: Add(base, MatMul(MatMul(x, A), Mul(B, D))) for each consumer
        adds = [n for n in m.graph.node if n.name in r.nodes and n.op_type == "Add"]
        assert len(adds) == len([n for n in case.model.graph.node if n.op_type in ("MatMul", "Gemm")
                                 and r.weight in _reads(case.model, n)])
        for add in adds:
            base, side = add.input
            orig = as_original(by_out[base])  # the original node, writing a renamed output
            assert orig.SerializeToString() in original and base in r.renamed
            mm_b = by_out[side]
            assert mm_b.op_type == "MatMul"
            mul = by_out[mm_b.input[1]]
            assert mul.op_type == "Mul" and list(mul.input) == [r.B, r.D]
            mm_a = by_out[mm_b.input[0]]
            assert mm_a.op_type == "MatMul" and mm_a.input[1] == r.A
            assert mm_a.input[0] == by_out[base].input[0]  # x: the original node's activation input
            assert list(add.output) == [r.renamed[base]] and r.renamed[base] in orig.output  # the original name
        # no full-size tensor is trainable, and W0 is not trainable
        manifest = api.trainable_manifest(m)
        assert r.weight in manifest["frozen"] and r.weight not in manifest["trainable"]
        assert r.effective is None


def _reads(model, node) -> set[str]:
    """Initializers a node reads directly or through Transpose/Cast/Identity."""
    by_out = {o: n for n in model.graph.node for o in n.output}
    out = set()
    for i in node.input:
        while i in by_out and by_out[i].op_type in ("Transpose", "Cast", "Identity"):
            i = by_out[i].input[0]
        out.add(i)
    return out


def test_branch_side_path_is_x_A_B_D():
    """Trained branch model = x @ W0 + ((x @ A) @ B) * D, as written in numpy."""
    case, res = inserted("matmul", "rank:4", "branch")
    vals = trained_values(res.model)
    trained = with_values(res.model, vals)
    x = case.feeds["x"].astype(np.float64)
    r = records(res.model)[0]
    w0 = weights(case.model)["w"].astype(np.float64)
    want = x @ w0 + ((x @ vals[r.A]) @ vals[r.B]) * vals[r.D]
    (got,) = run(trained, case.feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_reshape_chain_only_full():
    case = reshape_chain()
    with pytest.raises(InputError) as e:
        api.insert(case.model, policy(case, "vector"), verify=False)
    assert "output axis unknown" in one_line(e)
    res = api.insert(case.model, policy(case, "full"), inputs=case.feeds, measure_latency=False)
    assert res.report.verified


def test_embeddings_only_on_request():
    case = gather()
    with pytest.raises(InputError, match="matches no weight"):
        api.insert(case.model, policy(case, "full", ops=rp.DEFAULT_OPS), verify=False)
    assert "Gather" not in rp.DEFAULT_OPS
    res = api.insert(case.model, policy(case, "full"), inputs=case.feeds, measure_latency=False)
    assert [r.weight for r in records(res.model)] == ["table"]


def test_branch_layout_skips_what_it_cannot_do():
    case = conv()
    with pytest.raises(InputError) as e:
        api.insert(case.model, policy(case, "rank:2", "branch"), verify=False)
    assert "branch layout supports 2-D MatMul/Gemm weights" in one_line(e)
    case = fp16()
    with pytest.raises(InputError, match="float32"):
        api.insert(case.model, policy(case, "rank:2", "branch"), verify=False)


# --------------------------------------------------------------------------- fold


@pytest.mark.parametrize("name,fact,layout", CONFIGS)
def test_fold_of_insert_is_the_original(name, fact, layout):
    case, res = inserted(name, fact, layout)
    folded = api.fold(res.model, inputs=case.feeds, measure_latency=False)
    assert folded.report.verified is True and folded.report.command == "fold"
    assert nodes(folded.model) == nodes(case.model)
    assert node_bytes(folded.model) == node_bytes(case.model)
    assert weight_bytes(folded.model) == weight_bytes(case.model)
    assert [t.name for t in folded.model.graph.initializer] == [t.name for t in case.model.graph.initializer]
    assert list(folded.model.metadata_props) == list(case.model.metadata_props)
    assert folded.model.graph.input == case.model.graph.input
    assert folded.model.graph.output == case.model.graph.output


@pytest.mark.parametrize("name,fact,layout", CONFIGS)
def test_trained_fold_matches_unfolded_and_formula(name, fact, layout):
    case, res = inserted(name, fact, layout)
    vals = trained_values(res.model)
    trained = with_values(res.model, vals)
    folded = api.fold(trained, inputs=case.feeds, measure_latency=False)
    assert folded.report.verified is True, folded.report.outputs
    assert nodes(folded.model) == nodes(case.model)
    assert_same_on_ort(trained, folded.model, case.feeds, **case.tol)
    before, after = weights(case.model), weights(folded.model)
    recs = {r.weight: r for r in records(res.model)}
    for w, w0 in before.items():
        if w in recs:
            r = recs[w]
            want = expected_fold(w0, r.axis, fact.split(":")[0], vals, r)
            assert after[w].dtype == w0.dtype and after[w].shape == w0.shape
            np.testing.assert_allclose(after[w], want, rtol=1e-6, atol=1e-7 if w0.dtype != np.float16 else 1e-3)
            assert not np.array_equal(after[w], w0)
        else:
            assert after[w].tobytes() == w0.tobytes(), w  # untouched weights stay bit for bit
    # the same values from a file (values=) on the untrained inserted model give the same fold
    again = api.fold(res.model, vals, verify=False)
    assert weight_bytes(again.model) == weight_bytes(folded.model)


@pytest.mark.parametrize("name,fact,layout", CONFIGS)
def test_unfold_of_fold_gives_the_trained_model_back(name, fact, layout):
    case, res = inserted(name, fact, layout)
    trained = with_values(res.model, trained_values(res.model, seed=2))
    adapter = api.Adapter.from_model(trained)
    folded = api.fold(trained, verify=False).model
    back = api.unfold(folded, adapter, inputs=case.feeds, measure_latency=False)
    assert back.report.verified is True and back.report.command == "unfold"
    m = back.model
    assert nodes(m) == nodes(trained)
    assert [(r.weight, r.D, r.V, r.A, r.B, r.axis, r.layout) for r in records(m)] == \
        [(r.weight, r.D, r.V, r.A, r.B, r.axis, r.layout) for r in records(trained)]
    got, want = weights(m), weights(trained)
    assert sorted(got) == sorted(want)
    for n in want:
        tol = dict(rtol=1e-6, atol=1e-6) if want[n].dtype != np.float16 else dict(rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got[n], want[n], err_msg=n, **tol)
    assert_same_on_ort(trained, m, case.feeds, **case.tol)
    # folding the unfolded model gives the folded weights again
    refolded = api.fold(m, verify=False).model
    assert nodes(refolded) == nodes(case.model)
    a, b = weights(refolded), weights(folded)
    for n in b:
        if b[n].dtype == np.float16:
            np.testing.assert_allclose(a[n], b[n], rtol=2e-3, atol=2e-3, err_msg=n)
        else:
            np.testing.assert_array_max_ulp(a[n], b[n], maxulp=1)


@pytest.mark.parametrize("name,fact,layout", CONFIGS)
def test_insert_is_idempotent(name, fact, layout):
    case, res = inserted(name, fact, layout)
    again = api.insert(res.model, policy(case, fact, layout), inputs=case.feeds, measure_latency=False)
    assert any("no-op" in w for w in again.report.warnings), again.report.warnings
    assert again.report.reparam["inserted"] == []
    assert sorted(again.report.reparam["already_inserted"]) == sorted(case.weights)
    assert node_bytes(again.model) == node_bytes(res.model)
    assert weight_bytes(again.model) == weight_bytes(res.model)
    assert records(again.model) == records(res.model)


def test_insert_more_weights_later():
    """A second insert with a wider selection adds only the new weights."""
    case = mlp()
    first = api.insert(case.model, policy(case, "vector", include=("head.*",)), verify=False).model
    second = api.insert(first, policy(case, "rank:2"), inputs=case.feeds, measure_latency=False)
    info = second.report.reparam
    assert [w["weight"] for w in info["inserted"]] == ["l1.weight"]
    assert info["already_inserted"] == ["head.weight"]
    assert [(r.weight, r.factorization) for r in records(second.model)] == [("head.weight", "vector"), ("l1.weight", "rank")]
    folded = api.fold(second.model, inputs=case.feeds, measure_latency=False).model
    assert node_bytes(folded) == node_bytes(case.model) and weight_bytes(folded) == weight_bytes(case.model)


def test_adapter_applies_to_the_base_model(tmp_path):
    case, res = inserted("mlp", "rank:4", "branch")
    trained = with_values(res.model, trained_values(res.model))
    adapter = api.Adapter.from_model(trained)
    adapter.save(tmp_path / "a.npz")
    loaded = api.Adapter.load(tmp_path / "a.npz")
    assert [r.to_dict() for r in loaded.records] == [r.to_dict() for r in adapter.records]
    assert all(np.array_equal(loaded.values[k], v) for k, v in adapter.values.items())
    folded = api.fold(trained, verify=False).model
    applied = api.fold(case.model, adapter=loaded, inputs=case.feeds, measure_latency=False)
    assert applied.report.verified is True  # against base + adapter, unfolded
    assert node_bytes(applied.model) == node_bytes(folded)
    assert weight_bytes(applied.model) == weight_bytes(folded)


# --------------------------------------------------------------------------- policy


def test_policy_config_rules_globs_min_size_ops():
    case = mlp()
    pol = rp.Policy.from_dict({
        "seed": 3, "d_scale": 0.1,
        "rules": [
            {"include": ["head.*"], "factorization": "rank:2", "layout": "branch", "min_size": 0},
            {"ops": ["MatMul"], "exclude": ["*.bias"], "min_size": 2048, "factorization": "vector"},
        ],
    })
    assert pol.seed == 3 and pol.d_scale == 0.1 and len(pol.rules) == 2
    res = api.insert(case.model, pol, inputs=case.feeds, measure_latency=False)
    got = {r.weight: (r.factorization, r.rank, r.layout) for r in records(res.model)}
    assert got == {"head.weight": ("rank", 2, "branch"), "l1.weight": ("vector", 0, "weight")}
    # min_size excludes: l1.weight has 2048 elements
    pol = rp.Policy.from_dict({"rules": [{"min_size": 2049}]})
    res = api.insert(case.model, pol, verify=False)
    assert [r.weight for r in records(res.model)] == ["head.weight"]
    # exclude glob
    pol = rp.Policy.from_dict({"rules": [{"exclude": ["l1.*"], "min_size": 0}]})
    assert [r.weight for r in records(api.insert(case.model, pol, verify=False).model)] == ["head.weight"]
    # ops: only Conv -> nothing in an MLP
    with pytest.raises(InputError, match="matches no weight"):
        api.insert(case.model, rp.Policy.from_dict({"rules": [{"ops": ["Conv"]}]}), verify=False)


def test_seed_and_d_scale_drive_the_initialization():
    case = matmul()
    d = lambda pol: weights(api.insert(case.model, pol, verify=False).model)["w.beats_D"]  # noqa: E731
    a = d(rp.Policy.from_dict({"rules": [{"min_size": 0}], "seed": 1, "d_scale": 0.1}))
    b = d(rp.Policy.from_dict({"rules": [{"min_size": 0}], "seed": 1, "d_scale": 0.1}))
    c = d(rp.Policy.from_dict({"rules": [{"min_size": 0}], "seed": 2, "d_scale": 0.1}))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(float(np.std(a - 1)) - 0.1) < 0.02


@pytest.mark.parametrize("config,needle", [
    ({"rule": []}, "unknown config keys: rule"),
    ({"rules": [{"opz": ["MatMul"]}]}, "rule 0: unknown keys opz"),
    ({"rules": {"ops": ["MatMul"]}}, "non-empty list"),
    ({"rules": []}, "non-empty list"),
    ({"rules": ["MatMul"]}, "rule 0 must be an object"),
    ({"rules": [{"ops": "MatMul"}]}, "ops must be a list of strings"),
    ({"rules": [{"ops": ["Relu"]}]}, "cannot select weights of Relu"),
    ({"rules": [{"min_size": "big"}]}, "min_size must be an integer"),
    ({"rules": [{"min_size": -1}]}, "min_size must be >= 0"),
    ({"rules": [{"factorization": 3}]}, "factorization must be a string"),
    ({"rules": [{"factorization": "rank:0"}]}, "unknown factorization"),
    ({"rules": [{"factorization": "lowrank"}]}, "unknown factorization"),
    ({"rules": [{"layout": "side"}]}, "unknown layout"),
    ({"rules": [{"layout": "branch"}]}, "branch layout needs a low-rank factorization"),
    ({"seed": "x"}, "'seed' must be an integer"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"d_scale": "big"}, "'d_scale' must be a number"),
    ([], "must be a JSON object"),
])
def test_bad_policy_configs_are_one_line_errors(config, needle):
    with pytest.raises(rp.ReparamError) as e:
        rp.Policy.from_dict(json.loads(json.dumps(config)))
    assert needle in one_line(e)


# --------------------------------------------------------------------------- errors


def test_selection_matching_nothing():
    case = matmul()
    for pol in (policy(case, "full", include=("nothing*",)), policy(case, "full", min_size=10**6)):
        with pytest.raises(InputError) as e:
            api.insert(case.model, pol, verify=False)
        assert "the selection matches no weight" in one_line(e)


def test_insert_needs_opset_7():
    # Before opset 7, Add/Mul broadcast only with attributes and ONNX Runtime has
    # no kernels for them: insert would write a model nothing can run.
    m = make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [3, 32])], [vi("y", [3, 48])],
                   {"w": f32(32, 48)}, opset=6)
    for fn in (lambda: api.insert(m, policy(matmul(), "full"), verify=False),
               lambda: api.unfold(m, api.Adapter.from_model(inserted("matmul", "full", "weight")[1].model),
                                  verify=False)):
        with pytest.raises(InputError) as e:
            fn()
        assert "opset 6" in one_line(e) and "opset >= 7" in one_line(e)


def test_fold_of_insert_keeps_constant_node_bytes():
    # A Constant node's unnamed value tensor must come back without a `name: ""`
    # field, in the result and in the caller's model: fold(insert(m)) has the
    # original's node bytes (TorchScript exports), and insert mutates nothing.
    m = make_model([H("Constant", [], ["s"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
                    H("MatMul", ["x", "w"], ["t"], name="mm"), H("Mul", ["t", "s"], ["y"], name="mul")],
                   [vi("x", ["N", 32])], [vi("y", ["N", 48])], {"w": f32(32, 48)})
    m.graph.node[0].attribute[0].t.ClearField("name")
    given = m.SerializeToString(deterministic=True)
    res = api.insert(m, rp.Policy((rp.Rule(factorization="full"),)), verify=False)
    assert m.SerializeToString(deterministic=True) == given  # gs wrote `name: ""` into the caller's tensor
    folded = api.fold(res.model, verify=False)
    assert node_bytes(folded.model) == node_bytes(m)


def test_rank_too_large_names_the_max():
    case = matmul()
    with pytest.raises(InputError) as e:
        api.insert(case.model, policy(case, "rank:33"), verify=False)
    msg = one_line(e)
    assert "rank 33" in msg and "at most 32" in msg and "'w'" in msg
    api.insert(case.model, policy(case, "rank:32"), verify=False)  # the max itself is fine


def test_fold_without_dv():
    case = matmul()
    with pytest.raises(InputError) as e:
        api.fold(case.model, verify=False)
    assert "no D/V to fold" in one_line(e)
    with pytest.raises(InputError) as e:
        api.Adapter.from_model(case.model)
    assert "no D/V" in one_line(e)


def test_unfold_of_an_inserted_model():
    _, res = inserted("matmul", "full", "weight")
    with pytest.raises(InputError) as e:
        api.unfold(res.model, api.Adapter.from_model(res.model), verify=False)
    assert "already carries D/V" in one_line(e)


def test_bad_values():
    case, res = inserted("matmul", "rank:4", "weight")
    with pytest.raises(InputError) as e:
        api.fold(res.model, {"w.beats_Q": np.zeros(3, np.float32)}, verify=False)
    assert "values for unknown tensors: w.beats_Q" in one_line(e)
    with pytest.raises(InputError) as e:
        api.fold(res.model, {"w.beats_A": np.zeros((32, 5), np.float32)}, verify=False)
    assert "'w.beats_A' has shape [32, 5], expected [32, 4]" in one_line(e)
    adapter = api.Adapter.from_model(res.model)
    adapter.values["w.beats_B"] = np.zeros((4, 47), np.float32)
    with pytest.raises(InputError) as e:
        api.unfold(case.model, adapter, verify=False)
    assert "'w.beats_B' has shape [4, 47]" in one_line(e)
    del adapter.values["w.beats_B"]
    with pytest.raises(InputError) as e:
        api.unfold(case.model, adapter, verify=False)
    assert "no value for w.beats_B" in one_line(e)


def test_adapter_for_another_model():
    _, res = inserted("matmul", "vector", "weight")
    adapter = api.Adapter.from_model(res.model)
    other = make_model([H("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", 16])], [vi("y", ["N", 48])],
                       {"w": f32(16, 48)})
    for call in (lambda: api.fold(other, adapter=adapter, verify=False), lambda: api.unfold(other, adapter, verify=False)):
        with pytest.raises(InputError) as e:
            call()
        assert "weight 'w' has shape [16, 48], the reparameterization record expects [32, 48]" in one_line(e)
    missing = make_model([H("Relu", ["x"], ["y"])], [vi("x", ["N", 4])], [vi("y", ["N", 4])])
    with pytest.raises(InputError) as e:
        api.fold(missing, adapter=adapter, verify=False)
    assert "weight 'w' is not an initializer" in one_line(e)


def test_fold_with_a_missing_inserted_node():
    _, res = inserted("matmul", "full", "weight")
    broken = onnx.ModelProto()
    broken.CopyFrom(res.model)
    mul = next(n for n in broken.graph.node if n.op_type == "Mul")
    mul.name = "renamed"
    with pytest.raises(InputError) as e:
        api.fold(broken, verify=False)
    assert "missing from the model" in one_line(e)


def test_unreadable_record():
    _, res = inserted("matmul", "full", "weight")
    broken = onnx.ModelProto()
    broken.CopyFrom(res.model)
    for e in broken.metadata_props:
        if e.key == rp.RECORD_KEY:
            e.value = "{not json"
    for call in (lambda: api.fold(broken, verify=False), lambda: api.insert(broken, verify=False),
                 lambda: api.Adapter.from_model(broken), lambda: api.trainable_manifest(broken)):
        with pytest.raises(InputError) as e:
            call()
        assert "record is unreadable" in one_line(e)


# --------------------------------------------------------------------------- odd sharing


def tied() -> Case:
    """Tied embeddings: one table read by a Gather and, transposed, by the output MatMul."""
    ids = np.array([[1, 5, 99], [0, 0, 42]], np.int64)
    m = make_model(
        [H("Gather", ["table", "ids"], ["h"], name="embed"), H("Transpose", ["table"], ["tt"], name="t", perm=[1, 0]),
         H("MatMul", ["h", "tt"], ["logits"], name="lm_head")],
        [vi("ids", ["B", "S"], TensorProto.INT64)], [vi("logits", ["B", "S", 100])], {"table": f32(100, 32)})
    return Case(m, {"table": 0}, {"ids": ids})


@pytest.mark.parametrize("fact", FACTORIZATIONS)
def test_tied_weight_one_pair_for_every_reader(fact):
    case = tied()
    res = api.insert(case.model, policy(case, fact), inputs=case.feeds, measure_latency=False)
    (r,) = records(res.model)
    assert r.axis == 0  # vocab: the MatMul's output axis, through the Transpose
    ins = {n.name: list(n.input) for n in res.model.graph.node}
    assert ins["embed"][0] == ins["t"][0] == r.effective  # both readers see W0 + D (.) V
    vals = trained_values(res.model)
    trained = with_values(res.model, vals)
    folded = api.fold(trained, inputs=case.feeds, measure_latency=False).model
    assert node_bytes(folded) == node_bytes(case.model)
    assert_same_on_ort(trained, folded, case.feeds, **FP32)
    assert weight_bytes(api.fold(res.model, verify=False).model) == weight_bytes(case.model)
    # re-inserting from the record: the Gather, outside the selection, must not veto the record's axis
    adapter = api.Adapter.from_model(trained)
    back = api.unfold(folded, adapter, inputs=case.feeds, measure_latency=False)
    assert back.report.verified and node_bytes(back.model) == node_bytes(trained)
    applied = api.fold(case.model, adapter=adapter, inputs=case.feeds, measure_latency=False)
    assert applied.report.verified and weight_bytes(applied.model) == weight_bytes(folded)
    with pytest.raises(InputError) as e:
        api.insert(case.model, policy(case, "rank:2", "branch"), verify=False)
    assert "also read by Gather" in one_line(e)


def test_consumers_that_disagree_on_the_output_axis():
    m = make_model([H("MatMul", ["x", "w"], ["y1"], name="a"), H("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
                    H("MatMul", ["x", "wt"], ["y2"], name="b")],
                   [vi("x", ["N", 32])], [vi("y1", ["N", 32]), vi("y2", ["N", 32])], {"w": f32(32, 32)})
    case = Case(m, {"w": None}, {"x": _x(3, 32)})
    with pytest.raises(InputError) as e:
        api.insert(m, policy(case, "vector"), verify=False)
    assert "consumers disagree on the output axis" in one_line(e)
    res = api.insert(m, policy(case, "full"), inputs=case.feeds, measure_latency=False)
    trained = with_values(res.model, trained_values(res.model))
    folded = api.fold(trained, inputs=case.feeds, measure_latency=False).model
    assert node_bytes(folded) == node_bytes(m)
    assert_same_on_ort(trained, folded, case.feeds, **FP32)


def test_weight_also_read_inside_a_subgraph():
    """An outer-scope weight read inside both If branches (the If comes first)
    and by a MatMul at the top level."""
    then_g = helper.make_graph([H("MatMul", ["x", "w"], ["t_out"], name="inner")], "then", [], [vi("t_out", ["N", 48])])
    else_g = helper.make_graph([H("Neg", ["x"], ["nx"], name="neg"), H("MatMul", ["nx", "w"], ["e_out"], name="inner2")],
                               "else", [], [vi("e_out", ["N", 48])])
    m = make_model([H("If", ["cond"], ["y1"], name="if", then_branch=then_g, else_branch=else_g),
                    H("MatMul", ["x", "w"], ["y0"], name="outer")],
                   [vi("x", ["N", 32]), vi("cond", [], TensorProto.BOOL)], [vi("y0", ["N", 48]), vi("y1", ["N", 48])],
                   {"w": f32(32, 48)})
    feeds = {"x": _x(3, 32), "cond": np.array(True)}
    case = Case(m, {"w": 1}, feeds)
    res = api.insert(m, policy(case, "vector"), inputs=feeds, measure_latency=False)
    assert res.report.verified
    trained = with_values(res.model, trained_values(res.model))
    y0, y1 = run(trained, feeds)
    np.testing.assert_allclose(y0, y1, rtol=1e-6)  # the inner MatMul reads the same reparameterized weight
    folded = api.fold(trained, inputs=feeds, measure_latency=False).model
    assert_same_on_ort(trained, folded, feeds, **FP32)
    assert_same_on_ort(trained, folded, {**feeds, "cond": np.array(False)}, **FP32)
    back = api.fold(res.model, verify=False).model
    # (the protobuf boundary itself adds value_info for outer-scope names to a
    # subgraph, so compare the node lists at every level rather than the If's bytes)
    assert nodes(back) == nodes(m) and weight_bytes(back) == weight_bytes(m)
    for a, b in zip(back.graph.node[0].attribute, m.graph.node[0].attribute):
        assert [n.SerializeToString() for n in a.g.node] == [n.SerializeToString() for n in b.g.node]


def test_names_that_exist_already_are_not_reused():
    m = make_model([H("MatMul", ["x", "w"], ["w.beats_W"], name="mm"), H("Relu", ["w.beats_W"], ["y"], name="w.beats_Mul")],
                   [vi("x", ["N", 32])], [vi("y", ["N", 48])], {"w": f32(32, 48), "w.beats_D": f32(2)})
    m.graph.node.append(H("Identity", ["w.beats_D"], ["d_out"], name="keep"))
    m.graph.output.append(vi("d_out", [2]))
    case = Case(m, {"w": 1}, {"x": _x(3, 32)})
    res = api.insert(m, policy(case, "full"), inputs=case.feeds, measure_latency=False)
    (r,) = records(res.model)
    assert r.D == "w.beats_D_1" and r.effective == "w.beats_W_1" and "w.beats_Mul" not in r.nodes
    back = api.fold(with_values(res.model, trained_values(res.model)), inputs=case.feeds, measure_latency=False).model
    assert nodes(back) == nodes(m)
    assert weights(back)["w.beats_D"].tobytes() == weights(m)["w.beats_D"].tobytes()
