"""The tutorial notebooks (``tutorials/*.ipynb``) are part of the test suite.

For every notebook (found by glob, so new notebooks are picked up automatically):

* ``test_notebook_outputs_are_current``: the committed outputs were produced in full mode
  by ``tutorials/execute.py`` from the package sources and the notebook cells that are
  in the working tree now (the stamp's ``package_sha256`` and ``cells_sha256`` equal the
  hashes recomputed here: change one line of ``pyro_nfvi/`` or of any code or markdown
  cell and this fails), and no output shows an error, stderr text, a warning or a log
  line (``execute.staleness``);
* ``test_notebook_runs_short``: the notebook runs top to bottom in short mode
  (``PYRO_NFVI_SHORT=1``) on a temporary copy, in a kernel started with the interpreter
  that runs pytest (no installed kernelspec needed); any cell error, including a failed
  ``assert`` in the notebook's final check cell, fails the test, and so does noise in its
  outputs. Nothing is written back.

The stamp also records the Python / torch / Pyro versions; they are not compared.
To refresh the notebooks after a change: ``python tutorials/execute.py --all``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

from _helpers import write_fake_mnist

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: per-cell timeout for the short-mode run (the whole notebook should take ~30 s).
SHORT_CELL_TIMEOUT = 600


def _load_execute():
    spec = importlib.util.spec_from_file_location("_pyro_nfvi_tutorials_execute",
                                                  TUTORIALS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute()


def _notebook(cells, outputs=()):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell, outs in zip(code, outputs):
        cell.execution_count = 1
        cell.outputs = [nbformat.v4.new_output(**o) for o in outs]
    return nb


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


def test_cells_hash_sees_code_and_markdown():
    nb = _notebook([("md", "# title"), ("code", "x = 1")])
    h = execute.cells_sha256(nb)
    nb.cells[0].source = "# title."
    assert execute.cells_sha256(nb) != h
    nb.cells[0].source = "# title"
    assert execute.cells_sha256(nb) == h
    nb.cells[1].source = "x = 2"
    assert execute.cells_sha256(nb) != h
    # moving text across a cell boundary changes the hash
    a = _notebook([("code", "x = 1\n"), ("code", "y = 2")])
    b = _notebook([("code", "x = 1"), ("code", "\ny = 2")])
    assert execute.cells_sha256(a) != execute.cells_sha256(b)
    # outputs and execution counts do not enter it
    c = _notebook([("code", "x = 1\n"), ("code", "y = 2")],
                  [[dict(output_type="stream", name="stdout", text="1\n")]])
    assert execute.cells_sha256(c) == execute.cells_sha256(a)


def test_package_hash_sees_every_line(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    h = execute.package_sha256(pkg)
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert execute.package_sha256(pkg) != h
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    assert execute.package_sha256(pkg) == h
    (pkg / "c.py").write_text("")                       # a new (even empty) module
    assert execute.package_sha256(pkg) != h
    (pkg / "c.py").unlink()
    (pkg / "sub" / "b.py").rename(pkg / "b.py")         # same bytes, other path
    assert execute.package_sha256(pkg) != h
    assert len(execute.package_sha256()) == 64          # the real package hashes


@pytest.mark.parametrize("output, expected", [
    (dict(output_type="stream", name="stdout", text="KL = 0.01\nmode: full\n"), None),
    (dict(output_type="stream", name="stderr", text="something\n"), "stderr"),
    (dict(output_type="stream", name="stdout", text="INFO \t Guessed max_plate_nesting = 2\n"),
     "log"),
    (dict(output_type="stream", name="stdout", text="a\nUserWarning: careful\n"), "warning"),
    (dict(output_type="execute_result", data={"text/plain": "RuntimeWarning: overflow"},
          execution_count=1), "warning"),
    (dict(output_type="error", ename="ValueError", evalue="bad", traceback=[]), "error"),
])
def test_output_problems_flags_noise(output, expected):
    nb = _notebook([("code", "pass")], [[output]])
    problems = execute.output_problems(nb)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_staleness_of_a_fresh_stamp(tmp_path):
    nb = _notebook([("md", "# t"), ("code", "print('mode: full')")],
                   [[dict(output_type="stream", name="stdout", text="mode: full\n")]])
    nb.metadata[execute.METADATA_KEY] = execute.stamp(nb, "full")
    assert execute.staleness(nb) == []
    assert set(execute.stamp(nb, "full")["versions"]) >= {"python", "torch", "pyro"}
    nb.metadata[execute.METADATA_KEY]["package_sha256"] = "0" * 64
    assert any("package" in r for r in execute.staleness(nb))
    nb.metadata[execute.METADATA_KEY] = execute.stamp(nb, "short")
    assert any("'short'" in r for r in execute.staleness(nb))
    nb.metadata[execute.METADATA_KEY] = execute.stamp(nb, "full")
    nb.cells[0].source = "# t (edited)"
    assert any("cells changed" in r for r in execute.staleness(nb))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_current(path):
    nb = nbformat.read(path, as_version=4)
    reasons = execute.staleness(nb)
    assert not reasons, (f"{path.name} is stale:\n  - " + "\n  - ".join(reasons)
                         + "\nre-run: python tutorials/execute.py --all  (full mode, then commit)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_short(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    t0 = time.perf_counter()
    # as tests/conftest.py does for this process: one intra-op thread for small tensors
    threads = os.environ.get("PYRO_NFVI_TEST_THREADS", "1")
    # notebooks that read MNIST get small synthetic IDX files (no real data, no download)
    data = write_fake_mnist(tmp_path / "data", num_train=600, num_test=1000)
    nb = execute.execute_notebook(copy, short=True, timeout=SHORT_CELL_TIMEOUT, cwd=tmp_path,
                                  write=False, extra_env={"OMP_NUM_THREADS": threads,
                                                          "PYRO_NFVI_DATA": str(data)})
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s in short mode")
    problems = execute.output_problems(nb)
    assert not problems, f"{path.name} (short mode) prints noise:\n" + "\n".join(problems)
