"""Every hostile case through the CLI: the exit code, exactly one line on
stderr naming the problem, no traceback, the input unchanged (bytes and
mtime), no partial output, nothing written outside the output path, the
temp folder left empty, no byte of the outside secret in any output.

Cases that could hang (FIFOs, devices) or blow memory (bombs, verification
on ORT, a 2 GB file) run in a subprocess under a timeout and a memory cap;
the rest call ``beats_compiler.cli.main`` in-process (the machine has 2
cores: each case must stay quick)."""

from __future__ import annotations


import contextlib
import hashlib
import io
import json
import os
import re
import resource
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from beats_compiler import cli
from tests.hostile import make_corpus
from tests.hostile.make_corpus import CASES, MARKER, Case

MEMORY_CAP = 4 << 30
TIMEOUT_S = 60


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mtime and (regular files up to
    64 MiB) a hash.  FIFOs and devices are never opened."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                digest = None
                if st.st_size <= 64 << 20:
                    digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                out[rel] = ("file", st.st_size, st.st_mtime_ns, digest)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode), st.st_mtime_ns)
    return out


def _cap_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run_isolated(argv: list[str], tmpdir: Path, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.run([sys.executable, "-m", "beats_compiler.cli", *argv], capture_output=True, text=True,
                          timeout=TIMEOUT_S, preexec_fn=_cap_memory, env=env, cwd=cwd, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def run_inprocess(argv: list[str], tmpdir: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = tempfile.tempdir
    tempfile.tempdir = str(tmpdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
    finally:
        tempfile.tempdir = old
    return code, out.getvalue(), err.getvalue()


def run_case(case: Case, tmp_path: Path, extra: tuple[str, ...] = ()):
    work = tmp_path / "work"
    d = work / "case"
    d.mkdir(parents=True)
    model = case.build(d)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    args = [a.format(d=d) for a in case.args + extra]
    argv = [str(model), "-q", *args] + ([] if "-o" in args else ["-o", str(d / "out.onnx")])
    before = snapshot(work)
    runner = run_isolated if case.isolated else run_inprocess
    code, out, err = runner(argv, tmpdir, work) if case.isolated else runner(argv, tmpdir)
    after = snapshot(work)
    return d, work, tmpdir, before, after, code, out, err


SOURCE_PATH = re.compile(r"\.(cc|cpp|h|hpp|py):\d+|onnxruntime/core|/onnxruntime_src/")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case(case: Case, tmp_path):
    d, _work, tmpdir, before, after, code, out, err = run_case(case, tmp_path)
    assert "Traceback" not in out + err, err
    assert code == case.code, f"exit {code}, expected {case.code}: {err.strip()}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case.code == 2:
        assert len(lines) == 1, f"stderr must be one line: {err!r}"
        assert lines[0].startswith("beats-compile: error: "), lines[0]
        assert case.phrase in lines[0], f"{case.phrase!r} not in {lines[0]!r}"
        # paths count as their names: the test's temporary folder is longer under xdist
        message = lines[0][len("beats-compile: error: "):].replace(str(d / "m.onnx"), "m.onnx").replace(
            str(tmp_path), "T")
        assert len(message) <= 200, f"error line of {len(message)} characters: {message!r}"
        assert not SOURCE_PATH.search(message), f"a source path in the error line: {message!r}"
        assert after == before, "a failed run changed, added or removed files"
    else:
        assert not lines, err
        added = {k for k in after if k not in before}
        assert added == {f"case/{o}" for o in case.outputs}, added
        changed = [k for k in before if after.get(k) != before[k]]
        assert not changed, f"input files changed: {changed}"
        for name in case.outputs:
            blob = (d / name).read_bytes()
            assert MARKER not in blob, f"{name} holds bytes of a file outside the model's folder"
        onnx.checker.check_model(str(d / "out.onnx"))
    assert list(tmpdir.iterdir()) == [], "temporary files left behind"


def test_corpus_size_and_spread():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 40
    areas = {c.area for c in CASES}
    assert {"parsing", "structure", "versions", "tensors", "folding", "external"} <= areas


def test_make_corpus_script_writes_every_case(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert make_corpus.main([str(tmp_path / "corpus")]) == 0
    assert len(out.getvalue().splitlines()) == sum(not c.big for c in CASES)
    assert sorted(set(os.listdir(tmp_path / "corpus")) - {"outside"}) == sorted(c.name for c in CASES)


def test_fold_memory_limit_skips_and_warns(tmp_path):
    """Folds over the total budget are skipped (not an error), the result
    still verifies, and the report names the flag that raises the limit."""
    nodes, inits = [], {}
    for i in range(3):  # three 1 MiB folds
        inits[f"c{i}"] = np.full((512, 512), i + 1, np.float32)
        nodes.append(helper.make_node("Neg", [f"c{i}"], [f"n{i}"]))
        nodes.append(helper.make_node("ReduceSum", [f"n{i}"], [f"r{i}"], keepdims=0))
    nodes.append(helper.make_node("Sum", ["x", "r0", "r1", "r2"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [])],
                          [helper.make_tensor_value_info("y", 1, [])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    report = tmp_path / "r.json"
    code, _out, err = run_inprocess([str(src), "-q", "-o", str(tmp_path / "o.onnx"), "--report", str(report),
                                    "--fold-memory-limit", "1500k"], tmp_path)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["verified"] is True
    assert any("--fold-memory-limit" in w for w in rep["warnings"]), rep["warnings"]
    stats = [p["stats"] for p in rep["passes"] if p["name"] == "fold_constants"]
    assert sum(s.get("skipped_memory_limit", 0) for s in stats) >= 1


def test_external_file_swapped_after_loading_is_refused(tmp_path):
    """A data file replaced by a symlink to outside after validation (a race)
    is refused when the bytes are finally read."""
    from passes.convert import ExternalDataError, ExternalValues

    d = tmp_path / "case"
    d.mkdir()
    make_corpus.ext_model(d)
    m = onnx.load_model(str(d / "m.onnx"), load_external_data=False)
    values = ExternalValues(m.graph.initializer[0], str(d))
    np.testing.assert_array_equal(values.load(), make_corpus.W)
    os.unlink(d / "w.bin")
    os.symlink(make_corpus.outside(d), d / "w.bin")
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        values.load()


def test_api_validates_in_memory_models_and_limits(tmp_path):
    """The Python API applies the same validation: an in-memory model, and a
    path loaded with explicit limits."""
    from beats_compiler import InputError, compile, load_model
    from beats_compiler.validate import Limits

    d = tmp_path / "case"
    d.mkdir()
    cyclic = onnx.load_model(str(make_corpus.s_cycle(d)))
    with pytest.raises(InputError, match="cycle in the graph"):
        compile(cyclic, verify=False)
    deep = make_corpus.l_deep_subgraphs(d)
    with pytest.raises(InputError, match="--max-depth"):
        load_model(deep)
    assert load_model(deep, limits=Limits(max_depth=20)).model.graph.node[0].op_type == "If"
    with pytest.raises(InputError, match="--max-nodes"):
        load_model(deep, limits=Limits(max_nodes=3, max_depth=20))
