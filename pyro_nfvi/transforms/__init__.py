"""Flow transforms with exact log-determinants and exact inverses of any point."""

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
]
