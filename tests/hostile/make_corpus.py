"""A corpus of malformed and hostile models, and what the CLI must do with each.

Every case builds its files into an empty case folder ``d`` (beside which an
``outside/`` folder holds a secret file that no output may ever contain) and
names the CLI's expected exit code and a phrase of its one-line error.

    python tests/hostile/make_corpus.py OUT_DIR   # writes every case to OUT_DIR/<name>/

``tests/hostile/test_corpus.py`` runs each case through the CLI.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.compiler.models import bomb_model, custom_domain_model

H = helper.make_node
FLOAT = TensorProto.FLOAT
SECRET = b"OUTSIDE-SECRET-7f3a9c-" * 745 + b"OUTSIDE-SECR"  # 16404 bytes; 16384 = one 64x64 float weight
SECRET = SECRET[:16384]
MARKER = b"OUTSIDE-SECRET-7f3a9c-"


@dataclass(frozen=True)
class Case:
    name: str
    area: str  # parsing | versions | structure | tensors | limits | folding | external | output
    build: Callable[[Path], Path]  # writes into the case folder, returns the model path
    code: int = 2
    phrase: str = ""  # must appear in the one-line error (code 2) / must be empty for success
    args: tuple[str, ...] = ("--no-verify",)  # "{d}" is the case folder
    isolated: bool = False  # run in a subprocess under a timeout and a memory cap (could hang or blow up)
    outputs: tuple[str, ...] = ("out.onnx",)  # files a success adds to the case folder
    big: bool = False  # the input is too big to hash: compare size and mtime only


def vi(name, shape, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def model_of(nodes, inputs, outputs, inits=(), opset=17, ir=None, opsets=None):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=opsets or [helper.make_opsetid("", opset)])
    if ir is not None:
        m.ir_version = ir
    return m


def relu_model(**kw):
    return model_of([H("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])], **kw)


def write(d: Path, model: onnx.ModelProto | bytes, name: str = "m.onnx") -> Path:
    p = d / name
    p.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return p


def outside(d: Path) -> Path:
    """The secret file beside the case folder (never to be read into an output)."""
    o = d.parent / "outside"
    o.mkdir(exist_ok=True)
    s = o / "secret.bin"
    if not s.exists():
        s.write_bytes(SECRET)
    return s


# --- parsing ------------------------------------------------------------------

def _ld(field: int, payload: bytes) -> bytes:
    def varint(v):
        out = bytearray()
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def nested_if_bytes(depth: int) -> bytes:
    """A valid model whose If nests ``depth`` subgraph levels deep, encoded by
    hand: protobuf itself refuses to build (or parse) one past its recursion
    limit.  Level i's then-branch is level i-1; every else-branch is Identity(x)."""
    g = helper.make_graph([H("Identity", ["x"], ["y0"])], "g0", [], [vi("y0", [1])]).SerializeToString()
    for i in range(1, depth + 1):
        then_attr = helper.make_attribute("then_branch", helper.make_graph([], "t", [], []))
        then_attr.ClearField("g")
        else_g = helper.make_graph([H("Identity", ["x"], [f"e{i}"])], f"e{i}", [], [vi(f"e{i}", [1])])
        node = H("If", ["c"], [f"y{i}"]).SerializeToString()
        node += _ld(5, then_attr.SerializeToString() + _ld(6, g))
        node += _ld(5, helper.make_attribute("else_branch", else_g).SerializeToString())
        inputs = [vi("c", [], TensorProto.BOOL), vi("x", [1])] if i == depth else []
        g = helper.make_graph([], f"g{i}", inputs, [vi(f"y{i}", [1])]).SerializeToString() + _ld(1, node)
    shell = helper.make_model(helper.make_graph([], "x", [], []), opset_imports=[helper.make_opsetid("", 17)])
    shell.ClearField("graph")
    return shell.SerializeToString() + _ld(7, g)


def nested_if_model(depth: int) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.ParseFromString(nested_if_bytes(depth))
    return m


def p_empty(d):
    return write(d, b"")


def p_garbage(d):
    return write(d, np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def p_truncated(d):
    b = model_of([H("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])],
                 [numpy_helper.from_array(np.ones((64, 64), np.float32), "w")]).SerializeToString()
    return write(d, b[: len(b) // 2])


def p_text(d):
    return write(d, b"hello, I am not a model\n")


def p_tensor_not_model(d):
    return write(d, numpy_helper.from_array(np.ones((4, 4), np.float32), "t").SerializeToString())


def p_gzip(d):
    return write(d, gzip.compress(relu_model().SerializeToString()))


def p_no_graph(d):
    m = relu_model()
    m.ClearField("graph")
    return write(d, m)


def p_no_opset(d):
    m = relu_model()
    del m.opset_import[:]
    return write(d, m)


def p_protobuf_recursion(d):
    return write(d, nested_if_bytes(40))


def nested_type_bytes(depth: int) -> bytes:
    """A graph input typed sequence(sequence(...(tensor))) ``depth`` deep."""
    t = helper.make_tensor_type_proto(FLOAT, [1]).SerializeToString()
    for _ in range(depth):
        t = _ld(4, _ld(1, t))  # TypeProto.sequence_type { elem_type }
    vi_bytes = onnx.ValueInfoProto(name="s").SerializeToString() + _ld(2, t)
    g = helper.make_graph([H("Identity", ["s"], ["y"])], "g", [], []).SerializeToString()
    g += _ld(11, vi_bytes) + _ld(12, vi_bytes.replace(b"\n\x01s", b"\n\x01y", 1))
    shell = helper.make_model(helper.make_graph([], "x", [], []), opset_imports=[helper.make_opsetid("", 17)])
    shell.ClearField("graph")
    return shell.SerializeToString() + _ld(7, g)


def p_deep_type(d):
    return write(d, nested_type_bytes(60))


def p_deep_type_ok(d):
    return write(d, nested_type_bytes(45))


def p_over_2gb(d):
    p = d / "m.onnx"
    with open(p, "wb") as f:
        f.write(relu_model().SerializeToString())
        f.truncate((1 << 31) + 4096)  # sparse: nothing is really written
    return p


def p_folder(d):
    (d / "m.onnx").mkdir()
    return d / "m.onnx"


def p_fifo(d):
    os.mkfifo(d / "m.onnx")
    return d / "m.onnx"


def p_device(d):
    os.symlink("/dev/zero", d / "m.onnx")
    return d / "m.onnx"


def p_missing(d):
    return d / "m.onnx"


# --- versions -------------------------------------------------------------------

def v_ir_new(d):
    return write(d, relu_model(ir=99))


def v_ir_old(d):
    return write(d, relu_model(ir=2))


def v_opset_new(d):
    return write(d, relu_model(opset=999))


def v_opset_zero(d):
    return write(d, relu_model(opset=0))


def v_opset_twice(d):
    return write(d, relu_model(opsets=[helper.make_opsetid("", 17), helper.make_opsetid("", 18)]))


def v_op_too_new(d):  # Gelu arrives in opset 20
    return write(d, model_of([H("Gelu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])], opset=17))


def v_unknown_standard_op(d):
    return write(d, model_of([H("FooBar", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])]))


def v_domain_not_imported(d):
    return write(d, model_of([H("MyOp", ["x"], ["y"], domain="com.example")], [vi("x", [2, 3])], [vi("y", [2, 3])]))


def v_custom_op(d):
    return write(d, custom_domain_model())


# --- graph structure ------------------------------------------------------------

def s_cycle(d):
    return write(d, model_of([H("Relu", ["b"], ["a"], name="n1"), H("Neg", ["a"], ["b"], name="n2"),
                              H("Add", ["x", "a"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])]))


def s_cycle_via_subgraph(d):
    then_g = helper.make_graph([H("Identity", ["z"], ["t"])], "then", [], [vi("t", [2, 3])])
    else_g = helper.make_graph([H("Identity", ["x"], ["e"])], "else", [], [vi("e", [2, 3])])
    return write(d, model_of([H("If", ["c"], ["o"], then_branch=then_g, else_branch=else_g, name="if"),
                              H("Relu", ["o"], ["z"], name="relu")],
                             [vi("c", [], TensorProto.BOOL), vi("x", [2, 3])], [vi("z", [2, 3])]))


def s_undefined(d):
    return write(d, model_of([H("Add", ["x", "ghost"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])]))


def s_undefined_in_subgraph(d):
    then_g = helper.make_graph([H("Identity", ["ghost"], ["t"])], "then", [], [vi("t", [2, 3])])
    else_g = helper.make_graph([H("Identity", ["x"], ["e"])], "else", [], [vi("e", [2, 3])])
    return write(d, model_of([H("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                             [vi("c", [], TensorProto.BOOL), vi("x", [2, 3])], [vi("y", [2, 3])]))


def s_defined_twice(d):
    return write(d, model_of([H("Relu", ["x"], ["y"], name="a"), H("Neg", ["x"], ["y"], name="b")],
                             [vi("x", [2, 3])], [vi("y", [2, 3])]))


def s_output_shadows_input(d):
    return write(d, model_of([H("Relu", ["x"], ["x"])], [vi("x", [2, 3])], [vi("x", [2, 3])]))


def s_duplicate_input(d):
    return write(d, model_of([H("Add", ["x", "x"], ["y"])], [vi("x", [2, 3]), vi("x", [2, 3])], [vi("y", [2, 3])]))


def s_duplicate_initializer(d):
    w = np.ones((2, 3), np.float32)
    return write(d, model_of([H("Add", ["x", "w"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])],
                             [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w * 2, "w")]))


def s_output_not_produced(d):
    return write(d, model_of([H("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3]), vi("nowhere", [2, 3])]))


def s_unsorted(d):
    return write(d, model_of([H("Relu", ["a"], ["y"], name="second"), H("Neg", ["x"], ["a"], name="first")],
                             [vi("x", [2, 3])], [vi("y", [2, 3])]))


def s_invalid_utf8(d):
    b = relu_model().SerializeToString()
    assert b.count(b"Relu") == 1
    return write(d, b.replace(b"Relu", b"\x80elu"))


def s_declared_shape_lies(d):
    """The output declares (2, 3); Pad makes (2, 4): a pass trusting the
    declaration would drop the Slice that follows as a no-op."""
    pads = numpy_helper.from_array(np.array([0, 1, 0, 0], np.int64), "p")
    return write(d, model_of([H("Pad", ["x", "p"], ["t"]), H("Relu", ["t"], ["y"])], [vi("x", [2, 3])],
                             [vi("t", [2, 3]), vi("y", [2, 4])], [pads]))


def s_no_op_type(d):
    return write(d, model_of([H("", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])]))


# --- tensors --------------------------------------------------------------------

def _add_const(t: TensorProto, shape=(2, 3)):
    return model_of([H("Add", ["x", t.name], ["y"])], [vi("x", list(shape))], [vi("y", list(shape))], [t])


def t_raw_short(d):
    t = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    t.raw_data = t.raw_data[:10]
    return write(d, _add_const(t))


def t_negative_dim(d):
    t = TensorProto(name="w", data_type=FLOAT, dims=[2, -3])
    return write(d, _add_const(t))


def t_overflow_dims(d):
    t = TensorProto(name="w", data_type=FLOAT, dims=[1 << 40, 1 << 40])
    t.raw_data = b"\0" * 16
    return write(d, _add_const(t))


def t_float_data_count(d):
    t = TensorProto(name="w", data_type=FLOAT, dims=[2, 3], float_data=[1.0, 2.0])
    return write(d, _add_const(t))


def t_unknown_dtype(d):
    t = TensorProto(name="w", data_type=99, dims=[2, 3], raw_data=b"\0" * 24)
    return write(d, _add_const(t))


def t_negative_input_dim(d):
    return write(d, model_of([H("Relu", ["x"], ["y"])], [vi("x", [2, -5])], [vi("y", [2, 3])]))


def t_attribute_tensor_raw(d):
    v = numpy_helper.from_array(np.ones(6, np.float32))
    v.raw_data = v.raw_data + b"\0" * 7
    return write(d, model_of([H("Constant", [], ["k"], value=v), H("Add", ["x", "k"], ["y"])],
                             [vi("x", [6])], [vi("y", [6])]))


def t_string_raw(d):
    t = TensorProto(name="w", data_type=TensorProto.STRING, dims=[2], raw_data=b"abcd")
    return write(d, model_of([H("Identity", ["w"], ["y"])], [], [vi("y", [2], TensorProto.STRING)], [t]))


def t_huge_verify_input(d):
    return write(d, model_of([H("Relu", ["x"], ["y"])], [vi("x", [1 << 20, 1 << 20])], [vi("y", [1 << 20, 1 << 20])]))


# --- limits -----------------------------------------------------------------------

def l_many_nodes(d):
    nodes = [H("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(10)]
    return write(d, model_of(nodes, [vi("v0", [2])], [vi("v10", [2])]))


def l_deep_subgraphs(d):
    return write(d, nested_if_bytes(20))


# --- folding bombs ----------------------------------------------------------------

def f_bomb(d):
    return write(d, bomb_model())


def f_bomb_scalar_shape(d):
    """ConstantOfShape of a shape read from a Reshape chain: 2^62 elements."""
    one = numpy_helper.from_array(np.ones(1, np.float32))
    shape = numpy_helper.from_array(np.array([1 << 31, 1 << 31], np.int64), "s")
    return write(d, model_of([H("Identity", ["s"], ["s2"]), H("ConstantOfShape", ["s2"], ["a"], value=one),
                              H("ReduceSum", ["a"], ["r"], keepdims=0), H("Add", ["x", "r"], ["y"])],
                             [vi("x", [])], [vi("y", [])], [shape]))


# --- external data ----------------------------------------------------------------

W = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096


def ext_tensor(name="w", arr=W, **entries) -> TensorProto:
    t = TensorProto(name=name, data_type=FLOAT, dims=list(arr.shape))
    t.data_location = TensorProto.EXTERNAL
    for k, v in entries.items():
        e = t.external_data.add()
        e.key, e.value = k, str(v)
    return t


def ext_model(d, data: bytes | None = W.tobytes(), **entries) -> Path:
    entries = entries or {"location": "w.bin", "offset": 0, "length": W.nbytes}
    if data is not None:
        (d / "w.bin").write_bytes(data)
    m = model_of([H("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])], [ext_tensor(**entries)])
    return write(d, m)


def e_ok(d):
    return ext_model(d)


def e_dotdot(d):
    outside(d)
    return ext_model(d, None, location="../outside/secret.bin", offset=0, length=W.nbytes)


def e_absolute(d):
    return ext_model(d, None, location=str(outside(d)), offset=0, length=W.nbytes)


def e_symlink_out(d):
    os.symlink(outside(d), d / "w.bin")
    return ext_model(d, None)


def e_symlink_dir_out(d):
    os.symlink(outside(d).parent, d / "sub")
    return ext_model(d, None, location="sub/secret.bin", offset=0, length=W.nbytes)


def e_hardlink(d):
    os.link(outside(d), d / "w.bin")
    return ext_model(d, None)


def e_fifo(d):
    os.mkfifo(d / "w.bin")
    return ext_model(d, None)


def e_device(d):
    os.symlink("/dev/zero", d / "w.bin")
    return ext_model(d, None)


def e_folder(d):
    (d / "w.bin").mkdir()
    return ext_model(d, None)


def e_missing(d):
    return ext_model(d, None)


def e_offset_beyond(d):
    return ext_model(d, location="w.bin", offset=1 << 20, length=W.nbytes)


def e_length_beyond(d):
    return ext_model(d, location="w.bin", offset=8, length=W.nbytes)


def e_length_disagrees(d):
    return ext_model(d, location="w.bin", offset=0, length=W.nbytes // 2)


def e_no_length_short_file(d):
    return ext_model(d, W.tobytes()[:100], location="w.bin")


def e_bad_offset(d):
    return ext_model(d, location="w.bin", offset="abc", length=W.nbytes)


def e_negative_offset(d):
    return ext_model(d, location="w.bin", offset=-5, length=W.nbytes)


def e_no_location(d):
    return ext_model(d, offset=0, length=W.nbytes)


def e_backslash(d):
    outside(d)
    return ext_model(d, None, location="..\\outside\\secret.bin", offset=0, length=W.nbytes)


def e_duplicate_key(d):
    m_path = ext_model(d)
    m = onnx.load_model(str(m_path), load_external_data=False)
    e = m.graph.initializer[0].external_data.add()
    e.key, e.value = "location", "../outside/secret.bin"
    return write(d, m)


def e_hostile_key(d):  # onnx's ExternalDataInfo would setattr this; ours ignores unknown keys
    return ext_model(d, location="w.bin", offset=0, length=W.nbytes, __class__="x")


def e_in_subgraph(d):
    outside(d)
    t = ext_tensor(location="../outside/secret.bin", offset=0, length=W.nbytes)
    then_g = helper.make_graph([H("MatMul", ["x", "w"], ["t"])], "then", [], [vi("t", [2, 64])], [t])
    else_g = helper.make_graph([H("Identity", ["x"], ["e"])], "else", [], [vi("e", [2, 64])])
    return write(d, model_of([H("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
                             [vi("c", [], TensorProto.BOOL), vi("x", [2, 64])], [vi("y", [2, 64])]))


def e_in_attribute(d):
    outside(d)
    t = ext_tensor(name="k", location="../outside/secret.bin", offset=0, length=W.nbytes)
    return write(d, model_of([H("Constant", [], ["k"], value=t), H("MatMul", ["x", "k"], ["y"])],
                             [vi("x", [2, 64])], [vi("y", [2, 64])]))


def e_string(d):
    t = ext_tensor(arr=np.array(["a", "b"]), location="w.bin", offset=0, length=2)
    t.data_type = TensorProto.STRING
    (d / "w.bin").write_bytes(b"ab")
    return write(d, model_of([H("Identity", ["w"], ["y"])], [], [vi("y", [2], TensorProto.STRING)], [t]))


# --- output side --------------------------------------------------------------------

def o_model(d):
    return write(d, relu_model())


def o_data_is_folder(d):
    (d / "out.onnx.data").mkdir()
    return ext_model(d)


def o_is_folder(d):
    (d / "out.onnx").mkdir()
    return write(d, relu_model())


CASES: list[Case] = [
    # parsing
    Case("empty_file", "parsing", p_empty, phrase="empty file"),
    Case("random_bytes", "parsing", p_garbage, phrase="not an ONNX model"),
    Case("truncated", "parsing", p_truncated, phrase="truncated ONNX model"),
    Case("text_file", "parsing", p_text, phrase="not an ONNX model"),
    Case("tensor_not_model", "parsing", p_tensor_not_model, phrase="not an ONNX model"),
    Case("gzipped_model", "parsing", p_gzip, phrase="not an ONNX model"),
    Case("no_graph", "parsing", p_no_graph, phrase="no graph"),
    Case("no_opset_import", "parsing", p_no_opset, phrase="no opset import"),
    Case("protobuf_recursion", "parsing", p_protobuf_recursion, phrase="protobuf's recursion limit", isolated=True),
    Case("deep_type_nesting", "parsing", p_deep_type, phrase="protobuf's recursion limit", isolated=True),
    Case("deep_type_within_limit", "parsing", p_deep_type_ok, code=0),
    Case("over_2gb_file", "parsing", p_over_2gb, phrase="over protobuf's 2 GB limit", isolated=True, big=True),
    Case("model_is_folder", "parsing", p_folder, phrase="not a regular file (a folder)"),
    Case("model_is_fifo", "parsing", p_fifo, phrase="not a regular file (a FIFO)", isolated=True),
    Case("model_is_device", "parsing", p_device, phrase="not a regular file (a device file)", isolated=True),
    Case("model_missing", "parsing", p_missing, phrase="no such file"),
    # versions
    Case("ir_version_99", "versions", v_ir_new, phrase="IR version 99 is not supported"),
    Case("ir_version_2", "versions", v_ir_old, phrase="IR version 2 is not supported"),
    Case("opset_999", "versions", v_opset_new, phrase="opset 999 of domain 'ai.onnx' is newer"),
    Case("opset_0", "versions", v_opset_zero, phrase="opset version 0"),
    Case("opset_imported_twice", "versions", v_opset_twice, phrase="imported twice"),
    Case("op_newer_than_opset", "versions", v_op_too_new, phrase="op 'Gelu' does not exist at opset 17"),
    Case("unknown_standard_op", "versions", v_unknown_standard_op, phrase="unknown op 'FooBar'"),
    Case("domain_not_imported", "versions", v_domain_not_imported, phrase="which the model does not import"),
    Case("custom_op_passthrough", "versions", v_custom_op, code=0),
    Case("custom_op_verify", "versions", v_custom_op, phrase="cannot verify", args=(), isolated=True),
    # graph structure
    Case("cycle", "structure", s_cycle, phrase="cycle in the graph"),
    Case("cycle_through_subgraph", "structure", s_cycle_via_subgraph, phrase="cycle in the graph"),
    Case("undefined_input", "structure", s_undefined, phrase="reads 'ghost', which is not defined"),
    Case("undefined_in_subgraph", "structure", s_undefined_in_subgraph, phrase="reads 'ghost', which is not defined"),
    Case("output_defined_twice", "structure", s_defined_twice, phrase="name 'y' is defined twice"),
    Case("node_redefines_input", "structure", s_output_shadows_input, phrase="name 'x' is defined twice"),
    Case("duplicate_graph_input", "structure", s_duplicate_input, phrase="duplicate input name 'x'"),
    Case("duplicate_initializer", "structure", s_duplicate_initializer, phrase="duplicate initializer name 'w'"),
    Case("output_not_produced", "structure", s_output_not_produced, phrase="output 'nowhere' is not produced"),
    # onnxruntime's fp16 converter writes such graphs and ONNX Runtime sorts them: sorted, with a warning
    Case("unsorted_nodes", "structure", s_unsorted, code=0, args=()),
    Case("empty_op_type", "structure", s_no_op_type, phrase="has no op_type"),
    Case("declared_shape_lies", "structure", s_declared_shape_lies, phrase="contradicts what Pad computes"),
    Case("invalid_utf8_op_type", "structure", s_invalid_utf8, phrase="NodeProto.op_type holds invalid UTF-8"),
    # tensors
    Case("raw_data_short", "tensors", t_raw_short, phrase="raw data has 10 bytes"),
    Case("negative_dim", "tensors", t_negative_dim, phrase="negative dimension -3"),
    Case("overflowing_dims", "tensors", t_overflow_dims, phrase="overflow"),
    Case("float_data_count", "tensors", t_float_data_count, phrase="float_data has 2 values"),
    Case("unknown_data_type", "tensors", t_unknown_dtype, phrase="unknown data type 99"),
    Case("negative_input_dim", "tensors", t_negative_input_dim, phrase="negative dimension (-5)"),
    Case("attribute_tensor_raw", "tensors", t_attribute_tensor_raw, phrase="raw data has 31 bytes"),
    Case("string_raw_data", "tensors", t_string_raw, phrase="string tensor with raw_data"),
    Case("huge_verify_inputs", "tensors", t_huge_verify_input, phrase="generated inputs", args=()),
    # limits
    Case("over_max_nodes", "limits", l_many_nodes, phrase="raise it with --max-nodes", args=("--no-verify", "--max-nodes", "5")),
    Case("over_max_depth", "limits", l_deep_subgraphs, phrase="raise it with --max-depth"),
    Case("within_raised_depth", "limits", l_deep_subgraphs, code=0, args=("--no-verify", "--max-depth", "24")),
    # folding bombs
    Case("fold_bomb", "folding", f_bomb, code=0, isolated=True),
    Case("fold_bomb_verify", "folding", f_bomb, phrase="cannot verify", args=(), isolated=True),
    Case("fold_bomb_2_62", "folding", f_bomb_scalar_shape, code=0, isolated=True),
    # external data
    Case("external_ok", "external", e_ok, code=0, outputs=("out.onnx", "out.onnx.data")),
    Case("external_dotdot", "external", e_dotdot, phrase="leads outside the model's folder (..)"),
    Case("external_absolute", "external", e_absolute, phrase="is an absolute path"),
    Case("external_symlink_out", "external", e_symlink_out, phrase="leads outside the model's folder (symlink)"),
    Case("external_symlinked_folder", "external", e_symlink_dir_out, phrase="leads outside the model's folder (symlink)"),
    Case("external_hard_link", "external", e_hardlink, phrase="hard links"),
    Case("external_fifo", "external", e_fifo, phrase="is a FIFO", isolated=True),
    Case("external_device", "external", e_device, phrase="leads outside the model's folder", isolated=True),
    Case("external_folder", "external", e_folder, phrase="is a folder"),
    Case("external_missing", "external", e_missing, phrase="is missing"),
    Case("external_offset_beyond", "external", e_offset_beyond, phrase="beyond the end"),
    Case("external_length_beyond", "external", e_length_beyond, phrase="beyond the end"),
    Case("external_length_disagrees", "external", e_length_disagrees, phrase="disagrees with dims"),
    Case("external_short_file", "external", e_no_length_short_file, phrase="disagrees with dims"),
    Case("external_bad_offset", "external", e_bad_offset, phrase="offset 'abc' is not a non-negative integer"),
    Case("external_negative_offset", "external", e_negative_offset, phrase="offset '-5' is not a non-negative integer"),
    Case("external_no_location", "external", e_no_location, phrase="has no location"),
    Case("external_backslash", "external", e_backslash, phrase="not a plain relative path"),
    Case("external_duplicate_key", "external", e_duplicate_key, phrase="given twice"),
    Case("external_hostile_key", "external", e_hostile_key, code=0, outputs=("out.onnx", "out.onnx.data")),
    Case("external_in_subgraph", "external", e_in_subgraph, phrase="leads outside the model's folder"),
    Case("external_in_attribute", "external", e_in_attribute, phrase="leads outside the model's folder"),
    Case("external_string", "external", e_string, phrase="string data cannot be stored externally"),
    # output side
    Case("output_is_input", "output", o_model, phrase="refusing to overwrite the input", args=("--no-verify", "-o", "{d}/m.onnx")),
    Case("output_folder_missing", "output", o_model, phrase="does not exist", args=("--no-verify", "-o", "{d}/no/out.onnx")),
    Case("output_is_folder", "output", o_is_folder, phrase="exists and is not a regular file"),
    Case("output_data_is_folder", "output", o_data_is_folder, phrase="exists and is not a regular file"),
]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_corpus.py OUT_DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    root.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        d = root / case.name
        d.mkdir()
        if case.big:
            continue  # a 2 GB sparse file is only made inside the test
        case.build(d)
        print(f"{case.name:30s} {case.area:10s} exit {case.code}  {case.phrase}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
