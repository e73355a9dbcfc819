"""pyro_nfvi: normalizing-flow variational inference for Pyro.

Planar and radial flows with exact log-determinants and exact inverses of any point,
conditional (hypernetwork) variants, fused K-layer stacks, and flow autoguides.
"""

from . import helpers, transforms
from .helpers import (
    conditional_planar,
    conditional_planar_flow,
    conditional_radial,
    conditional_radial_flow,
    planar,
    planar_flow,
    radial,
    radial_flow,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "conditional_planar",
    "conditional_planar_flow",
    "conditional_radial",
    "conditional_radial_flow",
    "helpers",
    "planar",
    "planar_flow",
    "radial",
    "radial_flow",
    "transforms",
]
