"""Every module of the package imports on its own, and the package has no import cycle.

Modules are found by walking the package directory (``pkgutil.iter_modules``), so the
tests follow any layout (a module split into a subpackage, new files) without edits.
"""

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = "pyro_nfvi"
ROOT = Path(importlib.util.find_spec(PACKAGE).origin).parent  # found, not imported


def _modules() -> Dict[str, Path]:
    """``{dotted name: source file}`` of the package and every module below it."""
    found = {PACKAGE: ROOT / "__init__.py"}

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            if info.ispkg:
                found[name] = path / info.name / "__init__.py"
                walk(path / info.name, name)
            else:
                found[name] = path / f"{info.name}.py"

    walk(ROOT, PACKAGE)
    return found


MODULES = _modules()


def _optional_dependency_missing(module: str) -> Optional[str]:
    """The reason to skip importing ``module`` alone, if any: only an optional extra that
    is not installed (``pyro_nfvi.lightning`` needs PyTorch Lightning)."""
    if module == f"{PACKAGE}.lightning" and importlib.util.find_spec("lightning") is None:
        return "PyTorch Lightning is not installed"
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports_alone(module):
    """``python -c "import <module>"`` in a fresh interpreter: an import that only works
    after some other module was imported first (a cycle resolved by luck) fails here."""
    reason = _optional_dependency_missing(module)
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]))
    code = f"import {module}, sys; assert sys.modules[{PACKAGE!r}].__file__ == {str(ROOT / '__init__.py')!r}"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT.parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"import {module} failed alone:\n{proc.stderr[-3000:]}"


def _is_type_checking_block(node: ast.stmt) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _statements(tree: ast.Module, deferred: bool) -> List[ast.stmt]:
    """The import statements executed at import time (module level, including inside
    ``try``/``if``/``with`` blocks but not ``if TYPE_CHECKING:``), plus, with ``deferred``,
    those inside functions and classes."""
    if deferred:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        elif not _is_type_checking_block(node):
            for field in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(node, field, []) or [])
    return out


def _resolve(module: str, node: ast.stmt) -> Set[str]:
    """The package's modules that an import statement in ``module`` imports by name."""
    names = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        if node.level:  # relative: from the importing module's package upwards
            is_pkg = MODULES[module].name == "__init__.py"
            parts = module.split(".") if is_pkg else module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:  # `from pkg import submodule` imports the submodule
            sub = f"{base}.{alias.name}"
            names.add(sub if sub in MODULES else base)
    # `import a.b.c` binds a, but the module whose code it needs is a.b.c
    return {n for n in names if n in MODULES and n != module}


def import_graph(deferred: bool) -> Dict[str, Set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[module] = set().union(*(_resolve(module, n) for n in _statements(tree, deferred)))
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or ``None`` (depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_cycle():
    """The checker itself: a cycle through a relative import is reported, a DAG is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    fused = f"{PACKAGE}.transforms._fused"
    assert fused in MODULES  # the parser resolves `from .planar import x` inside it
    node = ast.parse("from .planar import stacked_planar_packed").body[0]
    assert _resolve(fused, node) == {f"{PACKAGE}.transforms.planar"}
    node = ast.parse("from .. import _compat").body[0]
    assert _resolve(fused, node) == {f"{PACKAGE}._compat"}


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-deferred"])
def test_import_graph_is_acyclic(deferred):
    """The package's import graph, built from the source, has no cycle: not among
    module-level imports, nor once imports deferred into functions (the usual way to
    hide a cycle) are counted."""
    graph = import_graph(deferred)
    assert len(graph) == len(MODULES) > 5
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
