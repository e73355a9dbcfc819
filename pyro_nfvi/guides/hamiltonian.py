r"""A Hamiltonian-flow autoguide: a flow guide's draw moved by learnable leapfrog steps
under the model's own log joint (Salimans, Kingma & Welling 2015; Caterini, Doucet &
Sejdinovic 2018)."""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide

from .._rng import fork_rng
from .._validation import check_int
from ..diagnostics import plate_nesting
from .summaries import _SEED, quantiles_of_draws
from .families import AutoPlanarFlow
from .flow import AutoNormalizingFlow
from .saving import _GuideSaving, take_stored_module_params
from ..transforms.hamiltonian import Hamiltonian


#: what torch.jit's tracer says when a backward pass run inside the trace reads a tensor
#: the trace has no value for
_TRACER_CONSTANT = "Cannot insert a Tensor that requires grad as a constant"
_JIT_MESSAGE = (
    "AutoHamiltonianFlow cannot be traced by torch.jit (JitTrace_ELBO, "
    "JitTraceMeanField_ELBO, ...) for this model: each leapfrog step takes the gradient of "
    "the model's log joint with torch.autograd.grad inside the trace, and PyTorch's tracer "
    "cannot record the backward pass of operations that save their output (exp, sigmoid, "
    "tanh, ...: the support bijections of constrained sites such as LogNormal, HalfNormal, "
    "HalfCauchy, Gamma or Beta, or such operations in the model). Use Trace_ELBO (or "
    "TraceMeanField_ELBO) with this guide."
)


class AutoHamiltonianFlow(_GuideSaving, AutoGuide):
    r"""
    A base flow guide followed by ``num_steps`` learnable leapfrog/tempering steps under
    the model's log joint: Hamiltonian variational inference with the auxiliary-variable
    bound.

    Let :math:`x \in \mathbb{R}^D` be the base guide's packed latent vector (the
    unconstrained coordinates it draws, before its support bijections and, for
    hierarchical sites, its partial non-centring), and

    .. math::

        \log\tilde p(x) = \log p(\mathrm{data}, \theta(x)) + \log\Bigl|\det
            \frac{\partial\theta}{\partial x}\Bigr|

    the model's log joint in those coordinates (:math:`\theta(x)`: the site values the base
    guide places, with the log-abs-det of every support bijection and placement; computed
    by running the base guide conditioned on :math:`x` and replaying the model, so plates,
    constrained and hierarchical sites are handled by Pyro's and the base guide's own
    machinery). The guide draws

    .. math::

        x_0 \sim q_0, \qquad \omega_0 \sim \mathcal{N}(0, M/\beta_0), \qquad
        (x_K, \omega_K) = H(x_0, \omega_0),

    with :math:`q_0` the base guide's posterior and :math:`H` a
    :class:`~pyro_nfvi.transforms.Hamiltonian` (``K`` leapfrog steps of potential
    :math:`U = -\log\tilde p`, per-dimension learnable step sizes, learnable diagonal mass
    :math:`M`, tempering with learnable :math:`\beta_0`), then places :math:`x_K` through the
    base guide. The log density it emits for its draw is

    .. math::

        \log q_0(x_0) + \log\mathcal{N}(\omega_0; 0, M/\beta_0)
            - \log\mathcal{N}(\omega_K; 0, M) - \log|\det \partial H| ,

    plus the base guide's per-site log-abs-dets, so :class:`~pyro.infer.Trace_ELBO` is the
    auxiliary bound

    .. math::

        \mathbb{E}\bigl[\log\tilde p(x_K) + \log\mathcal{N}(\omega_K; 0, M) - \log q_0(x_0)
            - \log\mathcal{N}(\omega_0; 0, M/\beta_0) + \tfrac{D}{2}\log\beta_0\bigr]
            \le \log p(\mathrm{data}),

    below the ELBO of the ``x``-marginal of the guide (which has no closed form).
    Importance weights computed from this guide (:func:`~pyro_nfvi.importance.importance_sample`,
    :func:`~pyro_nfvi.diagnostics.evaluate_guide`) are the auxiliary weights
    :math:`p(\mathrm{data}, \theta(x_K))\,\mathcal{N}(\omega_K; 0, M) / q(x_K, \omega_K)`: valid
    self-normalised weights for the extended target :math:`p(\theta\mid\mathrm{data})\,
    \mathcal{N}(\omega; 0, M)` (so posterior expectations and ``log mean w`` are consistent),
    with more variance than marginal weights would have.

    With ``num_steps=0`` no momentum is drawn and the guide is exactly its base guide (the
    same draws and log densities).

    Each step costs one gradient of the model's log joint (``K + 1`` per draw, with
    ``create_graph=True`` while training: a second-order backward pass).

    JIT: unlike the other guides of this package, this guide works with
    :class:`~pyro.infer.JitTrace_ELBO` only for models whose log joint (in the base guide's
    unconstrained coordinates) uses no operation whose backward pass reads its own output
    (``exp``, ``sigmoid``, ``tanh``, ...), in practice models whose latent sites are all
    unconstrained (e.g. ``Normal``): the leapfrog gradients are taken with
    ``torch.autograd.grad`` inside the trace, and PyTorch's tracer cannot record those
    backward passes. With a constrained latent site (``LogNormal``, ``HalfNormal``,
    ``HalfCauchy``, ``Gamma``, ``Beta``, ...) the first step under a JIT ELBO raises a
    ``RuntimeError`` that says so: use :class:`~pyro.infer.Trace_ELBO` (or
    ``TraceMeanField_ELBO``).

    Saving: ``copy.deepcopy``, ``torch.save``/``torch.load`` and ``pickle`` keep the live
    guide working and give a copy that runs, trains and draws as the original (the model
    is kept by reference, as in :class:`~pyro_nfvi.guides.saving._GuideSaving`; re-attach
    it with ``guide.model = model`` if the loaded guide says it lost it).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model(x):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
        >>> guide = AutoHamiltonianFlow(model, num_steps=3)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> loss = svi.step(torch.randn(20))
        >>> guide(torch.randn(20))["mu"].shape
        torch.Size([])

    :param callable model: a Pyro model whose latent sites are continuous.
    :param int num_steps: leapfrog steps ``K`` (>= 0).
    :param base: a guide of this package (an :class:`~pyro_nfvi.guides.AutoNormalizingFlow`)
        for ``q0``, built for the same model and not run yet; default
        ``AutoPlanarFlow(model)``. It becomes a submodule of this guide (its parameters are
        named under it).
    :param float step_size: initial step size of every step and coordinate, relative to
        the initial mass (see ``init_mass``). 0.25 diverged (a non-finite gradient, raised)
        on eight schools within 50 steps of the posterior suite; 0.1 trained 200 steps.
    :param float max_step_size: the bound :math:`\epsilon_{\max}` of the step sizes.
    :param bool tempering: learn :math:`\beta_0` (Caterini et al.'s quadratic schedule).
    :param float init_beta0: initial :math:`\beta_0`.
    :param init_mass: ``None`` (default): :math:`M = 1/s^2` from the base guide's initial
        per-coordinate scale :math:`s` (the inverse covariance of a diagonal Laplace
        approximation, so that the step sizes are relative); or a positive number.
    :param max_force: bound of the leapfrog force relative to :math:`\sqrt M` (see
        :class:`~pyro_nfvi.transforms.Hamiltonian`; ``None``: the plain gradient). Default
        10: the first draws of a guide can sit where the log joint's gradient is 1e4; on
        the posterior suite's stochastic-volatility model the unbounded kick moved the AR
        coefficient out of (-1, 1) at the first step on 2 of 3 seeds.

    References: T. Salimans, D. P. Kingma, M. Welling. Markov Chain Monte Carlo and
    Variational Inference: Bridging the Gap. ICML 2015. A. L. Caterini, A. Doucet,
    D. Sejdinovic. Hamiltonian Variational Auto-Encoder. NeurIPS 2018.
    """

    def __init__(
        self,
        model: Callable,
        num_steps: int = 4,
        base: Optional[AutoNormalizingFlow] = None,
        *,
        step_size: float = 0.1,
        max_step_size: float = 1.0,
        tempering: bool = True,
        init_beta0: float = 0.5,
        init_mass: Optional[float] = None,
        max_force: Optional[float] = 10.0,
    ) -> None:
        num_steps = check_int(num_steps, "num_steps", 0)
        if base is None:
            base = AutoPlanarFlow(model)
        if not isinstance(base, AutoNormalizingFlow):
            raise TypeError(
                "base must be a flow guide of pyro_nfvi (an AutoNormalizingFlow such as "
                f"AutoPlanarFlow(model)), got {type(base).__name__}"
            )
        if base.prototype_trace is not None:
            raise ValueError("base must not have been run yet (its parameters are renamed under this guide)")
        super().__init__(model)
        self.num_steps = num_steps
        self.base = base
        # AutoGuide makes a child guide a part of a master (as in AutoGuideList); this one
        # is a whole guide run inside ours: it keeps its own plates and prototype
        base._update_master(None)
        self._hmc_kwargs = dict(step_size=step_size, max_step_size=max_step_size,
                                tempering=tempering, init_beta0=init_beta0,
                                max_force=max_force)
        self._init_mass = init_mass
        self.hamiltonian: Optional[Hamiltonian] = None

    # ------------------------------------------------------------- saving
    # _GuideSaving keeps the model on the live guide when it is pickled or deep-copied
    # (Pyro's AutoGuide.__getstate__ drops it, but this guide re-runs the model at every
    # call: its potential is the model's log joint) and pickles it by reference
    @property
    def model(self) -> Callable:
        """The model this guide is for. Assign to re-attach it to a loaded guide (the base
        guide gets it too)."""
        return _GuideSaving.model.fget(self)

    @model.setter
    def model(self, model: Callable) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self._model = (model,)  # unwrapped, as AutoGuide.__init__ keeps it
        self.__dict__.pop("_nfvi_model_lost", None)
        self.base.model = model  # wrapped there with the base's init_loc_fn

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        # AutoGuide.__setstate__ makes every child guide a part of this one (as in
        # AutoGuideList), whose plates it would then look up here: the base guide is a
        # whole guide run inside ours, with its own plates (as in __init__)
        self.base._update_master(None)

    # ------------------------------------------------------------------ setup
    def _setup_prototype(self, *args, **kwargs) -> None:
        self._check_model(args, kwargs)
        base = self.base
        with poutine.block(), fork_rng():
            base(*args, **kwargs)  # the base's setup: prototype, parameters
        self.prototype_trace = base.prototype_trace
        self._prototype_frames = base._prototype_frames
        if self.num_steps == 0:
            return
        D = base.latent_dim
        if self._init_mass is None:
            with torch.no_grad():
                mass = base.scale.detach().pow(-2)
        else:
            mass = self._init_mass
        h = Hamiltonian(D, None, self.num_steps, init_mass=mass, **self._hmc_kwargs)
        h.coordinate_names = [
            f"site '{name}'" + (f"[{j}]" if math.prod(shape) > 1 else "")
            for name, shape in base._unconstrained_shapes.items()
            for j in range(math.prod(shape))
        ]
        self.hamiltonian = h.to(dtype=base.loc.dtype, device=base.loc.device)
        # a checkpoint loaded before the first call: its leapfrog parameters, as the base
        # guide takes its own
        take_stored_module_params(self, "hamiltonian", self.hamiltonian)

    def _check_model(self, args, kwargs) -> None:
        """Discrete latents (enumerated or not) have no gradient: refuse them by name."""
        with poutine.block(), fork_rng(), torch.no_grad():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        for name, site in trace.iter_stochastic_nodes():
            if getattr(getattr(site["fn"], "support", None), "is_discrete", False):
                raise ValueError(
                    f"AutoHamiltonianFlow cannot handle the discrete latent site '{name}' "
                    f"({type(site['fn']).__name__}): the leapfrog steps need the gradient of "
                    "the log joint in the continuous latents. Marginalise it out of the model "
                    "(enumeration inside the guide's potential is not supported)."
                )

    # -------------------------------------------------------------- potential
    def _latent_name(self) -> str:
        return "_{}_latent".format(self.base._pyro_name)

    def log_density(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        r""":math:`\sum \log\tilde p(x)`: the model's log joint at the base guide's placement
        of ``x`` (shape ``(..., D)``, rows summed) plus the log-abs-det of the placement."""
        name = self._latent_name()
        with poutine.block():
            guide_trace = poutine.trace(poutine.condition(self.base, data={name: x})).get_trace(
                *args, **kwargs)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(
                *args, **kwargs)
        log_det = guide_trace.log_prob_sum(lambda n, site: n != name)  # Σ log|dx/dθ|
        return model_trace.log_prob_sum() - log_det

    def _potential(self, args, kwargs, x: torch.Tensor) -> torch.Tensor:
        return -self.log_density(x, *args, **kwargs)

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Draw the latent sites (a dict of constrained values), as every Pyro autoguide."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        base = self.base
        posterior = base.get_posterior(*args, **kwargs)
        x = pyro.sample(f"_{self._pyro_name}_x0", posterior, infer={"is_auxiliary": True})
        h = self.hamiltonian
        if h is not None:
            w0 = pyro.sample(f"_{self._pyro_name}_momentum0", h.momentum_dist(),
                             infer={"is_auxiliary": True})
            h.potential = functools.partial(self._potential, args, kwargs)
            tracing = torch.jit.is_tracing()  # (the failing tracer is gone in the handler)
            try:
                y, ladj = h.call_and_ladj(torch.cat([x, w0.expand(x.shape)], -1))
            except RuntimeError as e:
                if tracing and _TRACER_CONSTANT in str(e):
                    raise RuntimeError(_JIT_MESSAGE) from e
                raise
            finally:
                h.potential = None  # holds the model's arguments: do not keep them
            D = h.input_dim
            x, wK = y[..., :D], y[..., D:]
            log_density = -(h.momentum_log_prob(wK) + ladj)
            pyro.sample(f"_{self._pyro_name}_xK",
                        dist.Delta(x, log_density=log_density, event_dim=1),
                        infer={"is_auxiliary": True})
        # the base guide places x_K (plates, support bijections, their log-dets)
        name = self._latent_name()
        placed = poutine.block(poutine.condition(base, data={name: x}), hide=[name])
        return placed(*args, **kwargs)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, num_samples: int = 1000, **kwargs) -> Dict[str, torch.Tensor]:
        """Marginal posterior quantiles of each latent site, in constrained space
        (Monte-Carlo, ``num_samples`` draws of the guide from a fixed seed on forked random
        streams: the same answer each call, and the user's streams left as they were; see
        :meth:`AutoNormalizingFlow.quantiles <pyro_nfvi.guides.AutoNormalizingFlow.quantiles>`).

        :return: dict from site name to a tensor of shape ``(len(quantiles),) + site_shape``.
        """
        return quantiles_of_draws(self._draws(num_samples, args, kwargs), self.prototype_trace, quantiles)

    def median(self, *args, num_samples: int = 1000, **kwargs) -> Dict[str, torch.Tensor]:
        """Marginal posterior medians, a point of each site's support (see
        :meth:`AutoNormalizingFlow.median <pyro_nfvi.guides.AutoNormalizingFlow.median>`),
        from the draws of :meth:`quantiles`."""
        q = quantiles_of_draws(self._draws(num_samples, args, kwargs), self.prototype_trace, [0.5],
                               in_support=True)
        return {name: value[0] for name, value in q.items()}

    def _draws(self, num_samples: int, args, kwargs) -> Dict[str, torch.Tensor]:
        """``num_samples`` draws of every latent site, sample dimension first."""
        num_samples = check_int(num_samples, "num_samples", 2)
        with fork_rng():
            torch.manual_seed(_SEED)
            if self.prototype_trace is None:
                with self._pyro_context:  # as in a call: the param store's values are used
                    self._setup_prototype(*args, **kwargs)
            # the model's plates, observed sites' included (the prototype keeps only latent
            # sites): the draws go to their left; replayed, so nothing is sampled
            with poutine.block():
                full = poutine.trace(poutine.replay(self.model, trace=self.prototype_trace)).get_trace(*args, **kwargs)
            nesting = plate_nesting(full)
            with poutine.block(), pyro.plate("_nfvi_draws", num_samples, dim=-nesting - 1):
                values = self(*args, **kwargs)
        return {
            name: value.reshape((num_samples,) + self.prototype_trace.nodes[name]["value"].shape)
            for name, value in values.items()
        }
