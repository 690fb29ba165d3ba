"""beats_compiler.compile: the Python entry point."""

import builtins
import io
import os
import subprocess
import sys
import tempfile
import textwrap

import onnx
import pytest
from onnx import helper

from beats_compiler import CompileResult, InputError, compile
from beats_compiler.targets import TARGETS
from beats_compiler.targets import profile
from tests.compiler.models import bomb_model, rich_model
from tests.helpers import assert_same_on_ort, f32, make_model, ops, vi

H = helper.make_node


def data(model):
    return model.SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def rich():
    return rich_model()


@pytest.fixture(scope="module")
def compiled(rich):
    return compile(rich)


def test_compile_model_proto(rich, compiled):
    assert isinstance(compiled, CompileResult) and compiled.ok
    r = compiled.report
    assert r.verified is True and r.max_abs_diff <= 1e-4
    assert r.input is None and r.output is None
    assert r.nodes_before == 36 and r.nodes_after < r.nodes_before
    assert r.converged and r.rounds >= 2
    assert {p["name"] for p in r.passes} == set(TARGETS["cpu"].passes)  # gpu/npu add passes of their own
    assert all(set(p) == {"name", "round", "modified", "seconds", "stats"} for p in r.passes)
    # Every pass found its work in the rich model.
    # (dedupe_transposed_initializers needs a >= 1 MiB transposed pair, which the rich model has not)
    assert {p["name"] for p in r.passes if p["modified"]} == set(TARGETS["cpu"].passes) - {"dedupe_transposed_initializers"}
    onnx.checker.check_model(compiled.model, full_check=True)
    assert_same_on_ort(rich, compiled.model, rtol=1e-4, atol=1e-5)
    assert_same_on_ort(rich, compiled.model, {"img": f32(1, 3, 6, 6), "vec": f32(9, 4)}, rtol=1e-4, atol=1e-5)
    assert [i.name for i in compiled.model.graph.input] == ["img", "vec"]
    assert compiled.model.graph.input[1].type.tensor_type.shape.dim[0].dim_param == "N"


def test_compile_path(tmp_path, rich):
    p = tmp_path / "m.onnx"
    p.write_bytes(data(rich))
    res = compile(p)
    assert res.ok and res.report.input == str(p)
    assert res.report.file_size_before == p.stat().st_size
    assert data(res.model) == data(compile(rich).model)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    res = compile(str(p), verify=False)
    assert res.report.verified is None


def test_model_proto_never_touches_file_system(monkeypatch, tmp_path, rich):
    monkeypatch.chdir(tmp_path)

    def refuse(*a, **k):
        raise AssertionError(f"file system touched: {a!r}")

    real_open = builtins.open

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            refuse(file, mode)
        return real_open(file, mode, *a, **k)

    real_os_open = os.open

    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path, flags)
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory", "TemporaryFile"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(onnx, "save_model", refuse)
    monkeypatch.setattr(onnx, "load_model", refuse)
    res = compile(rich)
    assert res.ok
    assert os.listdir(tmp_path) == []


def test_input_model_proto_not_mutated(rich):
    before = data(rich)
    compile(rich)
    compile(rich, verify=False, disable=["fold_constants"])
    assert data(rich) == before


def test_deterministic(rich, compiled):
    again = compile(rich)
    assert data(again.model) == data(compiled.model)


def test_idempotent(compiled):
    again = compile(compiled.model)
    changed = [p for p in again.report.passes if p["modified"]]
    assert changed == [], changed
    assert again.report.rounds == 1
    assert data(again.model) == data(compiled.model)


def test_deterministic_across_processes(tmp_path, rich):
    # Hash randomization must not leak into the output.
    src = tmp_path / "m.onnx"
    src.write_bytes(data(rich))
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"out{seed}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-m", "beats_compiler.cli", str(src), "-o", str(out), "--no-verify", "-q"],
                       check=True, env=env, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_disable_passes(rich):
    res = compile(rich, verify=False, disable=["fuse_matmul_add", "fuse_conv_batchnorm", "fuse_transposed_gemm"])
    names = {p["name"] for p in res.report.passes}
    assert "fuse_matmul_add" not in names and "fuse_conv_batchnorm" not in names
    assert "BatchNormalization" in ops(res.model) and "Gemm" not in ops(res.model)
    with pytest.raises(InputError, match="no_such_pass"):
        compile(rich, disable=["no_such_pass"])


def test_bad_arguments():
    with pytest.raises(InputError):
        compile(rich_model(), target="tpu")
    with pytest.raises(InputError):
        compile(42)
    bad = onnx.ModelProto()
    with pytest.raises(InputError):
        compile(bad)


def test_user_inputs_and_tolerances(rich):
    feeds = {"img": f32(1, 3, 6, 6, seed=8), "vec": f32(5, 4, seed=9)}
    res = compile(rich, inputs=feeds, rtol=0.5, atol=0.25, measure_latency=False)
    r = res.report
    assert r.verified and r.verify_input_source == "user" and r.verify_inputs == {"img": [1, 3, 6, 6], "vec": [5, 4]}
    assert (r.rtol, r.atol) == (0.5, 0.25) and r.latency_ms_before is None
    with pytest.raises(InputError, match="vec"):
        compile(rich, inputs={"img": feeds["img"]})


def test_verification_failure_reported_not_raised(monkeypatch):
    from passes import Pass, PassResult

    class Sabotage(Pass):
        name = "eliminate_nop_ops"

        def call(self, graph):
            hit = [n for n in graph.nodes if n.op == "Relu"]
            for n in hit:
                n.op = "Neg"
            return PassResult(bool(hit), {})

    real = profile.get_pass
    monkeypatch.setattr(profile, "get_pass", lambda name: Sabotage if name == "eliminate_nop_ops" else real(name))
    m = make_model([H("Relu", ["x"], ["y"])], [vi("x", [4])], [vi("y", [4])])
    res = compile(m)
    assert res.report.verified is False and not res.ok
    assert res.report.max_abs_diff > 0


def test_terabyte_bomb_compiles_in_bounded_memory_and_time(tmp_path):
    # A child process with a 3 GiB address-space cap and a time limit: any
    # attempt to materialize a bomb dies there instead of taking this run down.
    path = tmp_path / "bomb.onnx"
    path.write_bytes(data(bomb_model()))
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from beats_compiler import compile
        res = compile({str(path)!r}, verify=False)
        st = res.report.pass_totals()["fold_constants"]["stats"]
        print(st.get("skipped_size_limit", 0) + st.get("skipped_growth_limit", 0), st.get("inference_failed", 0))
        print(res.model.ByteSize())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped, inference_failed = map(int, proc.stdout.split()[:2])
    assert skipped >= 6 and inference_failed == 0
    assert int(proc.stdout.split()[2]) < 1 << 20


def test_bomb_in_process_with_counting_evaluator(monkeypatch):
    # Same model in process: the evaluator is never handed a bomb.
    from passes import fold_constants

    seen = []
    real = fold_constants.reference_evaluator

    def spy(model, feeds):
        seen.extend(n.op_type for n in model.graph.node)
        return real(model, feeds)

    monkeypatch.setattr(fold_constants, "reference_evaluator", spy)
    res = compile(bomb_model(), verify=False)
    assert not {"ConstantOfShape", "Expand", "Tile", "Range"} & set(seen)
    assert ops(res.model).count("ReduceMax") == 5


def test_check_each_pass_and_round_cap(rich, compiled):
    res = compile(rich, check_each_pass=True, measure_latency=False)
    assert res.ok and data(res.model) == data(compiled.model)
    capped = compile(rich, max_rounds=1, verify=False)
    assert capped.report.rounds == 1 and not capped.report.converged
    assert any("max_rounds" in w for w in capped.report.warnings)
    assert_same_on_ort(rich, capped.model, rtol=1e-4, atol=1e-5)
