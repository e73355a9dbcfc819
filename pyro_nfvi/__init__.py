"""pyro_nfvi: normalizing-flow variational inference for Pyro.

Planar, radial, Sylvester and Hamiltonian flows with exact log-determinants and exact
inverses of any point, conditional (hypernetwork) variants, fused K-layer stacks, flow
autoguides, amortized flow posteriors, 2-D benchmark targets, training helpers, a
hyperparameter search and diagnostics. ``pyro_nfvi.plotting`` (matplotlib)
is imported on first use.
"""

import importlib

from . import diagnostics, guides, helpers, infer, targets, testing, transforms
from .guides import AutoNormalizingFlow, AutoPlanarFlow, AutoRadialFlow, AutoSylvesterFlow
from .guides import AutoHamiltonianFlow
from .helpers import (
    conditional_planar,
    conditional_planar_flow,
    conditional_radial,
    conditional_radial_flow,
    conditional_sylvester,
    conditional_sylvester_flow,
    planar,
    planar_flow,
    radial,
    radial_flow,
    sylvester,
    sylvester_flow,
)
from .infer import fit, fit_density
from . import importance
from .importance import ImportanceWarning, WeightedPosterior, importance_sample

__version__ = "0.1.0"

__all__ = [
    "AutoHamiltonianFlow",
    "AutoNormalizingFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoSylvesterFlow",
    "ImportanceWarning",
    "WeightedPosterior",
    "__version__",
    "conditional_planar",
    "conditional_planar_flow",
    "conditional_radial",
    "conditional_radial_flow",
    "conditional_sylvester",
    "conditional_sylvester_flow",
    "diagnostics",
    "fit",
    "fit_density",
    "guides",
    "helpers",
    "importance",
    "importance_sample",
    "infer",
    "planar",
    "planar_flow",
    "plotting",
    "radial",
    "radial_flow",
    "sylvester",
    "sylvester_flow",
    "targets",
    "testing",
    "transforms",
    "tune",
    "tune_density",
]


def __getattr__(name):
    if name in ("plotting", "amortized", "tune"):
        # ``tune`` is a callable module: ``pyro_nfvi.tune(model, ...)`` runs the search;
        # it imports Optuna (the ``[tune]`` extra) only when called
        return importlib.import_module(f".{name}", __name__)
    if name == "tune_density":
        return importlib.import_module(".tune", __name__).tune_density
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
