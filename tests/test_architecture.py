"""Guards of the layering: models are functions of tensors (importing them loads neither the data stage nor a
store), and the modules of src/sampletok import each other without a cycle (read from the source's imports,
lazy ones inside functions included; ``if TYPE_CHECKING:`` blocks excluded, as they never run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def test_importing_the_models_loads_neither_the_data_stage_nor_a_store():
    code = (
        "import sys, sampletok.models; "
        "print(sorted(m for m in sys.modules if m.startswith(('sampletok.data', 'sampletok.store'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC)
    assert out.stdout.strip() == "[]"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, package: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the statements under ``node`` import (``package``: for relative ones)."""
    edges: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                edges |= _imports(other, package, modules)
            continue
        if isinstance(child, ast.Import):
            edges.update(a.name for a in child.names if a.name in modules)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:  # relative import
                up = package.split(".")[: len(package.split(".")) - child.level + 1]
                base = ".".join([*up, base] if base else up)
            for a in child.names:
                sub = f"{base}.{a.name}"
                edges.add(sub if sub in modules else base)
        edges |= _imports(child, package, modules)
    return edges


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module → the sampletok modules it imports (``from a.b import c`` names ``a.b.c`` when that is a module)."""
    modules = {_module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = _imports(ast.parse(path.read_text(), str(path)), package, set(modules))
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


@pytest.mark.parametrize(
    ("graph", "cyclic"),
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)],
)
def test_the_cycle_finder_finds_a_cycle_when_there_is_one(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_the_import_reader_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from p import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import f\n")
    (pkg / "c.py").write_text("from p.a import f\n")
    g = import_graph(tmp_path)
    assert g["p.a"] == {"p.b"} and g["p.b"] == set() and g["p.c"] == {"p.a"}
