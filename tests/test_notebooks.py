"""The tutorial notebooks (``tutorials/*.ipynb``) are part of the test suite.

For every notebook (found by glob, so new notebooks are picked up automatically):

* ``test_notebook_outputs_are_current``: the committed outputs were produced in full mode
  by ``tutorials/execute.py`` from the code that is in the notebook now (the stamp
  ``metadata.pyro_nfvi.code_sha256`` equals the hash of the current code cells);
* ``test_notebook_runs_short``: the notebook runs top to bottom in short mode
  (``PYRO_NFVI_SHORT=1``) on a temporary copy, in a kernel started with the interpreter
  that runs pytest (no installed kernelspec needed); any cell error, including a failed
  ``assert`` in the notebook's final check cell, fails the test. Nothing is written back.

To refresh a notebook after editing it: ``python tutorials/execute.py tutorials/NAME.ipynb``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: per-cell timeout for the short-mode run (the whole notebook should take ~1 minute).
SHORT_CELL_TIMEOUT = 600


def _load_execute():
    spec = importlib.util.spec_from_file_location("_pyro_nfvi_tutorials_execute",
                                                  TUTORIALS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _load_execute()


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_current(path):
    nb = nbformat.read(path, as_version=4)
    stamp = nb.metadata.get(execute.METADATA_KEY)
    fix = f"re-run: python tutorials/execute.py tutorials/{path.name}"
    assert stamp, f"{path.name} was never executed by tutorials/execute.py; {fix}"
    assert stamp.get("mode") == "full", (
        f"{path.name} was last executed in {stamp.get('mode')!r} mode, not 'full'; {fix}")
    assert stamp.get("code_sha256") == execute.code_sha256(nb), (
        f"the code of {path.name} changed after its outputs were produced; {fix}")
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cells"
    assert all(c.get("execution_count") for c in code_cells if c.source.strip()), (
        f"{path.name} has code cells without outputs; {fix}")
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with an error output; {fix}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_short(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    t0 = time.perf_counter()
    # as tests/conftest.py does for this process: one intra-op thread for small tensors
    threads = os.environ.get("PYRO_NFVI_TEST_THREADS", "1")
    execute.execute_notebook(copy, short=True, timeout=SHORT_CELL_TIMEOUT, cwd=tmp_path,
                             write=False, extra_env={"OMP_NUM_THREADS": threads})
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s in short mode")
