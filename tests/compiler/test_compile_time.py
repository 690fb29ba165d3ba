"""Compile-time guards (issue 17, acceptance 3): what a plain `--no-verify -q`
compile imports, the wire-level raw_data sizes validation uses instead of
copying each weight, and copies that skip a field without reading it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler.errors import InputError
from beats_compiler.io import load_model
from beats_compiler.proto import copy_except
from beats_compiler.validate import raw_data_sizes

ROOT = Path(__file__).resolve().parents[2]


def _model(n_weights=3):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"w{i}") for i in range(n_weights)]
    inits.append(helper.make_tensor("ints", TensorProto.INT64, [2], [1, 2]))  # int64_data, no raw_data
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["y0"])]
    nodes += [helper.make_node("MatMul", [f"y{i - 1}", f"w{i}"], [f"y{i}"]) for i in range(1, n_weights)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info(f"y{n_weights - 1}", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_raw_data_sizes_follow_protobuf_merging():
    data = _model().SerializeToString()
    # A second graph field merges into the first (initializers concatenate); of two raw_data
    # fields in one tensor the last wins.
    t = onnx.TensorProto(name="extra", data_type=TensorProto.FLOAT, dims=[1], raw_data=b"abcdefgh")
    tail = onnx.ModelProto(graph=onnx.GraphProto(initializer=[t])).SerializeToString()
    tail += onnx.ModelProto(graph=onnx.GraphProto(initializer=[onnx.TensorProto(raw_data=b"xy")])).SerializeToString()
    blob = data + tail
    m = onnx.ModelProto()
    m.ParseFromString(blob)
    want = [len(t.raw_data) if t.HasField("raw_data") else None for t in m.graph.initializer]
    assert raw_data_sizes(blob) == want == [64, 64, 64, None, 8, 2]
    assert raw_data_sizes(data[:-3]) is None  # truncated: not trusted


def test_load_refuses_raw_data_of_the_wrong_size(tmp_path):
    m = _model()
    m.graph.initializer[1].raw_data = b"\0" * 60  # dims [4, 4] float need 64
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(InputError, match="raw data has 60 bytes"):
        load_model(p)


def test_copy_except_copies_everything_else():
    t = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    t.doc_string = "d"
    e = t.external_data.add()
    e.key, e.value = "k", "v"
    c = copy_except(t, "raw_data")
    assert not c.HasField("raw_data")
    c.raw_data = t.raw_data
    assert c == t
    g = copy_except(_model().graph, "initializer")
    assert len(g.initializer) == 0 and len(g.node) == 3 and g.name == "g"


def test_no_verify_compile_imports_neither_onnxruntime_nor_networkx_nor_rich(tmp_path):
    """Each of these costs 60-700 ms of process start on this machine class and is not used
    by a quiet compile without verification."""
    p = tmp_path / "m.onnx"
    p.write_bytes(_model().SerializeToString())
    code = ("import sys\nfrom beats_compiler.cli import main\n"
            f"rc = main([{str(p)!r}, '-o', {str(tmp_path / 'out.onnx')!r}, '-q', '--no-verify'])\n"
            "print(rc, sorted(m for m in ('onnxruntime', 'networkx', 'rich') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "0 []"
    assert (tmp_path / "out.onnx").exists()
