"""The import graph of ``src/scar`` has no cycle, and light modules stay light.

How imports are counted (read from the source with ``ast``, nothing is imported):

- every ``import`` / ``from … import`` statement of a module is an edge, at module level *and*
  inside functions: a lazy import is still a dependency (it only moves the cost to the first
  call), so it must point down the layers like any other. ``training`` lazily importing
  ``methods`` would be a layering error this test catches;
- imports under ``if TYPE_CHECKING:`` are not edges (they never run);
- ``import a.b.c`` / ``from a.b import c`` is an edge to the module named (``a.b.c``, or ``a.b``
  when ``c`` is not a module), not to its parent packages: a package ``__init__`` that imports
  its own submodules (method registration, re-exports) is not a cycle;
- ``importlib.import_module`` calls (the lazy ``__getattr__`` facades of ``scar``,
  ``scar.experiments`` and the method registry) are not import statements and not edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / "scar").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.dump(test)


def _imports(tree: ast.AST):
    """Import nodes anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from (n for child in node.orelse for n in _imports_of(child))
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_scar():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    found = cycles(graph)
    detail = [
        "; ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) for c in found
    ]
    assert not found, f"import cycles in src/scar: {detail}"


def test_the_walk_sees_lazy_imports_and_skips_type_checking():
    graph = import_graph()
    # runner imports plots' numpy half lazily (snapshot_features): a function-level edge
    assert "scar.experiments.snapshots" in graph["scar.experiments.runner"]
    # plots names GroupSummary only for type checkers
    assert "scar.experiments.report" not in graph["scar.experiments.plots"]
    assert "scar.statistics" in graph["scar.training.workflow"]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _fresh_import(module: str, absent: tuple[str, ...]) -> list[str]:
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {absent!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_runner_does_not_import_matplotlib():
    # Runner tasks (local or on Ray workers) never draw: plots are the report's business.
    assert _fresh_import("scar.experiments.runner", ("matplotlib",)) == []


def test_cli_and_report_module_imports_stay_light():
    assert _fresh_import("scar.cli", ("matplotlib", "torch")) == []
    assert _fresh_import("scar.experiments.report", ("matplotlib",)) == []
