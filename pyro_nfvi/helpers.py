"""One-line constructors for the flows, named as in :mod:`pyro.distributions.transforms`.

>>> import torch, pyro.distributions as dist
>>> from pyro_nfvi import helpers
>>> flow = helpers.planar_flow(2, num_flows=16)
>>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
>>> q.log_prob(torch.zeros(3, 2)).shape
torch.Size([3])
"""

from __future__ import annotations

from typing import Optional, Sequence

from pyro.nn import DenseNN

from .transforms._base import check_hidden_dims, check_input_dim
from .transforms.hamiltonian import Hamiltonian
from .transforms.planar import (
    ConditionalPlanar,
    ConditionalStackedPlanar,
    Planar,
    StackedPlanar,
)
from .transforms.radial import (
    ConditionalRadial,
    ConditionalStackedRadial,
    Radial,
    StackedRadial,
)
from .transforms.sylvester import (
    ConditionalStackedSylvester,
    ConditionalSylvester,
    StackedSylvester,
    Sylvester,
    _hyper_sizes,
    _resolve,
)

__all__ = [
    "planar",
    "radial",
    "conditional_planar",
    "conditional_radial",
    "planar_flow",
    "radial_flow",
    "conditional_planar_flow",
    "conditional_radial_flow",
    "sylvester",
    "conditional_sylvester",
    "sylvester_flow",
    "conditional_sylvester_flow",
    "hamiltonian",
]


def _hidden(input_dim: int, hidden_dims: Optional[Sequence[int]]) -> list:
    if hidden_dims is None:
        return [10 * input_dim, 10 * input_dim]  # Pyro's default
    return check_hidden_dims(hidden_dims)


def planar(input_dim: int) -> Planar:
    """A :class:`~pyro_nfvi.transforms.Planar` layer of dimension ``input_dim``."""
    return Planar(check_input_dim(input_dim))


def radial(input_dim: int) -> Radial:
    """A :class:`~pyro_nfvi.transforms.Radial` layer of dimension ``input_dim``."""
    return Radial(check_input_dim(input_dim))


def conditional_planar(
    input_dim: int, context_dim: int, hidden_dims: Optional[Sequence[int]] = None
) -> ConditionalPlanar:
    """A :class:`~pyro_nfvi.transforms.ConditionalPlanar` whose hypernetwork is a
    ``DenseNN(context_dim, hidden_dims, param_dims=[1, D, D])``; default hidden dims
    ``[10 * input_dim, 10 * input_dim]`` (as Pyro).

    >>> import torch
    >>> flow = conditional_planar(2, context_dim=3)
    >>> flow.condition(torch.randn(3))(torch.randn(2)).shape
    torch.Size([2])
    """
    input_dim = check_input_dim(input_dim)
    context_dim = check_input_dim(context_dim, "context_dim")
    hypernet = DenseNN(context_dim, _hidden(input_dim, hidden_dims), [1, input_dim, input_dim])
    return ConditionalPlanar(hypernet)


def conditional_radial(
    input_dim: int, context_dim: int, hidden_dims: Optional[Sequence[int]] = None
) -> ConditionalRadial:
    """A :class:`~pyro_nfvi.transforms.ConditionalRadial` whose hypernetwork is a
    ``DenseNN(context_dim, hidden_dims, param_dims=[D, 1, 1])``.

    >>> import torch
    >>> flow = conditional_radial(2, context_dim=3)
    >>> flow.condition(torch.randn(4, 3))(torch.randn(4, 2)).shape
    torch.Size([4, 2])
    """
    input_dim = check_input_dim(input_dim)
    context_dim = check_input_dim(context_dim, "context_dim")
    hypernet = DenseNN(context_dim, _hidden(input_dim, hidden_dims), [input_dim, 1, 1])
    return ConditionalRadial(hypernet)


def planar_flow(input_dim: int, num_flows: int, compile: bool = False) -> StackedPlanar:
    """``num_flows`` planar layers as ONE :class:`~pyro.distributions.TransformModule`
    (a :class:`~pyro_nfvi.transforms.StackedPlanar`), equal to composing ``num_flows``
    :func:`planar` layers. ``compile=True`` runs the forward through ``torch.compile``
    (after a warm-up of seconds to a minute; falls back to eager if unavailable); the
    default hand-written kernel is as fast for planar stacks, see
    :class:`~pyro_nfvi.transforms.StackedPlanar`.

    >>> import torch
    >>> planar_flow(2, num_flows=32)(torch.zeros(5, 2)).shape
    torch.Size([5, 2])
    """
    return StackedPlanar(
        check_input_dim(input_dim), check_input_dim(num_flows, "num_flows"), compile=compile
    )


def radial_flow(input_dim: int, num_flows: int, compile: bool = False) -> StackedRadial:
    """``num_flows`` radial layers as ONE :class:`~pyro.distributions.TransformModule`
    (a :class:`~pyro_nfvi.transforms.StackedRadial`); ``compile`` as in :func:`planar_flow`."""
    return StackedRadial(
        check_input_dim(input_dim), check_input_dim(num_flows, "num_flows"), compile=compile
    )


def conditional_planar_flow(
    input_dim: int,
    context_dim: int,
    num_flows: int,
    hidden_dims: Optional[Sequence[int]] = None,
) -> ConditionalStackedPlanar:
    """``num_flows`` conditional planar layers whose parameters all come from one
    ``DenseNN`` call on the context.

    >>> import torch
    >>> flow = conditional_planar_flow(2, context_dim=3, num_flows=8)
    >>> flow.condition(torch.randn(4, 3))(torch.randn(4, 2)).shape
    torch.Size([4, 2])
    """
    input_dim = check_input_dim(input_dim)
    context_dim = check_input_dim(context_dim, "context_dim")
    K = check_input_dim(num_flows, "num_flows")
    hypernet = DenseNN(context_dim, _hidden(input_dim, hidden_dims), [K, K * input_dim, K * input_dim])
    return ConditionalStackedPlanar(hypernet, input_dim)


def conditional_radial_flow(
    input_dim: int,
    context_dim: int,
    num_flows: int,
    hidden_dims: Optional[Sequence[int]] = None,
) -> ConditionalStackedRadial:
    """``num_flows`` conditional radial layers whose parameters all come from one
    ``DenseNN`` call on the context."""
    input_dim = check_input_dim(input_dim)
    context_dim = check_input_dim(context_dim, "context_dim")
    K = check_input_dim(num_flows, "num_flows")
    hypernet = DenseNN(context_dim, _hidden(input_dim, hidden_dims), [K * input_dim, K, K])
    return ConditionalStackedRadial(hypernet, input_dim)


def sylvester(
    input_dim: int,
    bottleneck: Optional[int] = None,
    kind: str = "orthogonal",
    num_householder: Optional[int] = None,
) -> Sylvester:
    """A :class:`~pyro_nfvi.transforms.Sylvester` layer of dimension ``input_dim`` with
    bottleneck ``M`` (default ``input_dim``) and ``Q`` of the given ``kind``
    (``"orthogonal"``, ``"householder"`` or ``"triangular"``).

    >>> import torch
    >>> sylvester(4, bottleneck=2)(torch.zeros(3, 4)).shape
    torch.Size([3, 4])
    """
    return Sylvester(input_dim, bottleneck=bottleneck, kind=kind, num_householder=num_householder)


def conditional_sylvester(
    input_dim: int,
    context_dim: int,
    hidden_dims: Optional[Sequence[int]] = None,
    bottleneck: Optional[int] = None,
    kind: str = "orthogonal",
    num_householder: Optional[int] = None,
) -> ConditionalSylvester:
    """A :class:`~pyro_nfvi.transforms.ConditionalSylvester` whose hypernetwork is a
    ``DenseNN(context_dim, hidden_dims, param_dims=[M, M(M+1)/2, M(M+1)/2, D*n])``
    (default hidden dims ``[10 * input_dim, 10 * input_dim]``).

    >>> import torch
    >>> flow = conditional_sylvester(3, context_dim=2, bottleneck=2)
    >>> flow.condition(torch.randn(4, 2))(torch.randn(4, 3)).shape
    torch.Size([4, 3])
    """
    D, M, n = _resolve(input_dim, bottleneck, kind, num_householder)
    context_dim = check_input_dim(context_dim, "context_dim")
    hypernet = DenseNN(context_dim, _hidden(D, hidden_dims), _hyper_sizes(D, M, n))
    return ConditionalSylvester(hypernet, D, bottleneck=M, kind=kind, num_householder=num_householder)


def sylvester_flow(
    input_dim: int,
    num_flows: int,
    bottleneck: Optional[int] = None,
    kind: str = "orthogonal",
    num_householder: Optional[int] = None,
) -> StackedSylvester:
    """``num_flows`` Sylvester layers as ONE :class:`~pyro.distributions.TransformModule`
    (a :class:`~pyro_nfvi.transforms.StackedSylvester`), equal to composing
    ``num_flows`` :func:`sylvester` layers (alternating identity / reversal ``Q`` for
    ``kind="triangular"``).

    >>> import torch
    >>> sylvester_flow(4, num_flows=8, bottleneck=2)(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """
    return StackedSylvester(
        input_dim, num_flows, bottleneck=bottleneck, kind=kind, num_householder=num_householder
    )


def conditional_sylvester_flow(
    input_dim: int,
    context_dim: int,
    num_flows: int,
    hidden_dims: Optional[Sequence[int]] = None,
    bottleneck: Optional[int] = None,
    kind: str = "orthogonal",
    num_householder: Optional[int] = None,
) -> ConditionalStackedSylvester:
    """``num_flows`` conditional Sylvester layers whose parameters all come from one
    ``DenseNN`` call on the context.

    >>> import torch
    >>> flow = conditional_sylvester_flow(3, context_dim=2, num_flows=4, bottleneck=2)
    >>> flow.condition(torch.randn(5, 2))(torch.randn(5, 3)).shape
    torch.Size([5, 3])
    """
    D, M, n = _resolve(input_dim, bottleneck, kind, num_householder)
    context_dim = check_input_dim(context_dim, "context_dim")
    K = check_input_dim(num_flows, "num_flows")
    hypernet = DenseNN(context_dim, _hidden(D, hidden_dims), _hyper_sizes(D, M, n, K))
    return ConditionalStackedSylvester(
        hypernet, D, K, bottleneck=M, kind=kind, num_householder=num_householder
    )


def hamiltonian(input_dim: int, potential, num_steps: int = 4, **kwargs) -> Hamiltonian:
    """A :class:`~pyro_nfvi.transforms.Hamiltonian`: ``num_steps`` learnable leapfrog
    steps (with tempering) on the phase space ``[z, ω]`` of size ``2 * input_dim``, for
    the potential ``z -> U(z) = -log p̃(z)``; ``kwargs`` as the class.

    >>> import torch
    >>> h = hamiltonian(2, lambda z: 0.5 * z.square().sum(-1), num_steps=3)
    >>> h(torch.zeros(5, 4)).shape
    torch.Size([5, 4])
    """
    return Hamiltonian(input_dim, potential, num_steps, **kwargs)
