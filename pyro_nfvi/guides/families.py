"""The flow families as guides: :class:`AutoPlanarFlow`, :class:`AutoRadialFlow`,
:class:`AutoSylvesterFlow` (an :class:`AutoNormalizingFlow` with a fixed stack of layers,
initialised near the identity) and their layer factories."""

from __future__ import annotations

import functools
from typing import Callable, Optional

from torch.distributions.transforms import Transform

from .._validation import check_int
from ..helpers import planar_flow, radial_flow, sylvester_flow
from ..transforms._base import check_input_dim
from ..transforms.sylvester import KINDS
from .flow import AutoNormalizingFlow



def _make_planar_flow(num_flows: int, compile: bool, latent_dim: int) -> Transform:
    flow = planar_flow(latent_dim, num_flows, compile=compile)
    flow.reset_parameters(near_identity=True)  # step-0 guide = the affine base
    return flow


def _make_radial_flow(num_flows: int, compile: bool, latent_dim: int) -> Transform:
    flow = radial_flow(latent_dim, num_flows, compile=compile)
    flow.reset_parameters(near_identity=True)
    return flow


class AutoPlanarFlow(AutoNormalizingFlow):
    r"""
    :class:`AutoNormalizingFlow` with ``num_flows`` planar layers
    :math:`f(x) = x + \hat u \tanh(w^\top x + b)` (Rezende & Mohamed 2015,
    eq. 10), built by :func:`pyro_nfvi.helpers.planar_flow`.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro_nfvi.guides import AutoPlanarFlow
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> guide = AutoPlanarFlow(model, num_flows=8, full_rank=True)
        >>> guide()["x"].shape
        torch.Size([2])

    :param callable model: a Pyro model.
    :param int num_flows: number of planar layers (>= 1). Default 16.
    :param bool compile: run the flow's forward pass through ``torch.compile``
        (rarely faster than the default kernel, after a warm-up; see
        :class:`~pyro_nfvi.transforms.StackedPlanar`).
    :param kwargs: keyword arguments of :class:`AutoNormalizingFlow`
        (``init_loc_fn``, ``init_scale``, ``full_rank``, ``create_plates``).
    """

    def __init__(
        self, model: Callable, num_flows: int = 16, *, compile: bool = False, **kwargs
    ) -> None:
        num_flows = check_int(num_flows, "num_flows")
        super().__init__(model, functools.partial(_make_planar_flow, num_flows, compile), **kwargs)
        self.num_flows = num_flows


class AutoRadialFlow(AutoNormalizingFlow):
    r"""
    :class:`AutoNormalizingFlow` with ``num_flows`` radial layers
    :math:`f(x) = x + \beta h(\alpha, r)(x - x_0)` (Rezende & Mohamed 2015,
    eq. 14), built by :func:`pyro_nfvi.helpers.radial_flow`.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro_nfvi.guides import AutoRadialFlow
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> guide = AutoRadialFlow(model, num_flows=8)
        >>> guide()["x"].shape
        torch.Size([2])

    :param callable model: a Pyro model.
    :param int num_flows: number of radial layers (>= 1). Default 16.
    :param bool compile: run the flow's forward pass through ``torch.compile``.
    :param kwargs: keyword arguments of :class:`AutoNormalizingFlow`.
    """

    def __init__(
        self, model: Callable, num_flows: int = 16, *, compile: bool = False, **kwargs
    ) -> None:
        num_flows = check_int(num_flows, "num_flows")
        super().__init__(model, functools.partial(_make_radial_flow, num_flows, compile), **kwargs)
        self.num_flows = num_flows


#: the largest default bottleneck of :class:`AutoSylvesterFlow` (orthogonal kind); the
#: posterior suite's models (D <= 58) all run at M = D
DEFAULT_MAX_BOTTLENECK = 64


class AutoSylvesterFlow(AutoNormalizingFlow):
    r"""
    :class:`AutoNormalizingFlow` with ``num_flows`` Sylvester layers
    :math:`f(x) = x + QR\tanh(\tilde R Q^\top x + b)` (van den Berg et al. 2018), built
    by :func:`pyro_nfvi.helpers.sylvester_flow` and initialised near the identity, so
    that at step 0 the guide is the affine base.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro_nfvi.guides import AutoSylvesterFlow
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        >>> guide = AutoSylvesterFlow(model, num_flows=4, bottleneck=2)
        >>> guide()["x"].shape
        torch.Size([3])

    :param callable model: a Pyro model.
    :param int num_flows: number of Sylvester layers (>= 1). Default 16.
    :param bottleneck: ``M`` (default: ``D``, the latent dimension, for the other kinds;
        ``min(D, 64)`` for ``kind="orthogonal"``, whose cost per step grows as
        ``K D M^2``: at ``D = 1200`` and ``M = D`` one step took seconds). ``M <= D`` for
        ``kind="orthogonal"``, ``M = D`` for the other kinds; checked on the first call,
        where ``D`` is known (a ``ValueError`` naming both).
    :param str kind: ``"orthogonal"`` (default), ``"householder"`` or ``"triangular"``.
    :param num_householder: reflections for ``kind="householder"``.
    :param kwargs: keyword arguments of :class:`AutoNormalizingFlow`.

    Reference: R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester
    Normalizing Flows for Variational Inference. UAI 2018.
    """

    def __init__(
        self,
        model: Callable,
        num_flows: int = 16,
        *,
        bottleneck: Optional[int] = None,
        kind: str = "orthogonal",
        num_householder: Optional[int] = None,
        **kwargs,
    ) -> None:
        num_flows = check_int(num_flows, "num_flows")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if bottleneck is not None:
            check_input_dim(bottleneck, "bottleneck")
        factory = functools.partial(AutoSylvesterFlow._stack, num_flows, bottleneck, kind, num_householder)
        super().__init__(model, factory, **kwargs)
        self.num_flows, self.bottleneck, self.kind = num_flows, bottleneck, kind

    @staticmethod
    def _stack(num_flows, bottleneck, kind, num_householder, latent_dim: int) -> Transform:
        if bottleneck is None and kind == "orthogonal":
            bottleneck = min(latent_dim, DEFAULT_MAX_BOTTLENECK)
        # checked here, at setup, where the latent dimension is first known
        if bottleneck is not None and kind == "orthogonal" and bottleneck > latent_dim:
            raise ValueError(
                f"AutoSylvesterFlow: bottleneck={bottleneck} exceeds the model's latent "
                f"dimension {latent_dim}; use bottleneck <= {latent_dim} (or None: the latent "
                "dimension)"
            )
        if bottleneck is not None and kind != "orthogonal" and bottleneck != latent_dim:
            raise ValueError(
                f"AutoSylvesterFlow: kind={kind!r} needs bottleneck equal to the model's latent "
                f"dimension {latent_dim} (or None), got bottleneck={bottleneck}"
            )
        flow = sylvester_flow(
            latent_dim, num_flows, bottleneck=bottleneck, kind=kind, num_householder=num_householder
        )
        flow.reset_parameters(near_identity=True)  # step-0 guide = the affine base
        return flow
