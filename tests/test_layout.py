"""The package's imports point down: the conductor (pipeline) calls the rooms, never the reverse.

Read from the source with ``ast`` (imports inside functions count too), so a cycle that only
a lazy import hides is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "booster"

FLOORS = {
    "booster.cli": 6,
    "booster.pipeline": 5,
    "booster.report": 4,
    "booster.compare": 3,
    "booster.plots": 2, "booster.results": 2, "booster.stages": 2, "booster.estimate": 2, "booster.publish": 2,
    "booster.preflight": 2,
    "booster.evaluate.stage": 1, "booster.rundata": 1,
}
"""Modules above the foundations, by floor; every other module is floor 0. A module imports
only modules of a lower floor, or of its own floor below 1 (the foundations among themselves)."""



def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("booster"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}  # `from booster.data import safety` needs data.safety
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("booster")}
        graph[name] = {d for d in deps if d != name and d in modules}
    return graph


def test_imports_point_down():
    graph = _graph()
    up = [(m, d) for m, deps in graph.items() for d in deps
          if FLOORS.get(d, 0) > FLOORS.get(m, 0) or (FLOORS.get(d, 0) == FLOORS.get(m, 0) >= 1 and m != d)]
    assert not up, f"imports from a lower module up to a higher one (or across a floor): {up}"


def test_no_import_cycles():
    graph = _graph()
    cycles = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in graph[node]:
            if dep in path:
                cycles.add(frozenset(path[path.index(dep):]))
            elif len(path) < 12:
                visit(dep, path + [dep])

    for start in graph:
        visit(start, [start])
    # a package's __init__ re-exporting its own submodules is not a cycle of rooms
    cycles = {c for c in cycles if not any(a != b and b.startswith(a + ".") for a in c for b in c)}
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"
