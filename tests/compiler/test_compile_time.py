"""Compile-time guards (issue 17, acceptance 3): what a plain `--no-verify -q`
compile imports, the wire-level raw_data sizes validation uses instead of
copying each weight, and copies that skip a field without reading it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from beats_compiler.errors import InputError
from beats_compiler.io import load_model
from beats_compiler.proto import copy_except
from beats_compiler.validate import raw_data_sizes
import passes.dedupe_initializers as di
import passes.dedupe_transposed_initializers as td
import passes.graph
from passes import DedupeInitializers, to_graph, to_model
from tests.helpers import assert_same_on_ort, f32, init_names, make_model, vi
from tests.passes.test_dedupe_transposed_initializers import E, V, lm_head

H = helper.make_node

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


# --- dedupe probes read from the model file (graph.file_ranges) ----------------------


def _loaded(tmp_path, model):
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    return p, load_model(p)


def test_probes_of_weights_read_from_the_model_file_are_sampled_there(tmp_path, monkeypatch):
    """A weight parsed from the model file is probed from its raw_data in the file (no
    copy out of its TensorProto); the probes equal the in-memory ones, and the pass
    finds the same pair as without the file."""
    path, loaded = _loaded(tmp_path, lm_head([6, E]))
    g, env = to_graph(loaded.model)
    consts = {c.name: c for c in g.tensors().values() if isinstance(c, gs.Constant)}
    with passes.graph.file_ranges(loaded.model, path, loaded.raw_ranges):
        from_file = {n: td._file_probes(c) for n, c in consts.items() if n in ("wte", "wt")}
    assert all(v is not None for v in from_file.values())
    for n, probe in from_file.items():
        assert probe == td._probes(td._Bits(consts[n])), n
    copies = []
    real = td._matrix
    monkeypatch.setattr(td, "_matrix", lambda c: copies.append(c.name) or real(c))
    with passes.graph.file_ranges(loaded.model, path, loaded.raw_ranges):
        res = td.DedupeTransposedInitializers(min_bytes=0)(g)
    assert res.stats.get("merged") == 1
    assert len(copies) == 2  # the pair's full comparison, from memory; no copy for a probe


def test_a_model_file_changed_after_loading_only_makes_probes_miss(tmp_path):
    """The file is a hint: overwritten after loading, its samples no longer match, the
    pair is not merged (never a merge of tensors whose bytes in memory differ)."""
    path, loaded = _loaded(tmp_path, lm_head([6, E]))
    other = lm_head([6, E], wt=f32(E, V, seed=9))  # same layout, other bytes for wt
    onnx.save(other, str(path))
    g, _ = to_graph(loaded.model)
    with passes.graph.file_ranges(loaded.model, path, loaded.raw_ranges):
        res = td.DedupeTransposedInitializers(min_bytes=0)(g)
    assert not res.stats.get("merged")
    g, _ = to_graph(loaded.model)  # without the file: the pair in memory is found
    assert td.DedupeTransposedInitializers(min_bytes=0)(g).stats.get("merged") == 1


def test_large_weights_read_from_the_model_file_are_probed_there(tmp_path, monkeypatch):
    """Two equal 2 MiB weights and a third differing only past the first 64 KiB, loaded
    from a file: the probes (first 64 KiB) come from the file, the full comparison from
    memory; the equal pair merges, the third stays."""
    a = f32(512, 1024, seed=3)
    c = a.copy()
    c[-1, -1] += 1
    m = make_model([H("Add", ["x", "a"], ["s"]), H("Add", ["s", "b"], ["t"]), H("Add", ["t", "c"], ["y"])],
                   [vi("x", [512, 1024])], [vi("y", [512, 1024])], {"a": a, "b": a.copy(), "c": c})
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    loaded = load_model(path)
    reads = []
    real = di.file_bytes
    monkeypatch.setattr(di, "file_bytes", lambda *args: reads.append(args[0].name) or real(*args))
    g, env = to_graph(loaded.model)
    with passes.graph.file_ranges(loaded.model, path, loaded.raw_ranges):
        res = DedupeInitializers()(g)
    assert sorted(reads) == ["a", "b", "c"] and res.stats["merged"] == 1
    out = to_model(g, env)
    assert init_names(out) == ["a", "c"]
    assert_same_on_ort(m, out)


def test_a_model_file_replaced_by_a_fifo_is_not_read_for_probes(tmp_path):
    """The file is read again during the passes: a FIFO in its place since loading is
    skipped at once (never a hang on its open), and the probes come from memory."""
    import os

    path, loaded = _loaded(tmp_path, lm_head([6, E]))
    path.unlink()
    os.mkfifo(path)
    g, _ = to_graph(loaded.model)
    with passes.graph.file_ranges(loaded.model, path, loaded.raw_ranges):
        wte = next(c for c in g.tensors().values() if isinstance(c, gs.Constant) and c.name == "wte")
        assert passes.graph.file_bytes(wte, np.zeros(1, np.int64), 4) is None
        assert td.DedupeTransposedInitializers(min_bytes=0)(g).stats.get("merged") == 1
