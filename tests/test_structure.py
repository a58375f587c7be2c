"""The shape of the Python package: its modules import one another one way only.

Read from the source with ``ast`` (nothing is imported), counting every import statement,
those inside functions included: a lazy import is still a dependency, and a cycle of lazy
imports is a tangle that only shows when a rarely taken branch runs.

* No module reaches itself through imports.
* ``ferroattn.torch`` (the one module that imports torch) is imported by ``ferroattn._dispatch``
  alone, and itself reaches none of the modules above it.
* Ray is imported by ``ferroattn.distributed`` and its modules alone, and ``import ferroattn``
  reaches none of them: the package works without Ray, and importing it never starts Ray.

The kernel crate (``rust/core/src``) is held to the same rule: its modules' ``crate::`` and
``super::`` paths, read from the source, form no cycle.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "ferroattn"
ROOT = Path(__file__).resolve().parent.parent / "python" / PACKAGE
TORCH = f"{PACKAGE}.torch"
DISPATCH = f"{PACKAGE}._dispatch"
DISTRIBUTED = f"{PACKAGE}.distributed"
CORE = Path(__file__).resolve().parent.parent / "rust" / "core" / "src"


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


def _third_party(path: Path) -> set[str]:
    """Top-level names of the modules outside the package that ``path`` imports, anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {PACKAGE}


def _in_distributed(name: str) -> bool:
    return name == DISTRIBUTED or name.startswith(DISTRIBUTED + ".")


def test_only_distributed_imports_ray():
    importers = sorted(m for m, p in _module_names().items() if "ray" in _third_party(p))
    assert importers, "no module imports ray: is ferroattn.distributed there?"
    outside = [m for m in importers if not _in_distributed(m)]
    assert not outside, f"ray is imported outside {DISTRIBUTED}: {outside}"


def test_package_never_reaches_distributed():
    graph = _graph()
    for start in (m for m in graph if not _in_distributed(m)):
        reached = sorted(m for m in _reach(graph, start) if _in_distributed(m))
        assert not reached, f"{start} imports {reached}"


def test_import_ferroattn_leaves_ray_alone():
    code = "import sys, ferroattn; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_distributed_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    for name in [m for m in sys.modules if _in_distributed(m)]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install ferroattn\[ray\]"):
        importlib.import_module(DISTRIBUTED)


def _rust_graph() -> dict[str, set[str]]:
    """Module of the kernel crate -> the crate's modules its code names by path (``crate::a::b``,
    ``super::b``, ``self::b``, or a child's name ``b::x``), each path counted as deep as it names
    a module (``crate::simd::Simd`` is ``simd``, ``crate::simd::vnni::f`` is ``simd::vnni``).
    Declaring a child (``mod b;``) or re-exporting its items (``pub use b::X;``) is not a
    dependency of the parent's code; tests inside a file count as that file."""
    files = {}
    for path in sorted(CORE.rglob("*.rs")):
        parts = list(path.relative_to(CORE).with_suffix("").parts)
        if parts[-1] in ("mod", "lib"):
            parts.pop()
        files["::".join(parts)] = path
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name.split("::") if name else []
        found: set[str] = set()
        code = re.sub(r"(?m)^\s*pub(\([\w:]+\))? use [^;]*;", "", path.read_text())
        for full in re.findall(r"(?<![\w:])((?:\w+::)+\w+)", code):
            head, *rest = full.split("::")
            if head == "crate":
                segments = rest
            elif head == "super":
                segments = here[:-1] + rest
            elif head == "self":
                segments = here + rest
            else:
                segments = here + [head, *rest]  # a child module, if one has that name
            target = None
            for i in range(len(segments), 0, -1):  # the longest prefix that is a module
                if "::".join(segments[:i]) in modules:
                    target = "::".join(segments[:i])
                    break
            if target is not None and target != name and (head != "crate" or rest):
                found.add(target)
        graph[name] = found
    return graph


def test_rust_graph_sees_the_crate():
    graph = _rust_graph()
    assert "attention::task" in graph["attention"], graph["attention"]
    assert "attention::tile" in graph["attention::decode"], graph["attention::decode"]
    assert "simd" in graph["attention::prefill"], graph["attention::prefill"]
    assert "attention::tile" in graph["attention::prefill"], graph["attention::prefill"]


def test_no_module_cycles_in_the_kernel_crate():
    cycle = _cycle(_rust_graph())
    assert cycle is None, "module cycle in rust/core/src: " + " -> ".join(cycle or [])
