r"""Hamiltonian flows (Salimans, Kingma & Welling 2015; Caterini, Doucet & Sejdinovic
2018): learnable leapfrog steps on the phase space :math:`(z, \omega)`, with exact
inverses and exact log-determinants.

The momentum :math:`\omega \in \mathbb{R}^D` has kinetic energy
:math:`\tfrac12 \omega^\top M^{-1}\omega` (diagonal mass :math:`M`); the potential is
:math:`U(z) = -\log \tilde p(z)`. One step :math:`k = 1..K` is a leapfrog step with
per-dimension step sizes :math:`\epsilon_k`, then a tempering (cooling) step:

.. math::

    \omega' = \omega - \tfrac{\epsilon_k}{2} \odot \nabla U(z), \quad
    z' = z + \epsilon_k \odot M^{-1}\omega', \quad
    \omega'' = \omega' - \tfrac{\epsilon_k}{2} \odot \nabla U(z'), \quad
    \omega''' = \alpha_k\, \omega''.

Each of the three leapfrog updates is a shear (one block moves by a function of the
other), so the leapfrog map preserves volume (log-det 0) and is inverted exactly by
running the updates backwards; the tempering step has log-det :math:`D \log\alpha_k`.

**Bounded force** (option ``max_force = c``): the momentum updates use
:math:`f(z) = b \odot \tanh(\nabla U(z) / b)` with :math:`b = c\sqrt{M}` in place of
:math:`\nabla U(z)`. The updates stay shears (the force depends on :math:`z` and the
parameters only), so the map keeps log-det 0 and its exact inverse, and the auxiliary
bound below stays a valid bound; only the dynamics are no longer exactly Hamiltonian where
:math:`|\nabla U| \gtrsim c\sqrt M`. Near a posterior :math:`\nabla U \sim \sqrt M`
(for :math:`M` the inverse posterior variance), so :math:`c = 10` rarely binds there; it
binds at the wild draws of a guide's first steps, where an unbounded kick of
:math:`\epsilon\nabla U` throws :math:`z` out of the model's support.

Tempering follows Caterini et al.'s fixed quadratic schedule with a learnable initial
inverse temperature :math:`\beta_0 \in (0, 1)`:

.. math::

    \beta_k^{-1/2} = \Bigl(1 - \beta_0^{-1/2}\Bigr)\frac{k^2}{K^2} + \beta_0^{-1/2},
    \qquad \alpha_k = \sqrt{\beta_{k-1}/\beta_k}, \qquad \beta_K = 1,

so the total tempering log-det is :math:`\tfrac{D}{2}\log\beta_0`. The initial momentum
of a Hamiltonian flow should be drawn from :math:`\mathcal{N}(0, M/\beta_0)`
(:meth:`Hamiltonian.momentum_dist`), the final one is scored under
:math:`\mathcal{N}(0, M)` (:meth:`Hamiltonian.momentum_log_prob`): the auxiliary bound is

.. math::

    \log \tilde p(z_K) + \log\mathcal{N}(\omega_K; 0, M) - \log q_0(z_0)
    - \log\mathcal{N}(\omega_0; 0, M/\beta_0) + \tfrac{D}{2}\log\beta_0 \le \log Z .

Parametrisation: :math:`\epsilon_k = \epsilon_{\max}\,\mathrm{sigmoid}(\theta_k)`, one
vector per step (``(K, D)`` learnable logits); :math:`M = \exp(\mu)` per dimension;
:math:`\beta_0 = \mathrm{sigmoid}(b)`. The gradient :math:`\nabla U` is taken with
autograd, with ``create_graph=True`` whenever grad mode is on, so step sizes, mass and
:math:`\beta_0` get their gradients through :math:`\nabla U`.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import constraints

from .._validation import ArgumentError, check_positive
from ._base import LadjCacheMixin, as_real_input, check_event, check_input_dim

__all__ = ["Hamiltonian", "PhaseSpaceLift", "PhaseSpaceTarget"]

Potential = Callable[[torch.Tensor], torch.Tensor]


def _tensors_read_by(fn: Any, depth: int = 2) -> List[torch.Tensor]:
    """The tensors a potential can be seen to read, which the flow's cache compares by
    value: those of an ``nn.Module`` (or of the module a bound method belongs to), the
    arguments of a ``functools.partial``, and the tensors, modules and functions in a
    function's closure cells and in the globals its code names (functions followed
    ``depth`` levels down)."""
    if isinstance(fn, torch.Tensor):
        return [fn]
    if isinstance(fn, nn.Module):
        return list(fn.parameters()) + list(fn.buffers())
    if depth < 0 or not callable(fn):
        return []
    out: List[torch.Tensor] = []
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        out += _tensors_read_by(owner)
    if isinstance(fn, functools.partial):
        for a in (fn.func, *fn.args, *fn.keywords.values()):
            out += _tensors_read_by(a, depth - 1)
    code = getattr(fn, "__code__", None)
    if code is not None:
        seen = []
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                seen.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        names = getattr(fn, "__globals__", {})
        seen += [names[n] for n in code.co_names if n in names]
        for v in seen:
            if isinstance(v, (torch.Tensor, nn.Module)):
                out += _tensors_read_by(v)
            elif inspect.isfunction(v) or isinstance(v, functools.partial):
                out += _tensors_read_by(v, depth - 1)
    return out


class Hamiltonian(LadjCacheMixin, TransformModule):
    r"""``num_steps`` learnable leapfrog steps with tempering on the phase space: a
    bijection of ``real_vector`` of size ``2 D`` whose event is the concatenation
    ``[z, ω]`` (see the module docstring for the math).

    Example:

    >>> import torch
    >>> from pyro_nfvi.transforms import Hamiltonian
    >>> U = lambda z: 0.5 * (z ** 2).sum(-1)          # standard normal target
    >>> flow = Hamiltonian(2, U, num_steps=4)
    >>> x = torch.randn(5, 4)                          # [z, ω], D = 2
    >>> y, ladj = flow.call_and_ladj(x)
    >>> torch.allclose(flow.inv(y), x, atol=1e-5), ladj.shape
    (True, torch.Size([5]))

    :param input_dim: the dimension ``D`` of ``z`` (the event has size ``2 D``).
    :param potential: ``z -> U(z) = -log p̃(z)`` for ``z`` of shape ``(..., D)``,
        returning shape ``(...)`` or a scalar (its sum): only ``∇ U.sum()`` is used, so
        rows must not interact. May depend on learnable parameters. Can be replaced
        later (attribute ``potential``). The cached ``x <-> y`` pair that spares
        ``log_prob`` of a fresh sample the inverse is dropped when the potential is
        replaced or a tensor it reads changes value, as far as the flow can see them: an
        ``nn.Module`` potential's parameters and buffers (or those of the module a bound
        method belongs to), a ``functools.partial``'s arguments, the tensors in a
        function's closure and the globals it names (two levels of called functions).
    :param num_steps: the number of leapfrog steps ``K`` (>= 1).
    :param step_size: initial step size (all steps, all dimensions), in ``(0, max_step_size)``.
    :param max_step_size: :math:`\epsilon_{\max}`.
    :param tempering: learn :math:`\beta_0` (initialised at ``init_beta0``) with
        Caterini et al.'s quadratic schedule; ``False``: :math:`\beta_0 = 1`, no tempering.
    :param init_beta0: initial :math:`\beta_0` in ``(0, 1)``.
    :param init_mass: initial diagonal mass (a positive number or a ``(D,)`` tensor).
    :param max_force: ``None`` (default): the force is :math:`\nabla U`; a positive number
        ``c``: the bounded force :math:`c\sqrt{M}\tanh(\nabla U/(c\sqrt M))` (see the
        module docstring).

    References: T. Salimans, D. P. Kingma, M. Welling. Markov Chain Monte Carlo and
    Variational Inference: Bridging the Gap. ICML 2015. A. L. Caterini, A. Doucet,
    D. Sejdinovic. Hamiltonian Variational Auto-Encoder. NeurIPS 2018.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1  # volume preserving up to positive tempering factors

    def __init__(
        self,
        input_dim: int,
        potential: Optional[Potential],
        num_steps: int = 4,
        step_size: float = 0.1,
        max_step_size: float = 1.0,
        tempering: bool = True,
        init_beta0: float = 0.5,
        init_mass=1.0,
        max_force: Optional[float] = None,
    ) -> None:
        super().__init__(cache_size=1)
        D = self.input_dim = check_input_dim(input_dim)
        K = self.num_steps = check_input_dim(num_steps, "num_steps")
        if potential is not None and not callable(potential):
            raise TypeError(f"potential must be a callable z -> U(z), got {type(potential).__name__}")
        max_step_size = check_positive(max_step_size, "max_step_size")
        if check_positive(step_size, "step_size") >= max_step_size:
            raise ArgumentError(f"step_size must be in (0, max_step_size={max_step_size}), got {step_size!r}")
        if check_positive(init_beta0, "init_beta0") >= 1.0:
            raise ArgumentError(f"init_beta0 must be in (0, 1), got {init_beta0!r}")
        try:
            mass = torch.as_tensor(init_mass, dtype=torch.get_default_dtype()).expand(D).clone()
        except (TypeError, ValueError, RuntimeError):
            mass = None
        if mass is None or not bool((mass > 0).all() and torch.isfinite(mass).all()):
            raise ArgumentError(
                f"init_mass must be a positive finite number or {D} of them (input_dim), got {init_mass!r}"
            )
        if max_force is not None:
            max_force = check_positive(max_force, "max_force")
        self.potential = potential
        self.max_force = None if max_force is None else float(max_force)
        self.max_step_size = float(max_step_size)
        self.tempering = bool(tempering)
        #: optional names of the D coordinates, for error messages (set by guides)
        self.coordinate_names: Optional[Sequence[str]] = None
        logit = math.log(step_size / (max_step_size - step_size))
        self.step_logit = nn.Parameter(torch.full((K, D), logit))
        self.log_mass = nn.Parameter(mass.log())
        b = math.log(init_beta0 / (1 - init_beta0))
        self.beta0_logit = nn.Parameter(torch.tensor(b)) if self.tempering else None

    # --------------------------------------------------------------- parameters
    @property
    def step_size(self) -> torch.Tensor:
        """:math:`\\epsilon`, shape ``(K, D)``."""
        return self.max_step_size * torch.sigmoid(self.step_logit)

    @property
    def mass(self) -> torch.Tensor:
        """The diagonal mass :math:`M`, shape ``(D,)``."""
        return self.log_mass.exp()

    @property
    def beta0(self) -> torch.Tensor:
        """The initial inverse temperature :math:`\\beta_0` (1 without tempering)."""
        if self.beta0_logit is None:
            return torch.ones((), dtype=self.log_mass.dtype, device=self.log_mass.device)
        return torch.sigmoid(self.beta0_logit)

    def log_alphas(self) -> Optional[torch.Tensor]:
        """``log α_k``, shape ``(K,)``, of the tempering steps (``None`` without)."""
        if self.beta0_logit is None:
            return None
        K = self.num_steps
        k = torch.arange(K + 1, dtype=self.log_mass.dtype, device=self.log_mass.device)
        inv_sqrt_b0 = torch.exp(-0.5 * torch.nn.functional.logsigmoid(self.beta0_logit))
        inv_sqrt_beta = (1 - inv_sqrt_b0) * (k / K) ** 2 + inv_sqrt_b0  # β_k^{-1/2}
        log_beta = -2 * inv_sqrt_beta.log()
        return 0.5 * (log_beta[:-1] - log_beta[1:])

    def momentum_dist(self, batch_shape: torch.Size = torch.Size()):
        """:math:`\\mathcal{N}(0, M/\\beta_0)`, the initial momentum (event dim 1)."""
        import pyro.distributions as dist

        std = (self.mass / self.beta0).sqrt()
        return dist.Normal(torch.zeros_like(std), std).expand(torch.Size(batch_shape) + std.shape).to_event(1)

    def momentum_log_prob(self, w: torch.Tensor) -> torch.Tensor:
        """:math:`\\log\\mathcal{N}(\\omega; 0, M)` summed over the last dim."""
        return -0.5 * ((w * w / self.mass) + self.log_mass + math.log(2 * math.pi)).sum(-1)

    # --------------------------------------------------------------- dynamics
    def _name(self, j: int) -> str:
        names = self.coordinate_names
        return names[j] if names is not None and j < len(names) else f"z[{j}]"

    def grad_potential(self, z: torch.Tensor, step: str = "") -> torch.Tensor:
        """:math:`\\nabla U(z)` by autograd, differentiable (``create_graph``) while grad
        mode is on; raises naming the ``potential`` argument if it has no gradient, and
        naming the step and coordinates if the gradient is not finite."""
        if self.potential is None:
            raise ValueError("Hamiltonian has no potential: pass potential=... or set .potential")
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = z if z.requires_grad else z.detach().requires_grad_()
            U = self.potential(z_in)
            if not isinstance(U, torch.Tensor) or not U.requires_grad:
                raise ValueError(
                    "potential must return a tensor differentiable in z (a torch function of z); "
                    f"got {'a tensor without gradient' if isinstance(U, torch.Tensor) else type(U).__name__}"
                )
            if U.shape not in (z.shape[:-1], torch.Size()):
                raise ValueError(
                    f"potential must return shape {tuple(z.shape[:-1])} (or a scalar) for z of "
                    f"shape {tuple(z.shape)}, got {tuple(U.shape)}"
                )
            (g,) = torch.autograd.grad(U.sum(), z_in, create_graph=create_graph, allow_unused=True)
        if g is None:
            raise ValueError("potential does not depend on z (no gradient): the leapfrog steps need ∇U(z)")
        if not bool(torch.isfinite(g).all()):
            bad = (~torch.isfinite(g)).reshape(-1, g.shape[-1]).any(0).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite gradient of the potential {step}at "
                f"{', '.join(self._name(j) for j in bad[:8])}{' ...' if len(bad) > 8 else ''}"
                "; lower the step sizes or check the potential"
            )
        return g

    def force(self, z: torch.Tensor, step: str = "") -> torch.Tensor:
        """The force of the momentum updates: :meth:`grad_potential`, bounded elementwise
        by ``max_force * sqrt(M)`` when ``max_force`` is set (see the module docstring)."""
        g = self.grad_potential(z, step)
        if self.max_force is None:
            return g
        bound = self.max_force * (0.5 * self.log_mass).exp()
        return bound * torch.tanh(g / bound)

    def _split(self, x: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        x = check_event(x, 2 * self.input_dim, name, dtype=self.log_mass.dtype)
        return x[..., : self.input_dim], x[..., self.input_dim :]

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|)`` in one pass; ``K + 1`` evaluations of ``∇U``."""
        z, w = self._split(x, "x")
        eps, inv_mass, log_alpha = self.step_size, (-self.log_mass).exp(), self.log_alphas()
        g = self.force(z, "at leapfrog step 1 (of {}) ".format(self.num_steps))
        for k in range(self.num_steps):
            w = w - 0.5 * eps[k] * g
            z = z + eps[k] * inv_mass * w
            g = self.force(z, f"at the end of leapfrog step {k + 1} (of {self.num_steps}) ")
            w = w - 0.5 * eps[k] * g
            if log_alpha is not None:
                w = w * log_alpha[k].exp()
        ladj = torch.zeros(x.shape[:-1], dtype=z.dtype, device=z.device)
        if log_alpha is not None:
            ladj = ladj + self.input_dim * log_alpha.sum()
        return torch.cat([z, w], -1), ladj

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        z, w = self._split(y, "y")
        eps, inv_mass, log_alpha = self.step_size, (-self.log_mass).exp(), self.log_alphas()
        K = self.num_steps
        g = self.force(z, f"inverting leapfrog step {K} (of {K}) ")
        for k in reversed(range(K)):
            if log_alpha is not None:
                w = w * (-log_alpha[k]).exp()
            w = w + 0.5 * eps[k] * g
            z = z - eps[k] * inv_mass * w
            g = self.force(z, f"inverting leapfrog step {k + 1} (of {K}) ")
            w = w + 0.5 * eps[k] * g
        return torch.cat([z, w], -1)

    # the cache (which spares TransformedDistribution.log_prob of a fresh sample the
    # inverse) is tied to the potential object and to the tensors it can be seen to read
    def _param_tensors(self):
        return list(self.parameters()) + _tensors_read_by(self.potential)

    def _cache_key(self):
        return self.potential

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # constant in x: no need to rerun the dynamics
        x = as_real_input(x, "x", self.log_mass.dtype)
        ladj = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        log_alpha = self.log_alphas()
        return ladj if log_alpha is None else ladj + self.input_dim * log_alpha.sum()

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, num_steps={self.num_steps}, "
                f"max_step_size={self.max_step_size}, tempering={self.tempering}, "
                f"max_force={self.max_force}")


class PhaseSpaceLift(LadjCacheMixin, TransformModule):
    r"""The first layer of a Hamiltonian flow fitted as a density: maps standard normal
    noise ``[ε_z, ε_ω]`` (size ``2 D``) to the initial phase-space point

    .. math::

        z_0 = \mathrm{loc} + e^{s} \odot f(\epsilon_z), \qquad
        \omega_0 = \sqrt{M/\beta_0} \odot \epsilon_\omega,

    with ``f`` the given flow on ``R^D`` (``q_0``: a flow on ``z`` alone) and ``M``,
    :math:`\beta_0` read from ``hamiltonian``, so that ``TransformedDistribution(N(0,
    I_{2D}), [PhaseSpaceLift(h, f), h])`` is the joint density of the final point, and
    :func:`~pyro_nfvi.infer.fit_density` with :class:`PhaseSpaceTarget` fits the whole
    Hamiltonian flow by the auxiliary bound. Log-det: ``Σ log|f'| + Σ s + ½ Σ log(M/β0)``.

    :param hamiltonian: the :class:`Hamiltonian` that follows (not owned: its parameters
        are not registered here).
    :param z_flow: a transform of ``R^D`` or a list of them (default: none).
    :param affine: learn ``loc`` and ``s`` (initialised to 0).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = 1

    def __init__(self, hamiltonian: Hamiltonian, z_flow=None, affine: bool = True) -> None:
        super().__init__(cache_size=1)
        if not isinstance(hamiltonian, Hamiltonian):
            raise TypeError(f"hamiltonian must be a Hamiltonian, got {type(hamiltonian).__name__}")
        D = hamiltonian.input_dim
        object.__setattr__(self, "_hamiltonian", hamiltonian)  # a reference, not a submodule
        flows = [] if z_flow is None else list(z_flow) if isinstance(z_flow, (list, tuple)) else [z_flow]
        self.z_flow = nn.ModuleList([f for f in flows if isinstance(f, nn.Module)])
        self._z_flows: List = flows
        self.loc = nn.Parameter(torch.zeros(D)) if affine else None
        self.log_scale = nn.Parameter(torch.zeros(D)) if affine else None
        self.input_dim = D

    def _momentum_log_std(self) -> torch.Tensor:
        h = self._hamiltonian
        log_b0 = torch.zeros_like(h.log_mass) if h.beta0_logit is None else torch.nn.functional.logsigmoid(h.beta0_logit)
        return 0.5 * (h.log_mass - log_b0)

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = check_event(x, 2 * self.input_dim, dtype=self._hamiltonian.log_mass.dtype)
        z, e = x[..., : self.input_dim], x[..., self.input_dim :]
        ladj = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        for f in self._z_flows:
            if hasattr(f, "call_and_ladj"):
                y, l = f.call_and_ladj(z)
            else:
                y = f(z)
                l = f.log_abs_det_jacobian(z, y)
            z, ladj = y, ladj + l
        if self.loc is not None:
            z = self.loc + self.log_scale.exp() * z
            ladj = ladj + self.log_scale.sum()
        log_std = self._momentum_log_std()
        return torch.cat([z, log_std.exp() * e], -1), ladj + log_std.sum()

    def _param_tensors(self):
        # its own (with z_flow's) and the Hamiltonian's mass and beta0, which it reads
        h = self._hamiltonian
        return list(self.parameters()) + [p for p in (h.log_mass, h.beta0_logit) if p is not None]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        y = check_event(y, 2 * self.input_dim, "y", dtype=self._hamiltonian.log_mass.dtype)
        z, w = y[..., : self.input_dim], y[..., self.input_dim :]
        if self.loc is not None:
            z = (z - self.loc) * (-self.log_scale).exp()
        for f in reversed(self._z_flows):
            z = f.inv(z)
        return torch.cat([z, w * (-self._momentum_log_std()).exp()], -1)


class PhaseSpaceTarget:
    r"""The phase-space target :math:`\tilde p(z)\,\mathcal{N}(\omega; 0, M)` of a
    Hamiltonian flow, on ``[z, ω]`` of size ``2 D``, with the same ``log Z`` as the
    target on ``z`` (the momentum factor is normalised). ``KL(q(z_K, ω_K) ‖ p(z)
    N(ω; 0, M))`` computed against it (e.g. by :func:`~pyro_nfvi.diagnostics.kl_divergence`)
    is an upper bound on the KL of the ``z``-marginal of the flow.

    :param target: a :class:`~pyro_nfvi.targets.Target`, a distribution or a callable
        ``z -> log p̃(z)``.
    :param hamiltonian: the :class:`Hamiltonian` whose mass ``M`` scores the momentum.
    """

    def __init__(self, target, hamiltonian: Hamiltonian) -> None:
        from ..targets import log_density_fn

        self.target, self.hamiltonian = target, hamiltonian
        self._log_p = log_density_fn(target)

    @property
    def log_Z(self):
        return getattr(self.target, "log_Z", None)

    def log_prob_unnormalized(self, x: torch.Tensor) -> torch.Tensor:
        D = self.hamiltonian.input_dim
        return self._log_p(x[..., :D]) + self.hamiltonian.momentum_log_prob(x[..., D:])

    __call__ = log_prob_unnormalized
