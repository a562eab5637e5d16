"""The package's layering, read from its import statements: no import circle, vLLM only inside the engines, and the
core never importing the ``callbacks`` package (the callbacks depend on the core, not the other way round)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mgrpo_pl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules a file imports (``from a import b`` counts as ``a`` and ``a.b``); with ``top_level_only``, the imports
    that run when the module is imported (not inside functions or ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


FILES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_module_level_import_circle():
    graph = {name: set() for name in FILES}
    for name, path in FILES.items():
        for target in _imports(path, top_level_only=True):
            parts = target.split(".")
            # importing a.b.c runs a and a.b first
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in graph and prefix != name and not name.startswith(prefix + "."):
                    graph[name].add(prefix)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_engines_import_vllm():
    engines = PACKAGE / "rollout" / "engines"
    outside = {
        name
        for name, path in FILES.items()
        if engines not in path.parents and any(m == "vllm" or m.startswith("vllm.") for m in _imports(path, False))
    }
    assert not outside, f"modules outside rollout/engines import vllm: {sorted(outside)}"


def test_the_core_never_imports_the_callbacks_package():
    offenders = {
        name
        for name, path in FILES.items()
        if any(m == "callbacks" or m.startswith("callbacks.") for m in _imports(path, False))
    }
    assert not offenders, f"mgrpo_pl modules import callbacks: {sorted(offenders)}"
