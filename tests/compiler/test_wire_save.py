"""``beats_compiler.wire``: a model written without encoding its weights
through protobuf must be byte for byte ``SerializeToString(deterministic=True)``,
and ``save_model`` must still write it atomically."""

import glob
import io
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler import save_model, wire
from beats_compiler import io as bio
from tests.compiler.test_io import Crash, crash_writes_under, listing
from tests.helpers import f32, make_model, vi

H = helper.make_node
ROOT = Path(__file__).resolve().parents[2]


def data(model):
    return model.SerializeToString(deterministic=True)


def written(model):
    f = io.BytesIO()
    n = wire.write_model(model, f)
    assert n == len(f.getvalue())
    return f.getvalue()


def assert_same(model, *, spliced=True):
    before = data(model)
    plan = wire.model_pieces(model)
    assert (plan is not None) == spliced
    if plan is not None:
        total, pieces = plan
        out = b"".join(pieces)
        assert len(out) == total
        assert out == before
    assert written(model) == before
    assert data(model) == before  # the caller's model is unchanged


def unknown(number, value=7):
    """An unknown varint field, as bytes to append to a serialized message."""
    return wire.varint(number << 3) + wire.varint(value)


def tensor_with_unknown(name="u"):
    t = numpy_helper.from_array(f32(32, 64, seed=5), name)
    return TensorProto.FromString(data(t) + unknown(99) + unknown(3, 1 << 40))


def rich_model():
    """Every kind of thing a model holds around its initializers."""
    then_g = helper.make_graph([H("Add", ["x", "c"], ["t"])], "then", [], [vi("t", [2, 64])],
                               [numpy_helper.from_array(f32(2, 64, seed=3), "c")])
    else_g = helper.make_graph([H("Identity", ["x"], ["e"])], "else", [], [vi("e", [2, 64])])
    big = numpy_helper.from_array(f32(64, 64), "w")
    big.doc_string = "a weight with a doc string"
    inits = [
        big,
        numpy_helper.from_array(f32(64, seed=1), "b"),  # small raw_data: encoded whole
        helper.make_tensor("fl", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),  # float_data
        helper.make_tensor("i64", TensorProto.INT64, [2], [5, -6]),  # int64_data
        helper.make_tensor("s", TensorProto.STRING, [2], [b"ab", b"cde"]),
        helper.make_tensor("empty", TensorProto.FLOAT, [0], b"", raw=True),  # raw_data present, empty
        numpy_helper.from_array(np.array(2.5, np.float32), "scalar"),  # 0-dim
        numpy_helper.from_array(np.arange(3000, dtype=np.int64), "big_i64"),
        helper.make_tensor("f16", TensorProto.FLOAT16, [4096], np.ones(4096, np.float16).tobytes(), raw=True),
    ]
    inits[2].doc_string = "float_data"
    nodes = [
        H("MatMul", ["x", "w"], ["m"]),
        H("Add", ["m", "b"], ["y0"]),
        H("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        H("Constant", [], ["k"], value=numpy_helper.from_array(f32(32, 32, seed=4), "k")),
    ]
    m = make_model(nodes, [vi("x", [2, 64]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2, 64])], inits)
    m.graph.value_info.extend([vi("m", [2, 64]), vi("y0", [2, 64])])
    m.graph.doc_string = "graph doc"
    m.doc_string = "model doc"
    helper.set_model_props(m, {"author": "me", "zeta": "last"})
    fn = helper.make_function("local", "Twice", ["a"], ["b"], [H("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("local", 1))
    return m


@pytest.mark.parametrize("splice_min", [wire._SPLICE_MIN, 0])
def test_rich_model_byte_identical(monkeypatch, splice_min):
    monkeypatch.setattr(wire, "_SPLICE_MIN", splice_min)
    assert_same(rich_model())


def test_unknown_fields_in_nested_messages_are_spliced():
    m = rich_model()
    node = onnx.NodeProto.FromString(data(m.graph.node[0]) + unknown(50))
    m.graph.node[0].CopyFrom(node)
    sub = next(a for a in m.graph.node[2].attribute if a.name == "then_branch").g.initializer[0]
    sub.CopyFrom(TensorProto.FromString(data(sub) + unknown(77)))
    assert data(m).count(unknown(50)) == 1  # the unknown fields are really there
    assert_same(m)


@pytest.mark.parametrize("where", ["model", "graph", "initializer"])
def test_unknown_fields_where_skeletons_are_cut_fall_back(where):
    m = rich_model()
    if where == "model":
        m = onnx.ModelProto.FromString(data(m) + unknown(90))
    elif where == "graph":
        m.graph.CopyFrom(onnx.GraphProto.FromString(data(m.graph) + unknown(90)))
    else:
        m.graph.initializer.append(tensor_with_unknown())
    assert unknown(90) in data(m) or unknown(99) in data(m)
    assert_same(m, spliced=False)


def test_models_without_anything_to_splice():
    assert_same(onnx.ModelProto(ir_version=8, producer_name="no graph"), spliced=False)
    m = rich_model()
    del m.graph.initializer[:]
    assert_same(m, spliced=False)
    m = onnx.ModelProto()
    m.graph.SetInParent()  # an empty graph
    assert_same(m, spliced=False)


def test_large_model_byte_identical_and_saved(tmp_path):
    """~50 MB: lengths of four-byte varints at every level."""
    inits = [numpy_helper.from_array(np.full(1 << 23, i, np.float32), f"w{i}") for i in range(1)]
    inits += [numpy_helper.from_array(f32(1 << 20, seed=i), f"v{i}") for i in range(4)]
    nodes = [H("Add", ["x", "w0"], ["y"])] + [H("Identity", [f"v{i}"], [f"o{i}"]) for i in range(4)]
    m = make_model(nodes, [vi("x", [1 << 23])], [vi("y", [1 << 23])] + [vi(f"o{i}", [1 << 20]) for i in range(4)],
                   inits)
    before = data(m)
    assert len(before) > 48 << 20
    assert written(m) == before
    saved = save_model(m, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == before and saved.file_bytes == len(before)
    assert data(m) == before
    assert listing(tmp_path) == ["out.onnx"]


def test_tiny_cnn_fixture():
    m = onnx.load_model(str(ROOT / "fixtures" / "tiny_cnn.onnx"))
    assert_same(m, spliced=wire.model_pieces(m) is not None)
    assert written(m) == data(m)


def _backend_models():
    base = Path(onnx.__file__).parent / "backend" / "test" / "data"
    found = sorted(glob.glob(str(base / "node" / "*" / "model.onnx")))
    if not found:  # the installed wheel without its node tests: the project's copy, then what the wheel has
        found = sorted(glob.glob(str(ROOT / ".cache" / "onnx-backend-data" / "*" / "node" / "*" / "model.onnx")))
    return found[:200] + sorted(glob.glob(str(base / "*" / "*" / "model.onnx")))


def test_backend_models_byte_identical(monkeypatch):
    monkeypatch.setattr(wire, "_SPLICE_MIN", 0)  # splice every raw_data, however small
    paths = _backend_models()
    assert len(paths) >= 100
    spliced = 0
    for p in paths:
        m = onnx.load_model(p, load_external_data=False)
        before = data(m)
        spliced += wire.model_pieces(m) is not None
        assert written(m) == before, p
        assert data(m) == before, p
    assert spliced >= 20


def test_save_model_writes_the_same_bytes(tmp_path):
    m = rich_model()
    before = data(m)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    saved = save_model(m, out)
    assert out.read_bytes() == before and saved.file_bytes == len(before)
    assert data(m) == before
    assert listing(tmp_path) == ["out.onnx"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    u = os.umask(0)
    os.umask(u)
    return u


def test_crash_while_writing_leaves_old_output_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    crash_writes_under(tmp_path, monkeypatch)
    with pytest.raises(Crash):
        save_model(rich_model(), out)
    monkeypatch.undo()
    assert out.read_bytes() == b"old contents"
    assert listing(tmp_path) == ["out.onnx"]


def test_failure_midway_through_the_weights(tmp_path, monkeypatch):
    """A failure after part of the file is out (here: between two weights)."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    m = rich_model()
    before = data(m)
    real = wire._Tensor.pieces
    calls = []

    def pieces(self):
        calls.append(self)
        if len(calls) == 2:
            raise Crash("midway")
        yield from real(self)

    monkeypatch.setattr(wire._Tensor, "pieces", pieces)
    with pytest.raises(Crash):
        save_model(m, out)
    assert out.read_bytes() == b"old contents"
    assert listing(tmp_path) == ["out.onnx"]
    assert data(m) == before


def test_disk_error_is_one_line_input_error(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bio, "write_model", lambda model, f: full())
    with pytest.raises(bio.InputError) as exc:
        save_model(rich_model(), out)
    assert "No space left on device" in str(exc.value) and "\n" not in str(exc.value)
    assert listing(tmp_path) == []


def test_tensor_changed_while_written_is_refused():
    m = rich_model()
    total, pieces = wire.model_pieces(m)
    next(pieces)
    m.graph.initializer[0].raw_data = b"\0" * 8
    with pytest.raises(RuntimeError, match="changed"):
        b"".join(pieces)


def test_wire_reader():
    t = numpy_helper.from_array(f32(3, 4), "t")
    buf = data(t)
    got = [(n, w) for n, w, _, _ in wire.fields(buf)]
    assert got == [(1, 0), (1, 0), (2, 0), (8, 2), (9, 2)]
    assert wire.fields(buf)[-1][3] == len(buf)
    for n in (0, 1, 127, 128, 300, 1 << 35):
        assert wire._read_varint(wire.varint(n), 0) == (n, len(wire.varint(n)))
    with pytest.raises(ValueError):
        wire.fields(buf[:-1])
    with pytest.raises(ValueError):
        wire.fields(bytes([(5 << 3) | 3]))  # a group
