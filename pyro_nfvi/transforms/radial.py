r"""Radial flows (Rezende & Mohamed 2015, eq. 14 and App. A.2) with closed-form inverses.

.. math::

    y = x + \beta h(r)(x - x_0),\qquad r = \|x - x_0\|,\quad h = \frac{1}{\alpha + r},

with :math:`\alpha = \operatorname{softplus}(\alpha') > 0` and
:math:`\beta = -\alpha + \operatorname{softplus}(\beta') > -\alpha` (invertible). Then

.. math::

    \log|\det J| = (D-1)\log(1 + \beta h) + \log(1 + \beta h - \beta h^2 r)
                 = (D-1)\log\frac{s + r}{\alpha + r}
                   + \log\frac{\alpha s + 2\alpha r + r^2}{(\alpha + r)^2},

with :math:`s = \alpha + \beta = \operatorname{softplus}(\beta') > 0`; the second form
has only positive terms, so it stays finite as :math:`\beta \to -\alpha`.

**Inverse** (closed form). :math:`\gamma = \|y - x_0\| = r(s + r)/(\alpha + r)`, so
:math:`r` is the positive root of :math:`r^2 + (s - \gamma) r - \alpha\gamma = 0`, taken
in the cancellation-free form, and :math:`x = x_0 + (y - x_0)(\alpha + r)/(s + r)`.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
from pyro.distributions.torch_transform import TransformModule

from ._fused import (
    PLAIN,
    radial_push_kernel,
    radial_stack_kernel,
    radial_stack_push_kernel,
    stack_route,
)
from ._math import radial_ab, radial_log_det, radial_norm, radial_stack_loop, split_radial_theta
from ._base import (
    ConditionalFlow,
    ConditionalStackedFlow,
    ConditionedFlow,
    LearnableStack,
    check_event,
    check_input_dim,
)

__all__ = [
    "ConditionedRadial",
    "Radial",
    "ConditionalRadial",
    "ConditionedStackedRadial",
    "StackedRadial",
    "ConditionalStackedRadial",
]

Params = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def radial_inverse_radius(gamma, alpha, s) -> torch.Tensor:
    """Positive root of ``r² + (s - γ) r - αγ = 0`` without cancellation."""
    b = s - gamma
    disc = torch.sqrt(b * b + 4 * alpha * gamma)
    pos = b >= 0
    # Each branch only sees safe denominators, so neither produces inf/NaN gradients.
    denom = torch.where(pos, b + disc, torch.ones_like(disc))
    r_pos = 2 * alpha * gamma / denom
    r_neg = 0.5 * (disc - b)
    return torch.where(pos, r_pos, r_neg)


def radial_inverse(y, x0, alpha, s) -> torch.Tensor:
    """Exact inverse of one radial layer with constrained ``alpha`` and ``s = alpha + beta``:
    ``x = x0 + (y - x0) (alpha + r) / (s + r)`` with ``r`` from :func:`radial_inverse_radius`."""
    return radial_inverse_and_ladj(y, x0[..., None, :], alpha[..., None, :], s[..., None, :])[0]


def radial_inverse_and_ladj(y, x0, alpha, s) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x, log|det J(x)|)`` for ``x`` the inverse of ``K`` radial layers stacked along
    dim -2 (layer ``k`` is ``[..., k, :]``, applied last-to-first).

    Low-precision inputs are solved in float64, and the log-det is taken from the radii
    of the solve (before ``x`` is rounded): with a tiny ``alpha`` the log-det near the
    centre changes by nats when ``x`` moves by one float32 ulp, and ``s - γ`` in the
    quadratic cancels in float32. Float64 also keeps ``‖y - x0‖`` from overflowing."""
    dtype = y.dtype
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and y.device.type != "mps":
        y, x0, alpha, s = (v.double() for v in (y, x0, alpha, s))
    D, ladj = y.shape[-1], 0
    for k in reversed(range(x0.shape[-2])):
        x0k, ak, sk = x0[..., k, :], alpha[..., k, :], s[..., k, :]
        diff = y - x0k
        r = radial_inverse_radius(radial_norm(diff), ak, sk)
        y = x0k + diff * ((ak + r) / (sk + r))
        ladj = ladj + radial_log_det(r, ak, sk, D).squeeze(-1)
    return y.to(dtype), ladj.to(dtype)


def radial_call(x, x0, alpha_prime, beta_prime) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of one radial layer from raw parameters."""
    alpha, beta, s = radial_ab(alpha_prime, beta_prime)
    diff = x - x0
    r = radial_norm(diff)
    y = x + (beta / (alpha + r)) * diff
    return y, radial_log_det(r, alpha, s, x0.shape[-1]).squeeze(-1)


def radial_push_score(x, score, x0, alpha, s) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(y, ∇_y log p_Y(y))`` for one radial layer ``y = f(x)``, given
    ``score = ∇_x log p_X(x)``, without an inverse. With ``d = x - x0``, ``r = |d|``,
    ``n = d / r``: ``J = c I + e n nᵀ`` (``c = (s + r)/(α + r)``,
    ``c + e = (αs + 2αr + r²)/(α + r)²``) is symmetric, ``J^{-1} v = v / c + n (n·v)(1/(c+e) - 1/c)``,
    and ``∇_x log det J = L'(r) n`` with
    ``L'(r) = (D-1)(1/(s+r) - 1/(α+r)) + 2(α+r)/(αs + 2αr + r²) - 2/(α+r)``.
    """
    D = x.shape[-1]
    d = x - x0
    r = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
    n = d / r.clamp_min(torch.finfo(r.dtype).tiny)
    a, sr, quad = alpha + r, s + r, alpha * s + r * (2 * alpha + r)
    dlog = (D - 1) * (1 / sr - 1 / a) + 2 * a / quad - 2 / a
    v = score - dlog * n
    inv_c, inv_ce = a / sr, a * a / quad
    v = v * inv_c + n * (n * v).sum(-1, keepdim=True) * (inv_ce - inv_c)
    return x + ((s - alpha) / a) * d, v


def _unpack_radial(params) -> Params:
    x0, alpha_prime, beta_prime = params() if callable(params) else params
    if alpha_prime.shape[-1:] != (1,) or beta_prime.shape[-1:] != (1,):
        raise ValueError(
            "radial params must be (x0 (..., D), alpha_prime (..., 1), beta_prime (..., 1)); "
            f"got shapes {tuple(x0.shape)}, {tuple(alpha_prime.shape)}, {tuple(beta_prime.shape)}"
        )
    return x0, alpha_prime, beta_prime


class ConditionedRadial(ConditionedFlow):
    r"""A radial transform with given parameters ``(x0, alpha_prime, beta_prime)`` (or
    a callable returning them), with a closed-form inverse of any point.

    See :class:`Radial` for the math. Parameters may carry batch dimensions; they
    broadcast against the batch shape of the input.

    :param params: a tuple ``(x0, alpha_prime, beta_prime)`` of shapes
        ``(..., D), (..., 1), (..., 1)`` or a callable returning one.
    """

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass."""
        x0, alpha_prime, beta_prime = _unpack_radial(self._params)
        x = check_event(x, x0.shape[-1], dtype=x0.dtype, batch_shape=x0.shape[:-1])
        return radial_call(x, x0, alpha_prime, beta_prime)

    def inverse_and_ladj(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, log|det dy/dx| at x)`` for ``x`` the inverse of ``y``, see
        :func:`radial_inverse_and_ladj` (``log_prob`` of data uses this log-det)."""
        x0, alpha_prime, beta_prime = _unpack_radial(self._params)
        y = check_event(y, x0.shape[-1], "y", dtype=x0.dtype, batch_shape=x0.shape[:-1])
        alpha, _, s = radial_ab(alpha_prime, beta_prime)
        return radial_inverse_and_ladj(y, x0[..., None, :], alpha[..., None, :], s[..., None, :])

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.inverse_and_ladj(y)[0]

    @torch.no_grad()
    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, without an
        inverse (see :func:`radial_push_score`); used for sticking-the-landing gradients."""
        x0, alpha_prime, beta_prime = _unpack_radial(self._params)
        alpha, _, s = radial_ab(alpha_prime, beta_prime)
        return radial_push_score(x, score, x0, alpha, s)


class Radial(ConditionedRadial, TransformModule):
    r"""A learnable radial flow layer (Rezende & Mohamed 2015),

    .. math::

        y = x + \frac{\beta}{\alpha + \|x - x_0\|}(x - x_0),

    with :math:`\alpha > 0`, :math:`\beta > -\alpha` (invertible). The inverse of any
    point is computed in closed form (Pyro's built-in only inverts cached samples), so
    ``TransformedDistribution(base, [Radial(D)]).log_prob(data)`` works on any data.

    Example:

    >>> import torch, pyro.distributions as dist
    >>> from pyro_nfvi.transforms import Radial
    >>> flow = Radial(2)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    >>> x = torch.tensor([[0.5, -1.0]])
    >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
    True

    :param input_dim: dimension ``D`` of the input and output.

    Reference: D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015, arXiv:1505.05770.
    """

    def __init__(self, input_dim: int):
        input_dim = check_input_dim(input_dim)
        super().__init__(self._params_tuple)
        self.input_dim = input_dim
        self.x0 = nn.Parameter(torch.empty(input_dim))
        self.alpha_prime = nn.Parameter(torch.empty(1))
        self.beta_prime = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def _params_tuple(self) -> Params:
        return self.x0, self.alpha_prime, self.beta_prime

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.input_dim)
        with torch.no_grad():
            self.x0.uniform_(-bound, bound)
            self.alpha_prime.uniform_(-bound, bound)
            self.beta_prime.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


class ConditionalRadial(ConditionalFlow):
    r"""A radial flow whose parameters ``(x0, alpha_prime, beta_prime)`` come from a
    hypernetwork: ``ConditionalRadial(nn).condition(context)`` is a
    :class:`ConditionedRadial`. Context batch rows map to input batch rows.

    Example:

    >>> import torch, pyro.distributions as dist
    >>> from pyro.nn import DenseNN
    >>> from pyro_nfvi.transforms import ConditionalRadial
    >>> flow = ConditionalRadial(DenseNN(3, [20, 20], param_dims=[2, 1, 1]))
    >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    >>> q = dist.ConditionalTransformedDistribution(base, [flow])
    >>> q.condition(torch.randn(5, 3)).sample().shape
    torch.Size([5, 2])

    :param nn: a module mapping a context ``(..., M)`` to a tuple of tensors of shapes
        ``(..., D), (..., 1), (..., 1)`` (e.g. ``DenseNN(M, hidden, param_dims=[D, 1, 1])``).
    """

    def _conditioned(self, params) -> ConditionedRadial:
        return ConditionedRadial(params)


def _unpack_stacked_radial(params) -> Params:
    x0, alpha_prime, beta_prime = params() if callable(params) else params
    K = x0.shape[-2] if x0.dim() >= 2 else -1
    if K < 0 or alpha_prime.shape[-2:] != (K, 1) or beta_prime.shape[-2:] != (K, 1):
        raise ValueError(
            "stacked radial params must be (x0 (..., K, D), alpha_prime (..., K, 1), "
            f"beta_prime (..., K, 1)); got shapes {tuple(x0.shape)}, "
            f"{tuple(alpha_prime.shape)}, {tuple(beta_prime.shape)}"
        )
    return x0, alpha_prime, beta_prime


def stacked_radial(x, x0, alpha_prime, beta_prime) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of K radial layers from raw parameters stacked along dim -2
    (layer ``k`` is ``[..., k, :]``). Where :func:`._fused.stack_route` says so (unbatched
    parameters), a hand-written kernel runs;
    otherwise a plain autograd loop, log-dets computed at the end from the radii."""
    route = stack_route(x, x0, alpha_prime, beta_prime)
    if route != PLAIN:
        return radial_stack_kernel(x, torch.cat([x0, alpha_prime, beta_prime], -1), route)
    return radial_stack_loop(x, x0, alpha_prime, beta_prime)


def stacked_radial_packed(x, theta) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`stacked_radial` with parameters packed as ``theta = [x0 | α' | β']``."""
    route = stack_route(x, theta)
    if route != PLAIN:
        return radial_stack_kernel(x, theta, route)
    D = x.shape[-1]
    if theta.shape[-2] == 1:  # one layer: as cheap as the single-layer class
        x0, alpha_prime, beta_prime = theta.squeeze(-2).split([D, 1, 1], -1)
        return radial_call(x, x0, alpha_prime, beta_prime)
    return radial_stack_loop(x, *split_radial_theta(theta, D))


def push_score_stacked_radial(x, score, x0, alpha_prime, beta_prime) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ∇_y log p_Y(y))`` of K stacked radial layers from ``x`` and
    ``score = ∇_x log p_X(x)``, no inverse, no autograd graph. Where
    :func:`._fused.stack_route` picks a kernel, one fused pass
    (:func:`._fused.radial_push_kernel`); otherwise the reference: :func:`radial_push_score`
    layer by layer."""
    with torch.no_grad():
        route = stack_route(x, x0, alpha_prime, beta_prime)
        if route != PLAIN:
            return radial_push_kernel(x, score, torch.cat([x0, alpha_prime, beta_prime], -1), route)
        alpha, _, s = radial_ab(alpha_prime, beta_prime)
        for k in range(x0.shape[-2]):
            x, score = radial_push_score(x, score, x0[..., k, :], alpha[..., k, :], s[..., k, :])
        return x, score


def push_score_radial_packed(x, score, theta) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`push_score_stacked_radial` with parameters packed as ``theta = [x0 | α' | β']``."""
    with torch.no_grad():
        route = stack_route(x, theta)
        if route != PLAIN:
            return radial_push_kernel(x, score, theta, route)
        return push_score_stacked_radial(x, score, *split_radial_theta(theta, x.shape[-1]))


class ConditionedStackedRadial(ConditionedFlow):
    r"""``K`` radial layers applied in order, with parameters stacked along a layer
    dimension: ``(x0 (..., K, D), alpha_prime (..., K, 1), beta_prime (..., K, 1))`` or a
    callable returning them. Same map as composing ``K`` :class:`ConditionedRadial`.
    """

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass."""
        x0, alpha_prime, beta_prime = _unpack_stacked_radial(self._params)
        x = check_event(x, x0.shape[-1], dtype=x0.dtype, batch_shape=x0.shape[:-2])
        return stacked_radial(x, x0, alpha_prime, beta_prime)

    def inverse_and_ladj(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, log|det dy/dx| at x)`` for ``x`` the inverse of ``y``, see
        :func:`radial_inverse_and_ladj`."""
        x0, alpha_prime, beta_prime = _unpack_stacked_radial(self._params)
        y = check_event(y, x0.shape[-1], "y", dtype=x0.dtype, batch_shape=x0.shape[:-2])
        alpha, _, s = radial_ab(alpha_prime, beta_prime)
        return radial_inverse_and_ladj(y, x0, alpha, s)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.inverse_and_ladj(y)[0]

    @torch.no_grad()
    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, without an
        inverse (see :func:`push_score_stacked_radial`)."""
        x0, alpha_prime, beta_prime = _unpack_stacked_radial(self._params)
        return push_score_stacked_radial(x, score, x0, alpha_prime, beta_prime)


class StackedRadial(LearnableStack, ConditionedStackedRadial, TransformModule):
    r"""``num_flows`` learnable radial layers in one module (parameters stacked). Equals
    ``ComposeTransformModule([Radial(D) for _ in range(K)])`` with the same parameters.

    Example:

    >>> import torch
    >>> from pyro_nfvi.transforms import StackedRadial
    >>> flow = StackedRadial(2, num_flows=8)
    >>> x = torch.randn(4, 2)
    >>> torch.allclose(flow.inv(flow(x)), x, atol=1e-5)
    True

    **Speed.** As for :class:`~pyro_nfvi.transforms.StackedPlanar`, a hand-written
    kernel (NumPy on CPU); a radial layer needs ``|x - x0|`` afresh, so each layer costs a
    few passes over ``x``. ``compile=True`` can gain a little at small batches, after a
    warm-up (see ``StackedPlanar``); measured figures against Pyro's ``Radial``:
    ``benchmarks/bench_speed.py`` and the README's Benchmarks entry.

    :param input_dim: dimension ``D``.
    :param num_flows: number of layers ``K``.
    :param compile: use ``torch.compile`` for the forward pass.
    """

    theta_layout = ("D", 1, 1)  # [x0 | alpha' | beta']: (K, D+2)
    packed_fn = staticmethod(stacked_radial_packed)
    packed_push = staticmethod(push_score_radial_packed)
    packed_kernel_push = staticmethod(radial_stack_push_kernel)

    @property
    def x0(self) -> torch.Tensor:
        return self.theta[:, : self.input_dim]

    @property
    def alpha_prime(self) -> torch.Tensor:
        return self.theta[:, self.input_dim : self.input_dim + 1]

    @property
    def beta_prime(self) -> torch.Tensor:
        return self.theta[:, self.input_dim + 1 :]

    def _params_tuple(self) -> Params:
        return self.x0, self.alpha_prime, self.beta_prime

    def reset_parameters(self, near_identity: bool = False) -> None:
        """Pyro's initialisation (all ``U(±1/√D)``), or with ``near_identity=True``
        ``β ≈ 0`` so that each layer starts near the identity map."""
        bound = 1.0 / math.sqrt(self.input_dim)
        with torch.no_grad():
            self.theta.uniform_(-bound, bound)
            if near_identity:  # beta = softplus(beta') - softplus(alpha') ~ 0
                self.beta_prime.copy_(self.alpha_prime + 0.01 * bound * torch.randn_like(self.alpha_prime))


class ConditionalStackedRadial(ConditionalStackedFlow):
    r"""``K`` conditional radial layers whose parameters come from ONE hypernetwork call.
    ``nn`` maps a context ``(..., M)`` to a tuple of shapes ``(..., K*D), (..., K),
    (..., K)`` (e.g. ``DenseNN(M, hidden, param_dims=[K*D, K, K])``).

    Example:

    >>> import torch
    >>> from pyro.nn import DenseNN
    >>> from pyro_nfvi.transforms import ConditionalStackedRadial
    >>> flow = ConditionalStackedRadial(DenseNN(3, [16], param_dims=[8, 4, 4]), input_dim=2)
    >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
    torch.Size([5, 2])

    :param nn: the hypernetwork.
    :param input_dim: dimension ``D`` of the flow.
    """

    layer_sizes = ("D", 1, 1)  # x0, alpha', beta'

    def _conditioned(self, params) -> ConditionedStackedRadial:
        return ConditionedStackedRadial(params)
