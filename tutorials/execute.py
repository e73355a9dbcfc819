"""Execute the tutorial notebooks in place and stamp them.

Usage::

    python tutorials/execute.py --all                       # every notebook, full mode (commit this)
    python tutorials/execute.py tutorials/01_planar_radial_2d.ipynb [more.ipynb ...]
    python tutorials/execute.py --all --short               # quick smoke run; do not commit
    python tutorials/execute.py --check                     # which notebooks are stale, and why

Every notebook is run top to bottom with ``nbclient`` in a fresh IPython kernel that
uses *this* interpreter (``sys.executable``, so the kernel sees the same packages as
the caller, whatever kernelspecs are or are not installed), with the working directory
set to the notebook's folder, ``MPLBACKEND=Agg`` and one intra-op thread per library
(``OMP_NUM_THREADS=1`` etc., unless already set). The outputs are written back into the
notebook, and its metadata gets the stamp::

    {"pyro_nfvi": {
        "mode": "full" | "short",
        "cells_sha256": "<hash of every code and markdown cell>",
        "package_sha256": "<hash of pyro_nfvi/**/*.py>",
        "versions": {"python": ..., "torch": ..., "pyro": ..., "numpy": ...},
        "seconds": <wall time of the run>}}

``tests/test_notebooks.py`` recomputes both hashes from the working tree and fails if
either differs (so *any* change to the package's source or to a notebook's cells makes
the committed outputs stale), if the stamp is not ``"full"``, or if an output shows an
error, a warning, a log line or stderr text (:func:`output_problems`). The versions are
recorded and printed by each notebook's first cell, but not compared: a new torch or
Pyro release must not fail the test suite.

Conventions shared by all notebooks:

* the environment variable ``PYRO_NFVI_SHORT=1`` selects *short mode* (tiny step counts,
  used by the test suite); unset means *full mode*, what a reader gets;
* the first code cell reads it, ``SHORT = os.environ.get("PYRO_NFVI_SHORT") == "1"``,
  and prints ``mode: full`` or ``mode: short`` and the Python / torch / Pyro versions.

Do not commit a notebook stamped ``"short"``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

import nbformat

METADATA_KEY = "pyro_nfvi"
SHORT_ENV = "PYRO_NFVI_SHORT"
TUTORIALS = Path(__file__).resolve().parent
ROOT = TUTORIALS.parent
PACKAGE = ROOT / "pyro_nfvi"
#: separator between cells in the hashed text: contains an ASCII record separator, so
#: it cannot be produced by moving text across a cell boundary.
_CELL_SEPARATOR = "\n\x1e\n"
#: output text that must not appear in a committed notebook: warnings, log records
#: (``INFO``, ``WARNING`` ... at the start of a line, as Pyro's and Python's loggers
#: print them) and tracebacks.
_NOISE = re.compile(
    r"Warning\b|Traceback \(most recent call last\)|^\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b",
    re.MULTILINE,
)


def _source(cell) -> str:
    src = cell.source
    return "".join(src) if isinstance(src, list) else src  # nbformat gives str; be safe


def code_sha256(nb: nbformat.NotebookNode) -> str:
    """SHA-256 (hex) of the notebook's code cells only (kept for old stamps)."""
    sources = [_source(c) for c in nb.cells if c.cell_type == "code"]
    return hashlib.sha256(_CELL_SEPARATOR.join(sources).encode("utf-8")).hexdigest()


def cells_sha256(nb: nbformat.NotebookNode) -> str:
    """SHA-256 (hex) of every code *and* markdown cell: type and source, in order.
    Outputs, execution counts and metadata do not enter the hash."""
    parts = [f"{c.cell_type}\n{_source(c)}" for c in nb.cells if c.cell_type in ("code", "markdown")]
    return hashlib.sha256(_CELL_SEPARATOR.join(parts).encode("utf-8")).hexdigest()


def package_sha256(package_dir=PACKAGE) -> str:
    """SHA-256 (hex) of the package's Python sources, ``package_dir/**/*.py``, in the
    working tree: each file's path (relative, POSIX) and bytes, in sorted path order.
    A change to any line of the package (or a new, removed or renamed module) changes it."""
    package_dir = Path(package_dir)
    files = sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no *.py files under {package_dir}")
    h = hashlib.sha256()
    for p in files:
        rel = p.relative_to(package_dir).as_posix().encode("utf-8")
        data = p.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def versions() -> Dict[str, str]:
    """Versions of the interpreter and of the libraries the notebooks' numbers depend on
    (recorded in the stamp, not compared by the tests)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "pyro-ppl", "numpy"):
        try:
            out[name.replace("-ppl", "")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-ppl", "")] = "not installed"
    return out


def stamp(nb: nbformat.NotebookNode, mode: str, seconds: Optional[float] = None) -> dict:
    """The metadata stamp of a notebook executed now in ``mode``."""
    out = {"mode": mode, "cells_sha256": cells_sha256(nb), "package_sha256": package_sha256(),
           "versions": versions()}
    if seconds is not None:
        out["seconds"] = round(float(seconds), 1)
    return out


def _output_texts(output) -> List[str]:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
        return ["".join(text) if isinstance(text, list) else text]
    data = output.get("data", {})
    texts = []
    for mime in ("text/plain", "text/markdown", "text/html"):
        if mime in data:
            value = data[mime]
            texts.append("".join(value) if isinstance(value, list) else value)
    return texts


def output_problems(nb: nbformat.NotebookNode) -> List[str]:
    """What a reader should not see in the outputs: error outputs (tracebacks), text on
    stderr (warnings, log records, progress bars), and stdout/display text that looks
    like a warning, a log record or a traceback. Empty list: clean."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "error":
                problems.append(f"cell {i}: error output {out.get('ename')}: {out.get('evalue')}")
                continue
            if kind == "stream" and out.get("name") == "stderr":
                text = "".join(_output_texts(out)).strip().splitlines()
                problems.append(f"cell {i}: stderr output: {text[0][:120] if text else ''!r}")
                continue
            for text in _output_texts(out):
                m = _NOISE.search(text)
                if m:
                    line = text[m.start():].splitlines()[0]
                    problems.append(f"cell {i}: warning/log/traceback text: {line[:120]!r}")
    return problems


def staleness(nb: nbformat.NotebookNode) -> List[str]:
    """Why the notebook's outputs are not current (empty list: current): no stamp, not
    executed in full mode, package sources or cells changed since, cells without outputs,
    or problems in the outputs (:func:`output_problems`)."""
    st = nb.metadata.get(METADATA_KEY)
    if not st:
        return ["never executed by tutorials/execute.py (no stamp)"]
    reasons = []
    if st.get("mode") != "full":
        reasons.append(f"executed in {st.get('mode')!r} mode, not 'full'")
    if st.get("package_sha256") != package_sha256():
        reasons.append("the package sources (pyro_nfvi/**/*.py) changed since it was executed")
    if st.get("cells_sha256") != cells_sha256(nb):
        reasons.append("its code or markdown cells changed since it was executed")
    code = [c for c in nb.cells if c.cell_type == "code" and _source(c).strip()]
    if not code:
        reasons.append("no code cells")
    elif not all(c.get("execution_count") for c in code):
        reasons.append("some code cells were not executed")
    printed = "\n".join(t for c in code for o in c.get("outputs", []) for t in _output_texts(o))
    if "mode: full" not in printed or "mode: short" in printed:
        reasons.append("its outputs do not say 'mode: full' (first code cell)")
    reasons += output_problems(nb)
    return reasons


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
    """Run the notebook at ``path`` top to bottom and return the executed notebook,
    stamped (:func:`stamp`).

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
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")  # small tensors: one thread is fastest, and shares the CPU
    env.update(extra_env or {})
    if short:
        env[SHORT_ENV] = "1"
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiet debugpy warning
    # the kernel inherits os.environ: remove PYRO_NFVI_SHORT there too for full runs.
    saved = os.environ.pop(SHORT_ENV, None)
    t0 = time.perf_counter()
    # the package the kernel imports: hashed before the run, checked after it
    package_before = package_sha256()
    try:
        client = NotebookClient(
            nb,
            km=_kernel_manager(env),
            timeout=timeout,
            kernel_name="python3",
            shutdown_kernel="immediate",
            resources={"metadata": {"path": str(Path(cwd) if cwd else path.parent.resolve())}},
        )
        try:
            # the client does not own a kernel manager passed in, so it would leave the
            # kernel running (still computing after a timeout): shut it down explicitly
            client.execute(cleanup_kc=True)
        except BaseException:
            # keep what ran, for debugging, outside the repository (and never stamped)
            failed = Path(tempfile.gettempdir()) / (path.stem + ".failed.ipynb")
            nbformat.write(nb, failed)
            print(f"partially executed notebook written to {failed}", file=sys.stderr)
            raise
    finally:
        if saved is not None:
            os.environ[SHORT_ENV] = saved
    nb.metadata[METADATA_KEY] = stamp(nb, "short" if short else "full", time.perf_counter() - t0)
    if package_sha256() != package_before:
        # someone edited the package during the run: stamp what the kernel imported, so
        # the notebook reads as stale against the edited package
        nb.metadata[METADATA_KEY]["package_sha256"] = package_before
        print(f"warning: pyro_nfvi/ changed while {path.name} ran; it is stamped with the "
              "package as it was at the start, re-execute it", file=sys.stderr)
    # a kernelspec block that names a specific environment is noise in the repo
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    if write:
        nbformat.write(nb, path)
    return nb


def all_notebooks() -> List[Path]:
    return sorted(TUTORIALS.glob("*.ipynb"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to execute in place")
    parser.add_argument("--all", action="store_true", help="every tutorials/*.ipynb")
    parser.add_argument("--short", action="store_true",
                        help=f"short mode ({SHORT_ENV}=1); do not commit the result")
    parser.add_argument("--check", action="store_true",
                        help="execute nothing; list the notebooks whose outputs are stale")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="per-cell timeout in seconds (default 1800; 0 = none)")
    args = parser.parse_args(argv)
    paths = all_notebooks() if args.all or (args.check and not args.notebooks) else [
        Path(n) for n in args.notebooks]
    if not paths:
        parser.error("name notebooks or pass --all")
    if args.check:
        stale = 0
        for path in paths:
            reasons = staleness(nbformat.read(path, as_version=4))
            stale += bool(reasons)
            print(f"{'STALE' if reasons else 'ok   '} {path.name}"
                  + "".join(f"\n      - {r}" for r in reasons))
        return int(stale > 0)
    status = 0
    total = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        mode = "short" if args.short else "full"
        print(f"executing {path} ({mode} mode) ...", flush=True)
        try:
            nb = execute_notebook(path, short=args.short, timeout=args.timeout or None)
        except Exception as e:  # report and go on with the next notebook
            print(f"FAILED {path} after {time.perf_counter() - t0:.1f} s:\n{e}", file=sys.stderr)
            status = 1
            continue
        problems = output_problems(nb)
        for p in problems:
            print(f"  output problem: {p}", file=sys.stderr)
        status |= bool(problems)
        print(f"{'ok' if not problems else 'NOISY'} {path}: {time.perf_counter() - t0:.1f} s "
              f"({mode} mode), outputs written", flush=True)
    print(f"total {time.perf_counter() - total:.1f} s for {len(paths)} notebook(s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
