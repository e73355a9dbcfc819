"""Which setting of the default flow guide limits it on a model: one lever at a time (issue 24).

Each variant is the default :class:`pyro_nfvi.guides.AutoPlanarFlow` with ONE setting changed
(layer family, number of layers, Sylvester bottleneck, the hierarchical placement's
centredness, the initial scale); every variant trains with the posterior suite's settings and
is scored by the suite's own metrics (:mod:`posterior_suite`), so rows compare with its
tables. The learning rate is a training setting, not a guide option: vary it with ``--lr``.

    python benchmarks/suite_levers.py --models softmax --seeds 0 1 2 --out levers.json
    python benchmarks/suite_levers.py --models softmax --variants planar-16 --lr 0.005
    python benchmarks/suite_levers.py --list

Extra flags are the suite's (``--steps``, ``--num-particles``, ``--lr``, ...); the default
variants are every one in :data:`VARIANTS` plus ``AutoIAFNormal`` and
``AutoMultivariateNormal`` for reference.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, List, Optional, Sequence

import posterior_suite
from pyro_nfvi import guides

#: name -> constructor ``model -> guide``; ``planar-16`` is the default guide.
VARIANTS: Dict[str, Callable] = {
    "planar-8": functools.partial(guides.AutoPlanarFlow, num_flows=8),
    "planar-16": guides.AutoPlanarFlow,
    "planar-32": functools.partial(guides.AutoPlanarFlow, num_flows=32),
    "planar-64": functools.partial(guides.AutoPlanarFlow, num_flows=64),
    "planar-16-diag": functools.partial(guides.AutoPlanarFlow, full_rank=False),
    "planar-16-c1": functools.partial(guides.AutoPlanarFlow, centered=1.0),
    "planar-16-c0": functools.partial(guides.AutoPlanarFlow, centered=0.0),
    "planar-16-s0.1": functools.partial(guides.AutoPlanarFlow, init_scale=0.1),
    "planar-16-nostl": functools.partial(guides.AutoPlanarFlow, stl=False),
    "radial-16": guides.AutoRadialFlow,
    "sylvester-4-M8": functools.partial(guides.AutoSylvesterFlow, num_flows=4, bottleneck=8),
    "sylvester-4-MD": functools.partial(guides.AutoSylvesterFlow, num_flows=4),
    "sylvester-8-MD": functools.partial(guides.AutoSylvesterFlow, num_flows=8),
}
REFERENCE_GUIDES = ("AutoIAFNormal", "AutoMultivariateNormal")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list" in argv:
        print("\n".join(VARIANTS))
        return 0
    posterior_suite.GUIDES.update(VARIANTS)
    if "--variants" in argv:  # --variants a b c  ->  --guides a b c
        argv[argv.index("--variants")] = "--guides"
    elif "--guides" not in argv:
        argv += ["--guides", *REFERENCE_GUIDES, *VARIANTS]
    return posterior_suite.main(argv)


if __name__ == "__main__":
    sys.exit(main())
