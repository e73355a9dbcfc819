"""Flow transforms with exact log-determinants and exact inverses of any point."""

from .hamiltonian import Hamiltonian, PhaseSpaceLift, PhaseSpaceTarget
from .planar import (
    ConditionalPlanar,
    ConditionalStackedPlanar,
    ConditionedPlanar,
    ConditionedStackedPlanar,
    Planar,
    StackedPlanar,
)
from .radial import (
    ConditionalRadial,
    ConditionalStackedRadial,
    ConditionedRadial,
    ConditionedStackedRadial,
    Radial,
    StackedRadial,
)
from .sylvester import (
    ConditionalStackedSylvester,
    ConditionalSylvester,
    ConditionedStackedSylvester,
    ConditionedSylvester,
    StackedSylvester,
    Sylvester,
)

__all__ = [
    "ConditionalPlanar",
    "ConditionalRadial",
    "ConditionalStackedPlanar",
    "ConditionalStackedRadial",
    "ConditionedPlanar",
    "ConditionedRadial",
    "ConditionedStackedPlanar",
    "ConditionedStackedRadial",
    "Planar",
    "Radial",
    "StackedPlanar",
    "StackedRadial",
    "ConditionalStackedSylvester",
    "ConditionalSylvester",
    "ConditionedStackedSylvester",
    "ConditionedSylvester",
    "StackedSylvester",
    "Sylvester",
    "Hamiltonian",
    "PhaseSpaceLift",
    "PhaseSpaceTarget",
]
