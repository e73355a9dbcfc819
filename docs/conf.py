"""Sphinx configuration of the pyro_nfvi documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

The tutorials are the committed notebooks of ``tutorials/``, rendered with their stored
outputs (never executed here: ``tutorials/execute.py`` runs them). Sphinx only reads
sources inside this directory, so each notebook is copied next to
``tutorials/index.rst`` when the configuration is loaded (the copies are git-ignored).
"""

import importlib
import os
import pkgutil
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # document this checkout, not another installed copy

import pyro_nfvi  # noqa: E402

os.environ.setdefault("MPLBACKEND", "Agg")


def _copy_notebooks() -> None:
    """Copy ``tutorials/*.ipynb`` into ``docs/tutorials/`` (only the ones that changed,
    so an unchanged notebook is not re-read), and drop copies whose source is gone."""
    src_dir, dst_dir = os.path.join(ROOT, "tutorials"), os.path.join(HERE, "tutorials")
    wanted = sorted(f for f in os.listdir(src_dir) if f.endswith(".ipynb"))
    for name in wanted:
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        with open(src, "rb") as f:
            data = f.read()
        if os.path.exists(dst):
            with open(dst, "rb") as f:
                if f.read() == data:
                    continue
        shutil.copyfile(src, dst)
    for name in os.listdir(dst_dir):
        if name.endswith(".ipynb") and name not in wanted:
            os.remove(os.path.join(dst_dir, name))


_copy_notebooks()

# -- project -------------------------------------------------------------------------
project = "pyro_nfvi"
author = "the pyro_nfvi authors"
copyright = "the pyro_nfvi authors"
version = release = pyro_nfvi.__version__

# -- extensions ------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_nb",  # Markdown pages (MyST) and the notebooks
]
# No intersphinx: the build must not need the network. References to Pyro / torch
# objects render as plain code.

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
master_doc = root_doc = "index"

# -- autodoc -----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "description"  # type hints next to the parameters, not in signatures
autodoc_preserve_defaults = True
autodoc_mock_imports = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Docstrings refer to Pyro / torch names (``pyro.infer.Trace_ELBO``, ...) that are not
# part of this site; without intersphinx they cannot resolve, which is not an error here.
nitpicky = False

# -- doctest -----------------------------------------------------------------------------
# The docstring examples are written to run in their module's namespace (as
# ``doctest.testmod`` runs them, see tests/test_docs.py); here every page shares one, so
# it gets the public names of every module of the package.
_modules_with_all = sorted(
    m.name
    for m in pkgutil.walk_packages(pyro_nfvi.__path__, "pyro_nfvi.")
    if not m.name.endswith("__main__") and hasattr(importlib.import_module(m.name), "__all__")
)
doctest_global_setup = "\n".join(
    ["import torch", "import pyro"]
    + [f"from {name} import *" for name in _modules_with_all]
    + ["pyro.set_rng_seed(0)", "pyro.clear_param_store()"]
)
import doctest as _doctest  # noqa: E402

doctest_default_flags = _doctest.ELLIPSIS | _doctest.DONT_ACCEPT_TRUE_FOR_1
doctest_test_doctest_blocks = "default"

# -- MyST and notebooks -------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks carry their outputs; tutorials/execute.py runs them
nb_merge_streams = True

# -- HTML --------------------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_title = f"pyro_nfvi {release}"
html_show_sourcelink = False
html_theme_options = {"navigation_depth": 3}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
toc_object_entries = False  # every API entry has its own section title already
