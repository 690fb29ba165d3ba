"""The package's boundaries: passes/ never imports the driver or a runtime, and
these tests never import the driver (they test passes/ alone)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_passes_import_neither_the_driver_nor_a_runtime():
    for path in (ROOT / "passes").rglob("*.py"):
        assert not _imports(path) & {"beats_compiler", "onnxruntime"}, path


def test_pass_tests_import_passes_not_the_driver():
    files = [*(ROOT / "tests" / "passes").rglob("*.py"), ROOT / "tests" / "helpers.py", ROOT / "tests" / "targets" / "models.py"]
    for path in files:
        assert "beats_compiler" not in _imports(path), path
