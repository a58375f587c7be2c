"""The shape of the Python package: its modules import one another one way only.

Read from the source with ``ast`` (nothing is imported), counting every import statement,
those inside functions included: a lazy import is still a dependency, and a cycle of lazy
imports is a tangle that only shows when a rarely taken branch runs.

* No module reaches itself through imports.
* ``ferroattn.torch`` (the one module that imports torch) is imported by ``ferroattn._dispatch``
  alone, and itself reaches none of the modules above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "ferroattn"
ROOT = Path(__file__).resolve().parent.parent / "python" / PACKAGE
TORCH = f"{PACKAGE}.torch"
DISPATCH = f"{PACKAGE}._dispatch"


def _module_names() -> dict[str, Path]:
    """Dotted name of every module of the package (``ferroattn`` itself for ``__init__``).

    The compiled binding is known by its stub (``_ferroattn.pyi``): a module that imports
    nothing of the package.
    """
    names = {}
    sources = sorted(ROOT.rglob("*.py"))
    stubs = [p for p in sorted(ROOT.rglob("*.pyi")) if p.with_suffix(".py") not in sources]
    for path in sources + stubs:
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: str) -> None:
        if target in modules and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith(PACKAGE):
                continue
            # `from . import x` names a module x; `from .x import y` the module x (and y if
            # that is a module too).
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
            if node.module or not submodules:
                add(source)
            for sub in submodules:
                add(sub)
    return found


def _graph() -> dict[str, set[str]]:
    names = _module_names()
    modules = set(names)
    return {name: _imports(name, path, modules) for name, path in names.items()}


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the chain of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_the_package():
    graph = _graph()
    for name in (PACKAGE, f"{PACKAGE}.functional", f"{PACKAGE}.kv_cache", TORCH, DISPATCH):
        assert name in graph, f"{name} not found under {ROOT}"
    assert f"{PACKAGE}.functional" in graph[PACKAGE]


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_dispatch_imports_torch_module():
    graph = _graph()
    importers = sorted(m for m, deps in graph.items() if TORCH in deps)
    assert importers == [DISPATCH], f"{TORCH} is imported by {importers}"


def test_torch_module_reaches_nothing_above_it():
    above = {DISPATCH, PACKAGE} | {
        f"{PACKAGE}.{m}" for m in ("functional", "kv_cache", "layer", "cli", "bench")
    }
    reached = _reach(_graph(), TORCH) & above
    assert not reached, f"{TORCH} imports {sorted(reached)}"
