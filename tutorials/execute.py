"""Execute the tutorial notebooks in place and stamp them.

Usage::

    python tutorials/execute.py tutorials/01_planar_radial_2d.ipynb [more.ipynb ...]
    python tutorials/execute.py tutorials/*.ipynb --short      # quick smoke run
    python tutorials/execute.py tutorials/02_*.ipynb --timeout 1200

Every notebook is run top to bottom with ``nbclient`` in a fresh IPython kernel that
uses *this* interpreter (``sys.executable``, so the kernel sees the same packages as
the caller, whatever kernelspecs are or are not installed), with the working directory
set to the notebook's folder and ``MPLBACKEND=Agg``. The outputs are written back into
the notebook, and its metadata gets::

    {"pyro_nfvi": {"code_sha256": "<hash of the code cells>", "mode": "full" | "short"}}

Conventions shared by all notebooks:

* the environment variable ``PYRO_NFVI_SHORT=1`` selects *short mode* (tiny step counts,
  used by the test suite); unset means *full mode*, what a reader gets;
* the first code cell reads it: ``SHORT = os.environ.get("PYRO_NFVI_SHORT") == "1"``;
* committed notebooks are executed in full mode (``tests/test_notebooks.py`` checks the
  stamp: a notebook whose code changed after its outputs were produced fails).

``--short`` exists for quick checks; do not commit a notebook stamped ``"short"``.
The helpers :func:`code_sha256` and :func:`execute_notebook` are imported by the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import nbformat

METADATA_KEY = "pyro_nfvi"
SHORT_ENV = "PYRO_NFVI_SHORT"
#: separator between code cells in the hashed text (cannot occur in a cell boundary
#: by accident: it contains an ASCII record separator).
_CELL_SEPARATOR = "\n\x1e\n"


def code_sha256(nb: nbformat.NotebookNode) -> str:
    """SHA-256 (hex) of the sources of the notebook's code cells, in order, joined by a
    fixed separator. Markdown cells and outputs do not enter the hash."""
    sources = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            src = cell.source
            if isinstance(src, list):  # nbformat normalises to str, but be safe
                src = "".join(src)
            sources.append(src)
    return hashlib.sha256(_CELL_SEPARATOR.join(sources).encode("utf-8")).hexdigest()


def _kernel_manager(env: Dict[str, str]):
    """An ``AsyncKernelManager`` whose kernel is ``sys.executable -m ipykernel_launcher``.

    Looking up the ``python3`` kernelspec by name is fragile: a kernelspec installed in
    a venv may say ``"python"`` (resolved on ``PATH``, possibly another interpreter), and
    a user-level kernelspec may point to a different environment. Building the spec
    here guarantees the kernel runs with the interpreter that runs this script / pytest.
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec = KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python 3 (ipykernel)",
        language="python",
        env=dict(env),
        resource_dir="",
    )

    class _ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):  # noqa: D401 - jupyter_client API
            return spec

    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())


def execute_notebook(
    path,
    short: bool = False,
    timeout: Optional[int] = 1800,
    cwd=None,
    write: bool = True,
    extra_env: Optional[Dict[str, str]] = None,
) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` top to bottom and return the executed notebook.

    :param short: set ``PYRO_NFVI_SHORT=1`` in the kernel (short mode); otherwise the
        variable is removed from the kernel's environment (full mode).
    :param timeout: per-cell timeout in seconds (``None``: no limit).
    :param cwd: kernel working directory (default: the notebook's folder).
    :param write: write the outputs and the ``pyro_nfvi`` metadata stamp back to ``path``.
    :param extra_env: more environment variables for the kernel (e.g. ``OMP_NUM_THREADS``).
    :raises nbclient.exceptions.CellExecutionError: if a cell raises.
    """
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != SHORT_ENV}
    env["MPLBACKEND"] = "Agg"
    env.update(extra_env or {})
    if short:
        env[SHORT_ENV] = "1"
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet debugpy warning
    # the kernel inherits os.environ: remove PYRO_NFVI_SHORT there too for full runs.
    saved = os.environ.pop(SHORT_ENV, None)
    try:
        client = NotebookClient(
            nb,
            km=_kernel_manager(env),
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(Path(cwd) if cwd else path.parent.resolve())}},
        )
        try:
            client.execute()
        except BaseException:
            # keep what ran, for debugging, outside the repository (and never stamped)
            failed = Path(tempfile.gettempdir()) / (path.stem + ".failed.ipynb")
            nbformat.write(nb, failed)
            print(f"partially executed notebook written to {failed}", file=sys.stderr)
            raise
    finally:
        if saved is not None:
            os.environ[SHORT_ENV] = saved
    nb.metadata[METADATA_KEY] = {
        "code_sha256": code_sha256(nb),
        "mode": "short" if short else "full",
    }
    # a kernelspec block that names a specific environment is noise in the repo
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    if write:
        nbformat.write(nb, path)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", help="notebooks to execute in place")
    parser.add_argument("--short", action="store_true",
                        help=f"short mode ({SHORT_ENV}=1); do not commit the result")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="per-cell timeout in seconds (default 1800; 0 = none)")
    args = parser.parse_args(argv)
    status = 0
    for name in args.notebooks:
        t0 = time.perf_counter()
        mode = "short" if args.short else "full"
        print(f"executing {name} ({mode} mode) ...", flush=True)
        try:
            execute_notebook(name, short=args.short, timeout=args.timeout or None)
        except Exception as e:  # report and go on with the next notebook
            print(f"FAILED {name} after {time.perf_counter() - t0:.1f} s:\n{e}", file=sys.stderr)
            status = 1
            continue
        print(f"ok {name}: {time.perf_counter() - t0:.1f} s ({mode} mode), outputs written",
              flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
