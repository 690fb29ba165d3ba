"""docs/ARCHITECTURE.md's two examples are true: a pass is one new file in
passes/ (found by the registry), a target is one new module in
beats_compiler/targets/ (a --target of the CLI).  The examples are taken from
the document itself and dropped into a copy of the two packages."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


def examples() -> dict[str, str]:
    """{relative path: source} of every python block that starts with a path comment."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    out = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first = block.splitlines()[0]
        if first.startswith("# ") and first.endswith(".py"):
            out[first[2:].strip()] = block
    return out


def test_the_documented_pass_and_target_work_when_dropped_in(tmp_path):
    ex = examples()
    assert set(ex) == {"passes/eliminate_double_neg.py", "beats_compiler/targets/cpu_lean.py"}, sorted(ex)
    for pkg in ("passes", "beats_compiler"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, src in ex.items():
        assert not (tmp_path / rel).exists()
        (tmp_path / rel).write_text(src)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    script = f"""
import sys
import onnx
from passes import get_pass, to_graph, to_model
from beats_compiler.cli import main

p = get_pass("eliminate_double_neg")()
graph, env = to_graph(onnx.load({str(tmp_path / "m.onnx")!r}))
res = p(graph)
dce = get_pass("eliminate_dead_code")()
dce(graph)
print("ops", [n.op_type for n in to_model(graph, env).graph.node], res.stats)
sys.exit(main([{str(tmp_path / "m.onnx")!r}, "--target", "cpu-lean", "-q", "--report", {str(tmp_path / "r.json")!r}]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "ops ['Relu'] {'removed': 1}" in proc.stdout, proc.stdout
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "cpu-lean" and report["verified"] is True
    assert "fold_constants" not in {p["name"] for p in report["passes"]}
    assert np.isfinite(report["max_abs_diff"])
