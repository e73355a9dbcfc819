"""Normalizing-flow autoguides for Pyro.

:class:`AutoNormalizingFlow` is a drop-in superset of
:class:`pyro.infer.autoguide.AutoNormalizingFlow`; :class:`AutoPlanarFlow`,
:class:`AutoRadialFlow` and :class:`AutoSylvesterFlow` are shortcuts that stack planar /
radial (Rezende & Mohamed 2015) / Sylvester (van den Berg et al. 2018) flows.

The package, one concern per module:

* ``flow`` — :class:`AutoNormalizingFlow`: the autoguide contract, one sample end to end;
* ``families`` — the planar / radial / Sylvester guides and their layer factories;
* ``posterior`` — the variational distribution (``N(0, I)`` or Student-t -> flow -> affine,
  ``log q`` in the same pass);
* ``stl`` — the sticking-the-landing surrogate and the score push;
* ``placement`` — finding hierarchical sites and placing them (partial non-centring);
* ``curvature`` — initial scales and centredness from the log joint's curvature;
* ``prototype`` — the latent sites' layout from the model's trace, and its checks;
* ``summaries`` — quantiles and medians;
* ``neutra`` — the guide's transform through the placement, for NeuTra (flow-preconditioned
  NUTS), and :class:`NeuTraReparam` for placements that depend on the model's arguments;
* ``hamiltonian`` — :class:`AutoHamiltonianFlow`, a planar pre-flow refined by
  Hamiltonian (leapfrog) layers that follow the model's own gradient.
"""

from .families import AutoPlanarFlow, AutoRadialFlow, AutoSylvesterFlow
from .flow import FULL_RANK_MAX_DIM, AutoNormalizingFlow  # noqa: F401
from .hamiltonian import AutoHamiltonianFlow
from .neutra import NeuTraReparam

# where guides pickled before the split (pyro_nfvi/guides.py) find what they reference
from .families import _make_planar_flow, _make_radial_flow  # noqa: F401
from .posterior import _FlowPosterior  # noqa: F401

__all__ = [
    "AutoHamiltonianFlow",
    "AutoNormalizingFlow",
    "AutoPlanarFlow",
    "AutoRadialFlow",
    "AutoSylvesterFlow",
    "NeuTraReparam",
]
