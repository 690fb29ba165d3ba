"""The structure the code keeps (docs/ARCHITECTURE.md): no import cycle inside
beats_compiler/ or passes/ (imports inside functions count too), no module
importing another's private name, graphsurgeon's private attributes touched in
one adapter module only, every package installed.  (passes/ free of the driver:
tests/passes/test_package.py.)"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("beats_compiler", "passes")
ADAPTER = "passes.gs_adapter"
GS_PRIVATE = re.compile(r"\._(values|producer|consumers|input_tensors|output_tensors|tensors_cache)\b")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]):
    """(imported module, imported names) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None) if sub in known else (target, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def graph() -> tuple[nx.DiGraph, list[str]]:
    known = modules()
    g = nx.DiGraph()
    private = []
    for name, path in known.items():
        g.add_node(name)
        for target, imported in imports(name, path, known):
            if target in known and target != name:
                g.add_edge(name, target)
                if imported is not None and imported.startswith("_"):
                    private.append(f"{name} imports {target}.{imported}")
    return g, private


def test_no_import_cycles():
    g, _ = graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_no_module_imports_another_modules_private_names():
    _, private = graph()
    assert not private, private


def test_graphsurgeon_private_attributes_only_in_the_adapter():
    bad = [f"{n}: {m.group(0)}" for n, p in modules().items() if n != ADAPTER
           for m in GS_PRIVATE.finditer(p.read_text())]
    assert not bad, bad


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    """The analysis above is not vacuous: a planted cycle and private import are found."""
    pkg = tmp_path / "passes"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n_hidden = 1\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", tmp_path)
    monkeypatch.setattr(this, "PACKAGES", ("passes",))
    g, private = graph()
    assert list(nx.simple_cycles(g)) and private == ["passes.a imports passes.b._hidden"]


def test_every_package_is_listed_for_installation():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}
    assert listed == found, (sorted(found - listed), sorted(listed - found))
