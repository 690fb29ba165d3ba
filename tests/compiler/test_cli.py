"""The beats-compile command: exit codes, one-line errors, the JSON report,
and the files it writes (only the output and the report)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.compiler.models import rich_model
from tests.helpers import assert_same_on_ort, f32

SCRIPT = Path(sys.executable).with_name("beats-compile")
CMD = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "beats_compiler.cli"]

# Runs the CLI in a child with one pass replaced, to force exit codes 1 and 3.
SABOTAGE = textwrap.dedent("""
    import sys
    from passes import Pass, PassResult
    import beats_compiler.targets.profile as profile
    from beats_compiler.cli import main

    class Sabotage(Pass):
        name = "eliminate_nop_ops"
        mode = sys.argv.pop(1)

        def call(self, graph):
            for n in graph.nodes:
                if n.op == "Relu":
                    n.op = "Neg" if self.mode == "wrong" else "NoSuchOp"
                    return PassResult(True, {})
            return PassResult(False, {})

    real = profile.get_pass
    profile.get_pass = lambda name: Sabotage if name == "eliminate_nop_ops" else real(name)
    sys.exit(main(sys.argv[1:]))
""")


def cli(*args, cwd=None, sabotage=None):
    cmd = CMD if sabotage is None else [sys.executable, "-c", SABOTAGE, sabotage]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120)


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.fixture
def model_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(rich_model().SerializeToString())
    return p


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(err.splitlines()) == 1, err
    assert err.startswith("beats-compile: ")
    for n in needles:
        assert n in err, err
    return err


# --- success ----------------------------------------------------------------

REPORT_KEYS = {"verified", "max_abs_diff", "nodes_before", "nodes_after", "latency_ms_before", "latency_ms_after",
               "passes"}


def test_the_written_path_is_printed_whole_and_as_text(model_file, tmp_path):
    """A long path is not folded across lines, and "[red]" in it is a name, not markup."""
    out = tmp_path / ("[red]" + "d" * 90) / ("m" * 60 + ".beats.onnx")
    out.parent.mkdir()
    proc = cli(model_file, "-o", out, "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout.splitlines(), proc.stdout[-600:]


def test_success_writes_output_and_report(model_file, tmp_path):
    before = model_file.read_bytes()
    proc = cli(model_file, "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "verified" in proc.stdout and "model.beats.onnx" in proc.stdout
    assert listing(tmp_path) == ["model.beats.onnx", "model.onnx", "r.json"]
    assert model_file.read_bytes() == before
    out = onnx.load_model(str(tmp_path / "model.beats.onnx"))
    assert_same_on_ort(rich_model(), out, rtol=1e-4, atol=1e-5)

    rep = json.loads((tmp_path / "r.json").read_text())
    assert REPORT_KEYS <= set(rep)
    assert rep["verified"] is True
    assert isinstance(rep["max_abs_diff"], float) and 0 <= rep["max_abs_diff"] < 1e-4
    assert rep["nodes_before"] == 36 and rep["nodes_after"] == len(out.graph.node)
    assert rep["latency_ms_before"] > 0 and rep["latency_ms_after"] > 0
    assert rep["output"] == str(tmp_path / "model.beats.onnx")
    assert rep["file_size_after"] == (tmp_path / "model.beats.onnx").stat().st_size
    assert rep["passes"] and all({"name", "modified", "seconds", "stats"} <= set(p) for p in rep["passes"])
    assert all(isinstance(p["modified"], bool) and p["seconds"] >= 0 and isinstance(p["stats"], dict)
               for p in rep["passes"])
    assert any(p["name"] == "fuse_conv_batchnorm" and p["modified"] and p["stats"]["fused"] == 1
               for p in rep["passes"])


def test_output_path_quiet_and_no_verify(model_file, tmp_path):
    (tmp_path / "sub").mkdir()
    out = tmp_path / "sub" / "o.onnx"
    proc = cli(model_file, "-o", out, "--no-verify", "-q", "--report", tmp_path / "r.json")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert listing(tmp_path / "sub") == ["o.onnx"]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verified"] is None and rep["max_abs_diff"] is None
    assert rep["latency_ms_before"] is None and rep["latency_ms_after"] is None


def test_user_inputs(model_file, tmp_path):
    np.savez(tmp_path / "x.npz", img=f32(1, 3, 6, 6), vec=f32(7, 4))
    proc = cli(model_file, "--inputs", tmp_path / "x.npz", "--report", tmp_path / "r.json", "-q")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verify_input_source"] == "user" and rep["verify_inputs"]["vec"] == [7, 4]


def test_disable_pass(model_file, tmp_path):
    proc = cli(model_file, "--disable-pass", "fuse_conv_batchnorm", "--disable-pass", "fuse_matmul_add",
               "--disable-pass", "fuse_transposed_gemm", "--report", tmp_path / "r.json", "-q", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert not {"fuse_conv_batchnorm", "fuse_matmul_add"} & {p["name"] for p in rep["passes"]}
    ops = [n.op_type for n in onnx.load_model(str(tmp_path / "model.beats.onnx")).graph.node]
    assert "BatchNormalization" in ops and "Gemm" not in ops


def test_disable_pass_takes_every_pass_the_target_runs(model_file, tmp_path):
    """--help lists the target passes too: a gpu post-conversion pass is accepted with
    --target gpu (and skipped), a pass of another target is refused naming that target."""
    proc = cli(model_file, "--target", "gpu", "--disable-pass", "remove_redundant_casts", "--report",
               tmp_path / "r.json", "-q", "--no-verify", "-o", tmp_path / "g.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "remove_redundant_casts" not in {p["name"] for p in json.loads((tmp_path / "r.json").read_text())["passes"]}
    proc = cli(model_file, "--disable-pass", "remove_redundant_casts", "-q", "-o", tmp_path / "c.onnx")
    assert proc.returncode == 2 and not (tmp_path / "c.onnx").exists()
    assert proc.stderr.strip() == ("beats-compile: error: --disable-pass remove_redundant_casts: not a pass of target "
                                   "cpu (a pass of target gpu); `beats-compile --help` lists the passes")


# --- exit 1: verification failed ------------------------------------------------

def test_verification_failure_exit_1_writes_model_nothing(model_file, tmp_path):
    before = model_file.read_bytes()
    proc = cli(model_file, "--report", tmp_path / "r.json", sabotage="wrong")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout
    assert listing(tmp_path) == ["model.onnx", "r.json"]
    assert model_file.read_bytes() == before
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verified"] is False and rep["max_abs_diff"] > 0 and rep["output"] is None


# --- exit 3: internal error --------------------------------------------------------

def test_internal_error_exit_3_one_line(model_file, tmp_path):
    proc = cli(model_file, sabotage="invalid")
    assert_one_line_error(proc, 3, "internal error")
    assert listing(tmp_path) == ["model.onnx"]
    proc = cli(model_file, "--debug", sabotage="invalid")
    assert proc.returncode == 3 and "Traceback" in proc.stderr


# --- exit 2: bad input or usage -------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "garbage"])
def test_bad_model_file(tmp_path, kind):
    p = tmp_path / "m.onnx"
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(os.urandom(64) + b"\xff" * 512)
    before = listing(tmp_path)
    assert_one_line_error(cli(p), 2, str(p))
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--frobnicate"], "--frobnicate"),
        (["--target", "tpu"], "tpu"),
        (["--rtol", "abc"], "abc"),
        (["--atol", "-1"], "-1"),
        (["--fold-size-limit", "lots"], "lots"),
        (["--max-rounds", "0"], "max-rounds"),
        (["--disable-pass", "no_such_pass"], "no_such_pass"),
    ],
)
def test_usage_errors(model_file, tmp_path, args, needle):
    before = model_file.read_bytes()
    assert_one_line_error(cli(model_file, *args), 2, needle)
    assert listing(tmp_path) == ["model.onnx"] and model_file.read_bytes() == before


def test_no_arguments_is_usage_error():
    proc = cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_bad_inputs_files(model_file, tmp_path):
    assert_one_line_error(cli(model_file, "--inputs", tmp_path / "none.npz"), 2, "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert_one_line_error(cli(model_file, "--inputs", tmp_path / "junk.npz"), 2, "junk.npz")
    np.savez(tmp_path / "wrong.npz", img=f32(1, 3, 6, 6), nope=f32(2, 4))
    assert_one_line_error(cli(model_file, "--inputs", tmp_path / "wrong.npz"), 2, "vec", "nope")
    np.savez(tmp_path / "shape.npz", img=f32(1, 3, 5, 5), vec=f32(2, 4))
    assert_one_line_error(cli(model_file, "--inputs", tmp_path / "shape.npz"), 2)
    assert listing(tmp_path) == ["junk.npz", "model.onnx", "shape.npz", "wrong.npz"]


def test_refuses_to_overwrite_input(model_file, tmp_path):
    before = model_file.read_bytes()
    assert_one_line_error(cli(model_file, "-o", model_file), 2, "overwrite")
    assert_one_line_error(cli(model_file, "-o", tmp_path / "." / "model.onnx"), 2, "overwrite")
    assert_one_line_error(cli(model_file, "--report", model_file), 2, "overwrite")
    assert model_file.read_bytes() == before
    assert listing(tmp_path) == ["model.onnx"]


def test_bad_output_locations(model_file, tmp_path):
    assert_one_line_error(cli(model_file, "-o", tmp_path / "nope" / "o.onnx", "--no-verify"), 2, "nope")
    assert_one_line_error(cli(model_file, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx"), 2)
    (tmp_path / "d.onnx").mkdir()
    assert_one_line_error(cli(model_file, "-o", tmp_path / "d.onnx", "--no-verify"), 2)
    assert listing(tmp_path) == ["d.onnx", "model.onnx"]


def test_model_that_onnx_runtime_cannot_run_is_input_error(tmp_path):
    from tests.compiler.models import custom_domain_model

    p = tmp_path / "custom.onnx"
    p.write_bytes(custom_domain_model().SerializeToString())
    assert_one_line_error(cli(p), 2, "--no-verify")
    assert listing(tmp_path) == ["custom.onnx"]
    assert cli(p, "--no-verify", "-q").returncode == 0
    assert listing(tmp_path) == ["custom.beats.onnx", "custom.onnx"]


def test_report_records_the_error_for_ci(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    report = tmp_path / "r.json"
    assert_one_line_error(cli(bad, "--report", report), 2, "not an ONNX model")
    body = json.loads(report.read_text())
    assert body["exit_code"] == 2 and body["verified"] is None and "not an ONNX model" in body["error"]
    assert listing(tmp_path) == ["bad.onnx", "r.json"]


def test_folding_inf_and_nan_prints_nothing_on_stderr(tmp_path):
    """Constants that fold to inf/nan (1/0, log 0): the values are the op's, and numpy's
    RuntimeWarnings from onnx's reference evaluator never reach the user's stderr."""
    from onnx import TensorProto, helper, numpy_helper

    a = numpy_helper.from_array(np.array([1.0, 0.0, -1.0], np.float32), "a")
    z = numpy_helper.from_array(np.zeros(3, np.float32), "z")
    nodes = [helper.make_node("Div", ["a", "z"], ["q"]), helper.make_node("Log", ["z"], ["l"]),
             helper.make_node("Add", ["q", "l"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])]
    g = helper.make_graph(nodes, "w", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [a, z])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "w.onnx"
    onnx.save(m, src)
    proc = cli(src, "-q", "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["nodes_after"] < 4  # the constants did fold


def test_ort_errors_are_short_without_source_paths(tmp_path):
    """An ONNX Runtime failure is reduced to what the user can act on: no status
    prefix, no C++ source location, cut at a word boundary."""
    from onnx import TensorProto, helper

    s = helper.make_tensor("s", TensorProto.INT64, [1], [4])
    g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "r",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [s])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "r.onnx")
    proc = cli(tmp_path / "r.onnx", "-q", "-o", tmp_path / "out.onnx")
    line = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in line
    assert "Reshape" in line and "--inputs" in line
    assert "onnxruntime_src" not in line and ".h:" not in line and "[ONNXRuntimeError]" not in line
    assert len(line) <= 300, len(line)


def test_generated_integer_inputs_stay_inside_the_tables_they_index(tmp_path):
    """BERT's token_type_ids index a 2-row table: generated verification inputs (0..3
    by default) stay below the size of every table an integer input indexes, also
    through Cast/Unsqueeze, so plain compile and insert verify without --inputs."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(r.standard_normal((30, 8)).astype(np.float32), "words"),
             numpy_helper.from_array(r.standard_normal((2, 8)).astype(np.float32), "types"),
             numpy_helper.from_array(r.standard_normal((8, 8)).astype(np.float32), "W")]
    nodes = [helper.make_node("Gather", ["words", "ids"], ["e"]),
             helper.make_node("Cast", ["tt"], ["tt64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["types", "tt64"], ["t"]),
             helper.make_node("Add", ["e", "t"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])]
    g = helper.make_graph(nodes, "bertish", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"]),
                                             helper.make_tensor_value_info("tt", TensorProto.INT32, ["B", "S"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "b.onnx"
    onnx.save(m, src)
    from beats_compiler.inputs import integer_bounds

    assert integer_bounds(m) == {"ids": 30, "tt": 2}
    proc = cli(src, "-q", "-o", tmp_path / "c.onnx")
    assert proc.returncode == 0, proc.stderr
    proc = cli("insert", src, "-q", "-o", tmp_path / "i.onnx", "--factorization", "rank:2", "--min-size", "0")
    assert proc.returncode == 0, proc.stderr
