"""The package's layering, checked from its source: no import cycle among procpool's modules.

The import graph is built with ``ast`` from every ``import`` statement in ``procpool/``, at
module level *and* inside functions (a function-level import is still a dependency: it only
moves the moment it is paid) and under ``if TYPE_CHECKING:`` (a cycle a type checker must
untangle is a cycle a reader must untangle too). A cycle means two modules cannot be
understood, or tested, one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import procpool

pytestmark = pytest.mark.timeout(60)

PACKAGE = Path(procpool.__file__).parent

#: Cycles allowed: none.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The procpool modules an ``from ... import ...`` statement loads."""
    if node.level:
        base = current.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # ``from . import faults`` loads the submodule (the package itself is loaded before any of
    # its modules: not a dependency); ``from .idtable import IdTable`` loads the module.
    subs = [f"{prefix}.{alias.name}" for alias in node.names]
    if all(sub in modules for sub in subs):
        return subs
    return [prefix, *subs]


def import_graph() -> dict[str, set[str]]:
    """procpool module -> the procpool modules it imports (anywhere in its source)."""
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                deps.update(_resolve(name, path.name == "__init__.py", node, modules))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_and_type_checking_imports():
    # The checker itself: it must see the imports that hide inside functions.
    graph = import_graph()
    assert "procpool.shmfile" in graph["procpool.spawner"]  # imported inside _unlink_tables_of
    assert "procpool.worker" in graph["procpool.spawner"]  # imported inside _child
    assert "procpool.manager" in graph["procpool.poollocks"]  # imported inside _manager
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_procpool():
    cycles = [c for c in _cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, f"import cycles among procpool's modules: {cycles}"


def test_the_program_does_not_import_the_worker_module():
    # The wire format lives in procpool.protocol: the program's side (pool, calls) decodes and
    # encodes without the worker's module; only the spawner loads it, for its workers.
    graph = import_graph()
    for module in ("procpool.pool", "procpool.calls", "procpool.manager", "procpool.protocol"):
        assert "procpool.worker" not in graph[module], module
