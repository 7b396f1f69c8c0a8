"""The project's import graph: no circle, and no import from a lower layer to a higher one.

    python .ci/import_graph.py          # exit 1 listing every circle and every upward import

Layers, lowest first: the library (``pipeline.*``), then the Prefect layer (``flows.*``), then the command line
(``pipeline.cli``, the entry point, which dispatches ``run`` to the flows). Every import counts, those inside
functions too: a lazy import is still a dependency, only a later one. Reads the sources (``ast``), imports nothing.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "flows")
ENTRY = {"pipeline.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    return 2 if module in ENTRY else 1 if module.startswith("flows") else 0


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pipeline import x`` counts as ``pipeline.x`` when x is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules}
    return found - {module_name(path)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle once, by depth-first search from each module in order."""
    found, seen = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    key = frozenset(path)
                    if key not in seen:
                        seen.add(key)
                        found.append([*path, start])
                elif nxt not in path and nxt > start:
                    stack.append((nxt, [*path, nxt]))
    return found


def main() -> int:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(p) for p in files} | set(PACKAGES)
    graph = {module_name(p): imports(p, modules) - set(PACKAGES) for p in files}
    problems = [f"circle: {' -> '.join(c)}" for c in cycles(graph)]
    problems += [
        f"upward import: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in sorted(graph.items())
        for b in sorted(targets)
        if layer(b) > layer(a)
    ]
    for problem in problems:
        print(problem)
    print(f"import graph: {len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
