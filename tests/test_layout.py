"""The package's import graph has no circle, counting imports inside functions too.

`python -m pytest tests/test_layout.py -q` is the command that shows the structure holds;
`test_print_layout` prints each module's in-package imports with `-s`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "scrcl_cli"


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                deps.update(c for c in candidates if c in modules and c != name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scrcl_cli"):
                deps.update(c for c in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if c in modules)
        graph[name] = {d for d in deps if d not in ("scrcl_cli",)}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    graph = _imports()
    assert "scrcl_cli.graphs" in graph and "scrcl_cli.bundle" in graph
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_cli_and_api_sit_on_top():
    graph = _imports()
    for name, deps in graph.items():
        if name not in ("scrcl_cli.cli", "scrcl_cli.__main__"):
            assert "scrcl_cli.cli" not in deps, name
        if name not in ("scrcl_cli.cli", "scrcl_cli.api", "scrcl_cli.__main__", "scrcl_cli"):
            assert "scrcl_cli.api" not in deps, name


def test_print_layout(capsys):
    for name, deps in sorted(_imports().items()):
        print(f"{name} -> {', '.join(sorted(deps)) or '-'}")
    assert capsys.readouterr().out.count("->") >= 20
