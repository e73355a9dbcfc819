"""The documentation site (docs/): every public name has an entry, no machine paths.

The default tests read sources only (``ast`` and the ``.rst``/``.md`` text): they need
neither Sphinx nor an import of the package. The slow tests build the site with warnings
as errors, run its doctests, and run every docstring example of the package.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import os
import re
import subprocess
import sys
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "pyro_nfvi")
DOCS = os.path.join(ROOT, "docs")

# --------------------------------------------------------------------- the package side


def _module_files() -> Iterator[Tuple[str, str]]:
    """``(dotted module name, path)`` of every module of the package (not ``__main__``)."""
    for dirpath, dirnames, filenames in os.walk(PACKAGE):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
        for f in sorted(filenames):
            if not f.endswith(".py") or f == "__main__.py":
                continue
            yield (rel if f == "__init__.py" else f"{rel}.{f[:-3]}"), os.path.join(dirpath, f)


def _is_package(module: str) -> bool:
    return os.path.exists(os.path.join(ROOT, *module.split("."), "__init__.py"))


def _is_module(module: str) -> bool:
    path = os.path.join(ROOT, *module.split("."))
    return os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py"))


def _static_all(tree: ast.Module) -> Optional[List[str]]:
    """``__all__`` as the source builds it: ``= [...]``, ``+= [...]``, ``.append(...)``,
    ``.extend([...])`` at module level. ``None`` if the module has none."""
    names: Optional[List[str]] = None

    def strings(node) -> List[str]:
        value = ast.literal_eval(node)
        return [value] if isinstance(value, str) else list(value)

    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names = strings(node.value)
        elif isinstance(node, ast.AugAssign) and getattr(node.target, "id", None) == "__all__":
            names = (names or []) + strings(node.value)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "__all__":
                if func.attr == "append":
                    names = (names or []) + [ast.literal_eval(node.value.args[0])]
                elif func.attr == "extend":
                    names = (names or []) + strings(node.value.args[0])
    return names


def _relative_imports(module: str, tree: ast.Module) -> Dict[str, str]:
    """Names bound by ``from .x import y [as z]`` at module level: ``z -> pkg.x.y``."""
    package = module if _is_package(module) else module.rsplit(".", 1)[0]
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                out[alias.asname or alias.name] = f"{source}.{alias.name}"
    return out


def public_names() -> Dict[str, List[str]]:
    """Every module of the package that has an ``__all__``, with its names."""
    out = {}
    for module, path in _module_files():
        with open(path, encoding="utf-8") as f:
            names = _static_all(ast.parse(f.read()))
        if names is not None:
            out[module] = names
    return out


def _imports_of(module: str) -> Dict[str, str]:
    path = os.path.join(ROOT, *module.split("."))
    path = os.path.join(path, "__init__.py") if _is_package(module) else path + ".py"
    with open(path, encoding="utf-8") as f:
        return _relative_imports(module, ast.parse(f.read()))


# ------------------------------------------------------------------------ the docs side

_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(auto\w+|py:\w+)::\s+(\S+)\s*$")
_MYST_DIRECTIVE = re.compile(r"^(\s*)(?:```|:::)\{(auto\w+|py:\w+)\}\s+(\S+)\s*$")
_OPTION = re.compile(r"^\s*:([\w-]+):\s*(.*)$")


def _doc_sources() -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(DOCS):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("_"))
        for f in sorted(filenames):
            if f.endswith((".rst", ".md")):
                yield os.path.join(dirpath, f)


def documented(sources: Optional[List[str]] = None) -> Tuple[Set[str], Dict[str, Optional[Set[str]]]]:
    """``(objects, modules)`` from the directives of the doc sources: the dotted names
    given to ``auto*`` / ``py:*`` directives, and per ``automodule`` the names its
    ``:members:`` option documents (``None``: no ``:members:``; the empty set: all of
    ``__all__``)."""
    objects: Set[str] = set()
    modules: Dict[str, Optional[Set[str]]] = {}
    for path in sources if sources is not None else _doc_sources():
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            m = _RST_DIRECTIVE.match(line) or _MYST_DIRECTIVE.match(line)
            if not m:
                continue
            kind, name = m.group(2), m.group(3)
            objects.add(name)
            if kind != "automodule":
                continue
            members = modules.get(name)
            for opt in lines[i + 1 :]:
                o = _OPTION.match(opt)
                if not o:
                    break
                if o.group(1) == "members":
                    listed = {n.strip() for n in o.group(2).split(",") if n.strip()}
                    members = (members or set()) | listed if listed else set()
            modules[name] = members if members is not None else modules.get(name)
    return objects, modules


def undocumented(sources: Optional[List[str]] = None) -> List[str]:
    """The ``module.name`` of every ``__all__`` entry that no directive documents: neither
    under its own dotted name, nor (for a re-export) under the name it is imported from,
    nor through an ``automodule`` with ``:members:``; a submodule needs an
    ``automodule``."""
    objects, modules = documented(sources)
    alls = public_names()

    def covered(module: str, name: str, depth: int = 0) -> bool:
        full = f"{module}.{name}"
        if _is_module(full):
            return full in modules
        if full in objects:
            return True
        members = modules.get(module)
        if members is not None and (not members or name in members) and name in alls.get(module, []):
            return True
        source = _imports_of(module).get(name) if depth < 5 else None
        if source is not None:
            src_module, src_name = source.rsplit(".", 1)
            if src_name == name or _is_module(source):  # an alias needs its own entry
                return covered(src_module, src_name, depth + 1)
        return False

    return sorted(f"{m}.{n}" for m, names in alls.items() for n in names if not covered(m, n))


def test_package_has_public_names():
    alls = public_names()  # the checks below must not pass vacuously
    assert {"pyro_nfvi", "pyro_nfvi.transforms", "pyro_nfvi.guides", "pyro_nfvi.infer"} <= set(alls)
    assert "AutoPlanarFlow" in alls["pyro_nfvi"] and "Planar" in alls["pyro_nfvi.transforms"]


def test_every_public_name_has_a_doc_entry():
    missing = undocumented()
    assert not missing, f"no autodoc / py: entry in docs/ for: {missing}"


def test_doc_entry_check_catches_a_missing_name(tmp_path):
    """The checker itself: drop one entry from the real sources and it is reported."""
    sources, dropped = [], None
    for path in _doc_sources():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        target = ".. autofunction:: pyro_nfvi.helpers.planar_flow\n"
        if target in text:
            text, dropped = text.replace(target, ""), "pyro_nfvi.helpers.planar_flow"
        out = tmp_path / f"{len(sources)}{os.path.splitext(path)[1]}"
        out.write_text(text, encoding="utf-8")
        sources.append(str(out))
    assert dropped is not None
    # the name and its re-export at the package root
    assert undocumented(sources) == [dropped, "pyro_nfvi.planar_flow"]


# ------------------------------------------------------------------------- machine paths

_MACHINE_PATH = re.compile(r"/work/|/root/|/tmp/|/home/|\.\./shared|shared/DESIGN\.md")


def _text_files() -> Iterator[str]:
    """Everything a reader of the docs sees: docs sources and conf.py, the package
    (docstrings and comments), the tutorials (notebooks with their outputs, their README),
    the benchmarks, and the repository's Markdown files."""
    roots = [DOCS, PACKAGE, os.path.join(ROOT, "tutorials"), os.path.join(ROOT, "benchmarks")]
    for top in roots:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_build", "__pycache__", ".")))
            for f in sorted(filenames):
                if f.endswith((".py", ".rst", ".md", ".ipynb", ".txt")):
                    yield os.path.join(dirpath, f)
    for f in sorted(os.listdir(ROOT)):
        if f.endswith(".md"):
            yield os.path.join(ROOT, f)


def test_no_machine_paths_in_docs_or_docstrings():
    hits = []
    files = list(_text_files())
    assert any(f.endswith("design.md") for f in files) and any(f.endswith("guides.py") or
                                                                 "guides" + os.sep in f for f in files)
    for path in files:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if _MACHINE_PATH.search(line):
                    hits.append(f"{os.path.relpath(path, ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not hits, "machine or outside-the-repository paths:\n" + "\n".join(hits)


def test_machine_path_pattern_matches():
    for text in ("see /work/shared/DESIGN.md", "/root/.cache/x", "cd ../shared/data", "/tmp/run"):
        assert _MACHINE_PATH.search(text), text
    for text in ("docs/_build/html/index.html", "tutorials/execute.py", "$TMPDIR/NAME.ipynb"):
        assert not _MACHINE_PATH.search(text), text


# ---------------------------------------------------------------------------- slow: build


def _sphinx(builder: str, out_dir: str) -> subprocess.CompletedProcess:
    try:
        import myst_nb  # noqa: F401
        import sphinx  # noqa: F401
        import sphinx_rtd_theme  # noqa: F401
    except ImportError as e:  # a failure, not a skip: the check was asked for
        pytest.fail(f'building the docs needs the docs extra: pip install -e ".[docs]" ({e})')
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", builder, "-q",
           DOCS, out_dir]
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_sphinx_html_build_has_no_warnings(tmp_path):
    out = _sphinx("html", str(tmp_path / "html"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    assert "WARNING" not in out.stderr and "ERROR" not in out.stderr, out.stderr[-5000:]
    html = tmp_path / "html"
    for page in ["index", "design", "guides", "transforms/planar", "tutorials/01_planar_radial_2d"]:
        assert (html / f"{page}.html").exists(), page
    # the notebooks are rendered with their committed figures
    assert list((html / "_images").glob("*.png")), "no notebook figure in the build"


@pytest.mark.slow
def test_sphinx_doctests_pass(tmp_path):
    out = _sphinx("doctest", str(tmp_path / "doctest"))
    report = (tmp_path / "doctest" / "output.txt").read_text(encoding="utf-8")
    assert out.returncode == 0, report[-5000:] + out.stderr[-3000:]
    tested = [int(n) for n in re.findall(r"^\s*(\d+) tests?\b", report, re.M)]
    assert sum(tested) > 0, report[-3000:]
    assert "0 failures in tests" in report and "0 failures in setup code" in report, report[-3000:]


def _importable_modules() -> List[str]:
    return [m for m, _ in _module_files()]


@pytest.mark.slow
@pytest.mark.parametrize("module", _importable_modules())
def test_docstring_examples_of_every_module(module):
    """Every ``>>>`` example of the package, including the ones in ``Example::`` literal
    blocks, which Sphinx's doctest builder does not collect."""
    import pyro
    import torch

    mod = importlib.import_module(module)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    old = torch.get_default_dtype()
    try:
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS, report=True)
    finally:
        torch.set_default_dtype(old)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"
