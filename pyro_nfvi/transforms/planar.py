r"""Planar flows (Rezende & Mohamed 2015, eq. 10 and App. A.1) with exact inverses.

.. math::

    y = x + \hat u \tanh(w^\top x + b),\qquad
    \hat u = u + \big(\operatorname{softplus}(w^\top u + c) - 1 - w^\top u\big)\frac{w}{\|w\|^2},
    \qquad c = \log(e - 1),

so that :math:`w^\top\hat u = \operatorname{softplus}(w^\top u + c) - 1 > -1` and the map is
a bijection of :math:`\mathbb{R}^D`. This is Rezende & Mohamed's constraint (App. A.1,
:math:`c = 0`) applied to :math:`u + c\,w/\|w\|^2`: the same maps, parameterised so that
:math:`u = 0` is the identity and :math:`\hat u` stays within about :math:`1.4\|u\|` as
:math:`w \to 0` (with :math:`c = 0`, :math:`\hat u \approx (\log 2 - 1)\,w/\|w\|^2` there:
a 1-D guide whose :math:`w` crossed zero shifted its draws by :math:`10^3`). With :math:`t = \tanh(w^\top x + b)`,

.. math::

    \log|\det J| = \log\big(1 + w^\top\hat u\,(1 - t^2)\big)
                 = \log\big(t^2 + q\,(1 - t^2)\big),\qquad q = 1 + w^\top\hat u > 0,

written in the second form because it has no cancellation when :math:`w^\top u \ll -1`.

**Inverse.** With :math:`c = w^\top y + b` the pre-activation :math:`a = w^\top x + b`
solves the scalar equation :math:`a + (w^\top\hat u)\tanh a = c`, whose left side is
strictly increasing and lies within :math:`|w^\top\hat u|` of :math:`a`; we solve it by
Newton's method safeguarded by bisection on :math:`[c - |w^\top\hat u|, c + |w^\top\hat u|]`,
then :math:`x = y - \hat u\tanh a`. Gradients flow through the inverse by one last Newton
step taken with the solution detached, which is the implicit-function-theorem derivative.
"""

from __future__ import annotations

from typing import Tuple

import math

import torch
import torch.nn as nn
from pyro.distributions.torch_transform import TransformModule

from ._fused import (
    PLAIN,
    planar_push_kernel,
    planar_stack_kernel,
    planar_stack_push_kernel,
    stack_route,
)
from ._math import planar_log_det, planar_stack_loop, planar_u_hat, split_planar_theta
from ._base import (
    ConditionalFlow,
    ConditionalStackedFlow,
    ConditionedFlow,
    LearnableStack,
    check_event,
    check_input_dim,
)

__all__ = [
    "ConditionedPlanar",
    "Planar",
    "ConditionalPlanar",
    "ConditionedStackedPlanar",
    "StackedPlanar",
    "ConditionalStackedPlanar",
]

Params = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def planar_solve(c: torch.Tensor, q: torch.Tensor, max_iter: int = 200) -> torch.Tensor:
    """Solve ``a + (q - 1) tanh(a) = c`` for ``a`` elementwise (q > 0), differentiably."""
    k = q - 1
    if torch.jit.is_tracing():  # no data-dependent iteration count in a trace
        return _planar_solve_traced(c, q, k)
    with torch.no_grad():
        c0, k0 = torch.broadcast_tensors(c.detach(), k.detach())
        q0 = q.detach().expand_as(c0)
        width = k0.abs()
        lo, hi = c0 - width, c0 + width
        a = c0 - k0 * torch.tanh(c0)  # one fixed-point step, inside the bracket
        # |step| of the last two iterations; rtsafe compares with the one before last
        step_last = step_before = hi - lo
        tol = 4 * torch.finfo(c0.dtype).eps
        for _ in range(max_iter):
            t = torch.tanh(a)
            f = a + k0 * t - c0
            lo = torch.where(f < 0, a, lo)
            hi = torch.where(f > 0, a, hi)
            fp = planar_log_det(t, q0).exp()  # = 1 + k (1 - t^2) > 0
            step = f / fp
            a_new = a - step
            # Bisect where Newton leaves the bracket or does not halve the step of two
            # iterations ago (as in Numerical Recipes' rtsafe): Newton alone can cycle
            # on tanh.
            slow = (2 * step.abs() > step_before) | (a_new < lo) | (a_new > hi)
            slow = slow | ~torch.isfinite(a_new)
            a_new = torch.where(slow, 0.5 * (lo + hi), a_new)
            step_before, step_last = step_last, (a_new - a).abs()
            done = step_last <= tol * (1 + a.abs())
            a = a_new
            if bool(done.all()):
                break
    return _planar_ift(a, c, q, k)


def _planar_ift(a, c, q, k):
    """Attach the implicit-function-theorem derivatives to the detached root ``a``: two
    Newton steps from it. One step already has the exact first derivative; the second
    makes second derivatives exact too (Newton's map has zero slope at the root), so
    Hessians through the inverse are right."""
    if not (c.requires_grad or q.requires_grad):
        return a
    for _ in range(2):
        t = torch.tanh(a)
        a = a - (a + k * t - c) / planar_log_det(t, q).exp()
    return a


def _planar_solve_traced(c, q, k):
    r"""The solve of :func:`planar_solve` with a fixed iteration count, for tracing.

    Bisection on :math:`t = \tanh a \in (-1, 1)`: :math:`g(t) = \operatorname{atanh} t
    + k t - c` is increasing (:math:`g' = 1/(1 - t^2) + k > 1 + k = q > 0`), the bracket
    starts at width 2 and halves every step, so after ``nmant + 3`` steps it is below
    ``eps / 4`` for every input: a count that is sufficient whatever the data, and the
    trace is right for inputs other than the one it was recorded with. Then
    ``a = c - k t`` and two Newton steps, each kept only where it lowers ``|f|``.
    """
    with torch.no_grad():
        c0, k0 = torch.broadcast_tensors(c.detach(), k.detach())
        q0 = q.detach().expand_as(c0)
        lo, hi = -torch.ones_like(c0), torch.ones_like(c0)
        # eps = 2^-nmant: nmant + 3 halvings of width 2 end below eps / 4
        for _ in range(round(-math.log2(torch.finfo(c0.dtype).eps)) + 3):
            mid = 0.5 * (lo + hi)
            pos = torch.atanh(mid) + k0 * mid - c0 > 0
            hi, lo = torch.where(pos, mid, hi), torch.where(pos, lo, mid)
        a = c0 - k0 * (0.5 * (lo + hi))
        f = a + k0 * torch.tanh(a) - c0
        for _ in range(2):
            t = torch.tanh(a)
            a_new = a - f / planar_log_det(t, q0).exp()
            f_new = a_new + k0 * torch.tanh(a_new) - c0
            better = f_new.abs() < f.abs()
            a, f = torch.where(better, a_new, a), torch.where(better, f_new, f)
    return _planar_ift(a, c, q, k)


def planar_call(x, bias, u, w) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of one planar layer from raw parameters."""
    u_hat, q = planar_u_hat(u, w)
    t = torch.tanh((x * w).sum(-1, keepdim=True) + bias)
    return x + u_hat * t, planar_log_det(t, q).squeeze(-1)


def planar_inverse(y, bias, u_hat, w, q) -> torch.Tensor:
    """Exact inverse of one planar layer. Low-precision inputs are solved in float64:
    the inverse is off the training hot path, and near-singular layers (``q`` small)
    amplify rounding in ``w·y``."""
    dtype = y.dtype
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and y.device.type != "mps":
        y, bias, u_hat, w, q = (v.double() for v in (y, bias, u_hat, w, q))
    a = planar_solve((y * w).sum(-1, keepdim=True) + bias, q)
    return (y - u_hat * torch.tanh(a)).to(dtype)


def planar_push_score(x, score, bias, u_hat, w, q) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(y, ∇_y log p_Y(y))`` for one planar layer ``y = f(x)``, given
    ``score = ∇_x log p_X(x)``: the score pushed forward through the layer without an
    inverse solve. With ``t = tanh(a)``, ``h' = 1 - t²``, ``k = wᵀû = q - 1`` and
    ``det = 1 + h'k``, ``J = I + h' û wᵀ``, so ``J^{-T} = I - h' w ûᵀ / det``
    (Sherman–Morrison) and ``∇_x log det = (h'' k / det) w``:

    .. math::

        s_y = J^{-T}(s_x - ∇_x \log\det J) = s_x - w\,\frac{h''k + h'\,(\hat u^\top s_x - h''k^2/\det)}{\det}.
    """
    t = torch.tanh((x * w).sum(-1, keepdim=True) + bias)
    h1 = 1 - t * t
    h2k = -2 * t * h1 * (q - 1)
    det = planar_log_det(t, q).exp()
    coef = (h2k + h1 * ((u_hat * score).sum(-1, keepdim=True) - h2k * (q - 1) / det)) / det
    return x + u_hat * t, score - coef * w


def _unpack_planar(params) -> Params:
    bias, u, w = params() if callable(params) else params
    if u.shape[-1] != w.shape[-1] or bias.shape[-1:] != (1,):
        raise ValueError(
            "planar params must be (bias (..., 1), u (..., D), w (..., D)); got shapes "
            f"{tuple(bias.shape)}, {tuple(u.shape)}, {tuple(w.shape)}"
        )
    return bias, u, w


class ConditionedPlanar(ConditionedFlow):
    r"""A planar transform with given parameters ``(bias, u, w)`` (or a callable
    returning them), with an exact inverse of any point.

    See :class:`Planar` for the math. Parameters may carry batch dimensions (as produced
    by a hypernetwork); they broadcast against the batch shape of the input.

    :param params: a tuple ``(bias, u, w)`` of shapes ``(..., 1), (..., D), (..., D)``
        or a callable returning one.
    """

    def _planar_params(self):
        bias, u, w = _unpack_planar(self._params)
        u_hat, q = planar_u_hat(u, w)
        return bias, u_hat, w, q

    def u_hat(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The constrained ``u`` with ``w·u_hat > -1`` (same name as in Pyro)."""
        return planar_u_hat(u, w)[0]

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass."""
        bias, u, w = _unpack_planar(self._params)
        x = check_event(x, w.shape[-1], dtype=w.dtype, batch_shape=w.shape[:-1])
        return planar_call(x, bias, u, w)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        bias, u_hat, w, q = self._planar_params()
        y = check_event(y, w.shape[-1], "y", dtype=w.dtype, batch_shape=w.shape[:-1])
        return planar_inverse(y, bias, u_hat, w, q)

    @torch.no_grad()
    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, without an
        inverse (see :func:`planar_push_score`); used for sticking-the-landing gradients."""
        bias, u_hat, w, q = self._planar_params()
        return planar_push_score(x, score, bias, u_hat, w, q)


class Planar(ConditionedPlanar, TransformModule):
    r"""A learnable planar flow layer (Rezende & Mohamed 2015),

    .. math::

        y = x + \hat u \tanh(w^\top x + b),

    with :math:`\hat u` constrained so that :math:`w^\top\hat u > -1` (invertible). Unlike
    :class:`pyro.distributions.transforms.Planar`, the inverse of *any* point is
    computed (a safeguarded Newton solve of one scalar equation), so
    ``TransformedDistribution(base, [Planar(D)]).log_prob(data)`` works on data that was
    never sampled, with correct gradients (maximum-likelihood training).

    Example:

    >>> import torch, pyro.distributions as dist
    >>> from pyro_nfvi.transforms import Planar
    >>> flow = Planar(2)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    >>> q.log_prob(torch.tensor([[0.5, -1.0], [3.0, 2.0]])).shape
    torch.Size([2])

    :param input_dim: dimension ``D`` of the input and output.

    Reference: D. J. Rezende, S. Mohamed. Variational Inference with Normalizing Flows.
    ICML 2015, arXiv:1505.05770.
    """

    def __init__(self, input_dim: int):
        input_dim = check_input_dim(input_dim)
        super().__init__(self._params_tuple)
        self.input_dim = input_dim
        self.bias = nn.Parameter(torch.empty(1))
        self.u = nn.Parameter(torch.empty(input_dim))
        self.w = nn.Parameter(torch.empty(input_dim))
        self.reset_parameters()

    def _params_tuple(self) -> Params:
        return self.bias, self.u, self.w

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.input_dim)
        with torch.no_grad():
            self.u.uniform_(-bound, bound)
            self.w.uniform_(-bound, bound)
            self.bias.zero_()

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}"


class ConditionalPlanar(ConditionalFlow):
    r"""A planar flow whose parameters ``(bias, u, w)`` are produced by a hypernetwork
    from a context: ``ConditionalPlanar(nn).condition(context)`` is a
    :class:`ConditionedPlanar`.

    A context of batch shape ``(N,)`` yields parameters of batch shape ``(N,)``, which
    broadcast against the batch shape of the input: row ``i`` of the input is transformed
    with the parameters of context row ``i``.

    Example:

    >>> import torch, pyro.distributions as dist
    >>> from pyro.nn import DenseNN
    >>> from pyro_nfvi.transforms import ConditionalPlanar
    >>> hyper = DenseNN(3, [20, 20], param_dims=[1, 2, 2])
    >>> flow = ConditionalPlanar(hyper)
    >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    >>> q = dist.ConditionalTransformedDistribution(base, [flow])
    >>> context = torch.randn(5, 3)
    >>> q.condition(context).sample().shape
    torch.Size([5, 2])

    :param nn: a module mapping a context ``(..., M)`` to a tuple of tensors of shapes
        ``(..., 1), (..., D), (..., D)`` (e.g. ``DenseNN(M, hidden, param_dims=[1, D, D])``).
    """

    def _conditioned(self, params) -> ConditionedPlanar:
        return ConditionedPlanar(params)


def _unpack_stacked_planar(params) -> Params:
    bias, u, w = params() if callable(params) else params
    if u.dim() < 2 or u.shape[-2:] != w.shape[-2:] or bias.shape[-2:] != (u.shape[-2], 1):
        raise ValueError(
            "stacked planar params must be (bias (..., K, 1), u (..., K, D), w (..., K, D)); "
            f"got shapes {tuple(bias.shape)}, {tuple(u.shape)}, {tuple(w.shape)}"
        )
    return bias, u, w


def stacked_planar(x, bias, u, w) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of K planar layers from raw parameters stacked along dim -2
    (layer ``k`` is ``[..., k, :]``). Where :func:`._fused.stack_route` says so
    (unbatched parameters), a hand-written kernel runs; otherwise a plain autograd loop,
    with the log-dets of all layers computed at the end in one vectorised op from the
    stored activations."""
    route = stack_route(x, u, w, bias)
    if route != PLAIN:
        return planar_stack_kernel(x, torch.cat([u, w, bias], -1), route)
    return planar_stack_loop(x, bias, u, w)


def stacked_planar_packed(x, theta) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`stacked_planar` with parameters packed as ``theta = [u | w | b]``."""
    route = stack_route(x, theta)
    if route != PLAIN:
        return planar_stack_kernel(x, theta, route)
    D = x.shape[-1]
    if theta.shape[-2] == 1:  # one layer: as cheap as the single-layer class
        u, w, bias = theta.squeeze(-2).split([D, D, 1], -1)
        return planar_call(x, bias, u, w)
    return planar_stack_loop(x, *split_planar_theta(theta, D))


def push_score_stacked_planar(x, score, bias, u, w) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ∇_y log p_Y(y))`` of K stacked planar layers from ``x`` and
    ``score = ∇_x log p_X(x)``, no inverse, no autograd graph. Where
    :func:`._fused.stack_route` picks a kernel, one fused pass
    (:func:`._fused.planar_push_kernel`); otherwise the reference: :func:`planar_push_score`
    layer by layer."""
    with torch.no_grad():
        route = stack_route(x, u, w, bias)
        if route != PLAIN:
            return planar_push_kernel(x, score, torch.cat([u, w, bias], -1), route)
        u_hat, q = planar_u_hat(u, w)
        for k in range(w.shape[-2]):
            x, score = planar_push_score(
                x, score, bias[..., k, :], u_hat[..., k, :], w[..., k, :], q[..., k, :]
            )
        return x, score


def push_score_planar_packed(x, score, theta) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`push_score_stacked_planar` with parameters packed as ``theta = [u | w | b]``."""
    with torch.no_grad():
        route = stack_route(x, theta)
        if route != PLAIN:
            return planar_push_kernel(x, score, theta, route)
        return push_score_stacked_planar(x, score, *split_planar_theta(theta, x.shape[-1]))


class ConditionedStackedPlanar(ConditionedFlow):
    r"""``K`` planar layers applied in order, with parameters stacked along a layer
    dimension: ``(bias (..., K, 1), u (..., K, D), w (..., K, D))`` or a callable
    returning them. Same map as composing ``K`` :class:`ConditionedPlanar`, one module,
    fewer ops. The inverse inverts layer by layer, each exactly.
    """

    def _planar_params(self):
        bias, u, w = _unpack_stacked_planar(self._params)
        u_hat, q = planar_u_hat(u, w)
        return bias, u_hat, w, q

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass."""
        bias, u, w = _unpack_stacked_planar(self._params)
        x = check_event(x, w.shape[-1], dtype=w.dtype, batch_shape=w.shape[:-2])
        return stacked_planar(x, bias, u, w)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        bias, u_hat, w, q = self._planar_params()
        y = check_event(y, w.shape[-1], "y", dtype=w.dtype, batch_shape=w.shape[:-2])
        for k in reversed(range(w.shape[-2])):
            y = planar_inverse(y, bias[..., k, :], u_hat[..., k, :], w[..., k, :], q[..., k, :])
        return y

    @torch.no_grad()
    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, without an
        inverse (see :func:`push_score_stacked_planar`)."""
        bias, u, w = _unpack_stacked_planar(self._params)
        return push_score_stacked_planar(x, score, bias, u, w)


class StackedPlanar(LearnableStack, ConditionedStackedPlanar, TransformModule):
    r"""``num_flows`` learnable planar layers in one module (parameters stacked in
    ``(K, D)`` tensors). The map, log-det and inverse equal those of
    ``ComposeTransformModule([Planar(D) for _ in range(K)])`` with the same parameters;
    one pass computes ``y`` and the summed log-det.

    Example:

    >>> import torch
    >>> from pyro_nfvi.transforms import StackedPlanar
    >>> flow = StackedPlanar(2, num_flows=8)
    >>> x = torch.randn(4, 2)
    >>> y, ladj = flow.call_and_ladj(x)
    >>> torch.allclose(flow.inv(y), x, atol=1e-5), ladj.shape
    (True, torch.Size([4]))

    **Speed.** By default the forward pass and its gradient run in a hand-written
    ``autograd.Function`` (two small ops per layer each way, whatever ``D``), which on CPU
    runs in NumPy on zero-copy views of the tensors (the route is picked by
    :func:`~pyro_nfvi.transforms._fused.stack_route`; measured speed against Pyro's
    ``Planar``: ``benchmarks/bench_speed.py`` and the README's Benchmarks entry, the one
    place for those figures). ``compile=True`` runs the plain layer loop through
    ``torch.compile`` instead; for planar stacks that is not faster than the eager kernel,
    and it costs a warm-up of seconds to a minute on a 2-core CPU,
    again for each new parameter shape (K, D); past torch's recompile limit (8) torch runs
    the function eagerly. Where compilation is unavailable it warns once and falls back
    to the eager path.

    :param input_dim: dimension ``D``.
    :param num_flows: number of layers ``K``.
    :param compile: use ``torch.compile`` for the forward pass.
    """

    theta_layout = ("D", "D", 1)  # [u | w | b]: (K, 2D+1)
    packed_fn = staticmethod(stacked_planar_packed)
    packed_push = staticmethod(push_score_planar_packed)
    packed_kernel_push = staticmethod(planar_stack_push_kernel)

    @property
    def u(self) -> torch.Tensor:
        return self.theta[:, : self.input_dim]

    @property
    def w(self) -> torch.Tensor:
        return self.theta[:, self.input_dim : 2 * self.input_dim]

    @property
    def bias(self) -> torch.Tensor:
        return self.theta[:, 2 * self.input_dim :]

    def _params_tuple(self) -> Params:
        return self.bias, self.u, self.w

    def reset_parameters(self, near_identity: bool = False) -> None:
        """Pyro's initialisation (``u, w ~ U(±1/√D)``, ``b = 0``), or with
        ``near_identity=True`` each layer starts within ~0.01 of the identity map
        (random unit ``w``, ``u`` set so that ``û ≈ 0``), as a guide wants at step 0."""
        bound = 1.0 / math.sqrt(self.input_dim)
        with torch.no_grad():
            self.theta.uniform_(-bound, bound)
            self.bias.zero_()
            if near_identity:
                # Unit-norm w: û depends on w through w/‖w‖², so a short w would make
                # û hypersensitive to w (an Adam step on w would move û by O(1)).
                w = torch.randn_like(self.w)
                w = w / w.norm(dim=-1, keepdim=True)
                self.w.copy_(w)
                # u = 0 gives û = 0; a little noise breaks the symmetry between layers
                self.u.copy_(0.01 * torch.randn_like(w))


class ConditionalStackedPlanar(ConditionalStackedFlow):
    r"""``K`` conditional planar layers whose parameters all come from ONE hypernetwork
    call. ``nn`` maps a context ``(..., M)`` to a tuple of shapes
    ``(..., K), (..., K*D), (..., K*D)`` (e.g. ``DenseNN(M, hidden, param_dims=[K, K*D,
    K*D])``); ``.condition(context)`` returns a :class:`ConditionedStackedPlanar`.

    Example:

    >>> import torch
    >>> from pyro.nn import DenseNN
    >>> from pyro_nfvi.transforms import ConditionalStackedPlanar
    >>> flow = ConditionalStackedPlanar(DenseNN(3, [16], param_dims=[4, 8, 8]), input_dim=2)
    >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
    torch.Size([5, 2])

    :param nn: the hypernetwork.
    :param input_dim: dimension ``D`` of the flow.
    """

    layer_sizes = (1, "D", "D")  # bias, u, w

    def _conditioned(self, params) -> ConditionedStackedPlanar:
        return ConditionedStackedPlanar(params)
