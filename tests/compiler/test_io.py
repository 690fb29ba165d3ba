"""Model I/O: loading (with external data), atomic saving, path safety, and
what compile keeps unchanged in the model."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper, numpy_helper

from beats_compiler import InputError, compile, load_model, save_model
from beats_compiler import io as bio
from beats_compiler.io import check_output_path, default_output_path
from tests.compiler.models import custom_domain_model, rich_model
from tests.helpers import assert_same_on_ort, f32, make_model, ops, run, vi

H = helper.make_node
CLI = [sys.executable, "-m", "beats_compiler.cli"]


def data(model):
    return model.SerializeToString(deterministic=True)


def weighty_model(seed=0):
    """Weights big enough (16 KiB) to go to external data."""
    return make_model([H("MatMul", ["x", "w"], ["m"]), H("Add", ["m", "b"], ["y"])], [vi("x", [2, 64])],
                      [vi("y", [2, 64])], {"w": f32(64, 64, seed=seed), "b": f32(64, seed=seed + 1)})


def save_external(model, path, location=None):
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=1024)


def listing(folder):
    return sorted(os.listdir(folder))


# --- loading ----------------------------------------------------------------

def test_load_plain(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(data(weighty_model()))
    lm = load_model(p)
    assert lm.path == p and not lm.uses_external_data and lm.file_bytes == p.stat().st_size
    assert data(lm.model) == data(weighty_model())


def test_load_external(tmp_path):
    p = tmp_path / "m.onnx"
    save_external(weighty_model(), p)
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    lm = load_model(p)
    assert lm.uses_external_data and lm.external_files == [tmp_path / "m.onnx.data"]
    assert lm.file_bytes == p.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    w = next(t for t in lm.model.graph.initializer if t.name == "w")
    assert not external_data_helper.uses_external_data(w)
    np.testing.assert_array_equal(numpy_helper.to_array(w), f32(64, 64))


def test_load_external_in_subfolder(tmp_path):
    (tmp_path / "weights").mkdir()
    p = tmp_path / "m.onnx"
    save_external(weighty_model(), p, location="weights/w.bin")
    lm = load_model(p)
    assert lm.external_files == [tmp_path / "weights" / "w.bin"]


@pytest.mark.parametrize("problem", ["outside", "absolute", "missing", "short"])
def test_load_bad_external_data(tmp_path, problem):
    p = tmp_path / "m.onnx"
    save_external(weighty_model(), p)
    m = onnx.load_model(str(p), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "w")
    loc = next(e for e in t.external_data if e.key == "location")
    if problem == "outside":
        loc.value = "../secret.data"
        (tmp_path.parent / "secret.data").write_bytes(b"\0" * 65536)
    elif problem == "absolute":
        loc.value = str(tmp_path / "m.onnx.data")
    elif problem == "missing":
        loc.value = "nope.data"
    else:
        (tmp_path / "m.onnx.data").write_bytes(b"\0" * 10)
    p.write_bytes(m.SerializeToString())
    with pytest.raises(InputError, match="external data"):
        load_model(p)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "garbage", "not_a_model"])
def test_load_errors_are_input_errors(tmp_path, kind):
    p = tmp_path / "m.onnx"
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(bytes(range(256)) * 4)
    elif kind == "not_a_model":
        p.write_bytes(onnx.TensorProto(name="t").SerializeToString())
    with pytest.raises(InputError) as exc:
        load_model(p)
    assert str(p) in str(exc.value) and "\n" not in str(exc.value)


# --- saving -----------------------------------------------------------------

def test_save_plain_is_exact_and_leaves_nothing_else(tmp_path):
    m = weighty_model()
    before = data(m)
    saved = save_model(m, tmp_path / "out.onnx")
    assert listing(tmp_path) == ["out.onnx"]
    assert saved.data_path is None and saved.file_bytes == (tmp_path / "out.onnx").stat().st_size
    assert (tmp_path / "out.onnx").read_bytes() == before
    assert data(m) == before


def test_save_replaces_existing_file(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    save_model(weighty_model(), out)
    assert out.read_bytes() == data(weighty_model())
    assert listing(tmp_path) == ["out.onnx"]


class Crash(Exception):
    pass


class HalfWriter:
    """A file that writes half of its first write, then fails (disk full)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, b):
        self.f.write(b[: len(b) // 2])
        self.f.flush()
        raise Crash("disk full")

    def __getattr__(self, name):
        return getattr(self.f, name)


def crash_writes_under(folder, monkeypatch):
    """Every file opened for writing under ``folder`` fails mid-write, however
    the saver opens it (``open`` or ``os.fdopen`` of a temporary file)."""
    import builtins

    real_open, real_fdopen = builtins.open, os.fdopen

    def opener(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        inside = isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(folder.resolve())
        return HalfWriter(f) if inside and any(c in mode for c in "wax+") else f

    def fdopener(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        return HalfWriter(f) if any(c in mode for c in "wax+") else f

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(os, "fdopen", fdopener)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace", "interrupt"])
def test_save_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")

    def boom(*a, **k):
        raise KeyboardInterrupt if fail_at == "interrupt" else Crash(fail_at)

    if fail_at == "write":
        crash_writes_under(tmp_path, monkeypatch)
    elif fail_at in ("fsync", "interrupt"):
        monkeypatch.setattr(os, "fsync", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises((Crash, KeyboardInterrupt)):
        save_model(weighty_model(), out)
    monkeypatch.undo()
    assert out.read_bytes() == b"old contents"
    assert listing(tmp_path) == ["out.onnx"]


def test_save_external_when_requested(tmp_path):
    m = weighty_model()
    before = data(m)
    saved = save_model(m, tmp_path / "out.onnx", external_data=True)
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]
    assert saved.data_path == tmp_path / "out.onnx.data"
    assert saved.file_bytes == sum((tmp_path / n).stat().st_size for n in listing(tmp_path))
    assert data(m) == before
    raw = onnx.load_model(str(tmp_path / "out.onnx"), load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in raw.graph.initializer)
    back = load_model(tmp_path / "out.onnx").model
    feeds = {"x": f32(2, 64)}
    np.testing.assert_array_equal(run(back, feeds)[0], run(m, feeds)[0])


def test_save_external_keeps_string_tensors_inline(tmp_path):
    """Strings cannot be stored externally: a large string initializer stays in
    the model file (it used to be written as object pointers, unloadable)."""
    m = weighty_model()
    m.graph.initializer.append(helper.make_tensor("vocab", onnx.TensorProto.STRING, [200], [b"token"] * 200))
    m.graph.node.append(H("Identity", ["vocab"], ["v"]))
    m.graph.output.append(helper.make_tensor_value_info("v", onnx.TensorProto.STRING, [200]))
    save_model(m, tmp_path / "out.onnx", external_data=True)
    raw = onnx.load_model(str(tmp_path / "out.onnx"), load_external_data=False)
    vocab = next(t for t in raw.graph.initializer if t.name == "vocab")
    assert not external_data_helper.uses_external_data(vocab) and list(vocab.string_data) == [b"token"] * 200
    assert external_data_helper.uses_external_data(next(t for t in raw.graph.initializer if t.name == "w"))
    load_model(tmp_path / "out.onnx")


def test_save_external_automatic_over_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(bio, "PROTOBUF_LIMIT", 4096)  # stand-in for 2 GB
    save_model(weighty_model(), tmp_path / "out.onnx")
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]


def test_save_external_rehomes_loaded_external_tensors(tmp_path):
    src = tmp_path / "in.onnx"
    save_external(weighty_model(), src)
    lm = load_model(src)
    (tmp_path / "o").mkdir()
    save_model(lm.model, tmp_path / "o" / "out.onnx", external_data=True)
    assert listing(tmp_path / "o") == ["out.onnx", "out.onnx.data"]
    assert data(load_model(tmp_path / "o" / "out.onnx").model) == data(lm.model)


@pytest.mark.parametrize("earlier_output", [False, True])
def test_save_external_failure_mid_write_leaves_no_partial_output(tmp_path, monkeypatch, earlier_output):
    out = tmp_path / "out.onnx"
    if earlier_output:
        save_model(weighty_model(seed=0), out, external_data=True)
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}
    crash_writes_under(tmp_path, monkeypatch)
    with pytest.raises(Crash):
        save_model(weighty_model(seed=5), out, external_data=True)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before


def test_save_external_failure_keeps_old_pair_consistent(tmp_path, monkeypatch):
    # An earlier output and its data file exist; the model rename fails after
    # the new data is in place: the old model must still load its old weights.
    out = tmp_path / "out.onnx"
    save_model(weighty_model(seed=0), out, external_data=True)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise Crash("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        save_model(weighty_model(seed=5), out, external_data=True)
    monkeypatch.undo()
    assert listing(tmp_path) == ["out.onnx", "out.onnx.data"]
    back = {t.name: numpy_helper.to_array(t) for t in load_model(out).model.graph.initializer}
    np.testing.assert_array_equal(back["w"], f32(64, 64, seed=0))
    np.testing.assert_array_equal(back["b"], f32(64, seed=1))


def test_save_into_missing_folder_or_onto_directory(tmp_path):
    with pytest.raises(InputError):
        save_model(weighty_model(), tmp_path / "nope" / "out.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(InputError):
        save_model(weighty_model(), tmp_path / "d.onnx")


# --- never overwrite the input -------------------------------------------------

def test_default_output_path():
    assert default_output_path("a/b/model.onnx") == Path("a/b/model.beats.onnx")
    assert default_output_path("model") == Path("model.beats.onnx")


def test_output_may_not_be_input_or_its_data(tmp_path):
    p = tmp_path / "m.onnx"
    save_external(weighty_model(), p)
    lm = load_model(p)
    with pytest.raises(InputError, match="overwrite"):
        check_output_path(lm, p, external_data=False)
    with pytest.raises(InputError, match="overwrite"):
        check_output_path(lm, tmp_path / "." / "m.onnx", external_data=False)
    with pytest.raises(InputError, match="overwrite"):
        check_output_path(lm, tmp_path / "m.onnx.data", external_data=False)
    # An output "o.onnx" whose data file "o.onnx.data" would be the input.
    q = tmp_path / "q.onnx"
    save_external(weighty_model(), q, location="o.onnx.data")
    with pytest.raises(InputError, match="overwrite"):
        check_output_path(load_model(q), tmp_path / "o.onnx", external_data=True)
    # A hard link to the input is the input.
    os.link(p, tmp_path / "link.onnx")
    with pytest.raises(InputError, match="overwrite"):
        check_output_path(lm, tmp_path / "link.onnx", external_data=False)
    check_output_path(lm, tmp_path / "other.onnx", external_data=True)


def test_cli_keeps_external_data_when_input_used_it(tmp_path):
    src = tmp_path / "m.onnx"
    save_external(weighty_model(), src)
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}
    proc = subprocess.run(CLI + [str(src), "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == ["m.beats.onnx", "m.beats.onnx.data", "m.onnx", "m.onnx.data"]
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    out = load_model(tmp_path / "m.beats.onnx")
    assert out.uses_external_data
    assert_same_on_ort(weighty_model(), out.model, rtol=1e-5, atol=1e-5)


def test_cli_external_data_on_request(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(data(weighty_model()))
    proc = subprocess.run(CLI + [str(src), "-q", "--external-data", "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == ["m.onnx", "o.onnx", "o.onnx.data"]


# --- what compile keeps unchanged ---------------------------------------------

def test_metadata_docs_custom_ops_symbolic_dims_and_names_kept():
    m = custom_domain_model()
    out = compile(m, verify=False).model
    assert ops(out) == ["MyOp", "Relu"]  # the Identity went, the custom op stayed
    assert {(p.key, p.value) for p in out.metadata_props} == {("author", "tests"), ("license", "MIT")}
    assert (out.doc_string, out.producer_name, out.producer_version, out.model_version, out.domain) == \
        ("model doc", "unit-test", "9.9", 7, "org.test")
    assert out.graph.doc_string == "graph doc"
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.example", 1)}
    my = out.graph.node[0]
    assert my.domain == "com.example"
    assert {a.name: helper.get_attribute_value(a) for a in my.attribute} == {"alpha": 0.5, "tag": b"keep"}
    for vi_ in (out.graph.input[0], out.graph.output[0]):
        assert [d.dim_param or d.dim_value for d in vi_.type.tensor_type.shape.dim] == ["batch", "seq", 8]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_graph_input_and_output_names_and_order_kept():
    m = rich_model()
    out = compile(m).model
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    for a, b in zip(m.graph.input, out.graph.input):
        assert a.type == b.type


def test_ir3_initializers_listed_as_inputs():
    w, b = f32(3, 3), f32(3, seed=1)
    m = make_model(
        [H("Transpose", ["w"], ["wt"], perm=[1, 0]), H("MatMul", ["x", "wt"], ["m"]), H("Add", ["m", "b"], ["a"]),
         H("Identity", ["a"], ["y"])],
        [vi("x", [2, 3]), vi("w", [3, 3]), vi("b", [3])], [vi("y", [2, 3])], {"w": w, "b": b},
        opset=8, ir_version=3)
    res = compile(m)
    out = res.model
    assert res.ok and out.ir_version == 3
    inits = {t.name for t in out.graph.initializer}
    assert "w" not in inits and "wt" in inits
    assert inits <= {i.name for i in out.graph.input}
    assert out.graph.input[0].name == "x"
    onnx.checker.check_model(out, full_check=True)
    assert_same_on_ort(m, out, {"x": f32(2, 3, seed=3)})


def test_ir4_overridable_initializer_kept_and_not_folded():
    # "w" is an initializer *and* a graph input: a default the caller may
    # override, so nothing may treat it as a constant, nor merge it with the
    # equal constant w2.
    w = f32(3, seed=2)
    m = make_model([H("Neg", ["w"], ["nw"]), H("Add", ["x", "nw"], ["a"]), H("Add", ["a", "w2"], ["y"])],
                   [vi("x", [3]), vi("w", [3])], [vi("y", [3])], {"w": w, "w2": w.copy()}, ir_version=8)
    res = compile(m)
    out = res.model
    assert res.ok
    assert [i.name for i in out.graph.input] == ["x", "w"]
    assert "w" in {t.name for t in out.graph.initializer}
    assert "Neg" in ops(out)
    for feeds in ({"x": f32(3)}, {"x": f32(3), "w": f32(3, seed=7)}):
        assert_same_on_ort(m, out, feeds)
    np.testing.assert_array_equal(run(out, {"x": np.zeros(3, np.float32)})[0], np.zeros(3, np.float32))
    assert {t.name for t in out.graph.initializer} == {"w", "w2"}
