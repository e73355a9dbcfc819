"""The flow autoguide :class:`AutoNormalizingFlow`: Pyro's autoguide contract (setup on the
first call, ``forward`` emitting one site per latent, ``get_posterior``, summaries), with
the work delegated to the modules of this package.

One sample, in ``forward``: ``sample_latent`` draws ``z`` from :meth:`get_posterior` (a
``_FlowPosterior``, ``posterior.py``: ``ε ~ N(0, I)`` -> flow -> affine, ``log q`` in the
same pass, STL surrogate from ``stl.py``); ``z`` is split per site; ``place_latents``
(``placement.py``) puts hierarchical sites relative to their prior and maps every site
through its support's bijection; each site is emitted as a ``Delta`` inside its plates.
"""

from __future__ import annotations

import numbers
import warnings
from contextlib import ExitStack
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch.distributions import register_kl
from torch.distributions.transforms import ComposeTransform, Transform

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints
from pyro.distributions.util import eye_like
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.autoguide.utils import _product
from pyro.nn.module import PyroParam

from .._compat import autoguide_setup_prototype, split_init_messenger
from .._rng import fork_rng
from .affine import ScaledUnitLowerAffine
from .curvature import _DEFAULT_INIT_SCALE, inspect_model, tame_initial_scale
from .neutra import PlacedFlowTransform, _arguments_in_placement, placement_arguments
from .placement import _run_latents, _UnplaceLatents, place_latents
from .posterior import _FlowPosterior, build_flow, elementary_parts
from .stl import score_unavailable
from .prototype import (SiteLayout, _arg_shapes, _hide_from_prototype, check_latent_shapes,
                        latent_layout)
from .saving import _GuideSaving, take_stored_module_params
from .summaries import _GuideSummaries


class _JacobianDelta(dist.Delta):
    """A site emitted by the guide: its value, with the log-Jacobian of the support
    bijection and of the placement as ``log_density``. Its KL to the model's site keeps
    that term (Pyro's ``kl_divergence(Delta, ·)`` drops it), so that
    ``TraceMeanField_ELBO`` scores the guide as ``Trace_ELBO`` does."""


@register_kl(_JacobianDelta, dist.Distribution)
def _kl_jacobian_delta(p: _JacobianDelta, q: dist.Distribution) -> torch.Tensor:
    # E_q[log q - log p] at the single value: log_density - log p(v)
    return p.log_density - q.log_prob(p.v)


#: largest latent dimension for which the default affine base is full rank
FULL_RANK_MAX_DIM = 200
#: the base distributions of the ``base`` option
BASES = ("normal", "studentt")
#: initial degrees of freedom of the Student-t base (near-Gaussian: the step-0 guide is
#: the curvature-initialised normal one, slightly wider in the tails)
STUDENTT_INIT_DF = 10.0


def _check_options(init_transform_fn, init_scale, centered, base, full_rank, stl) -> None:
    if not isinstance(stl, bool):
        raise ValueError(f"stl must be True or False, got {stl!r}")
    if full_rank is not None and not isinstance(full_rank, bool):
        raise ValueError(f"full_rank must be None, True or False, got {full_rank!r}")
    if not isinstance(base, str) or base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if centered is not None and (
        isinstance(centered, bool) or not isinstance(centered, numbers.Real)
        or not 0.0 <= centered <= 1.0
    ):
        raise ValueError(f"centered must be None or a float in [0, 1], got {centered!r}")
    if isinstance(init_transform_fn, Transform) or not callable(init_transform_fn):
        raise TypeError(
            "init_transform_fn must be a function latent_dim -> Transform "
            "(e.g. `lambda dim: planar_flow(dim, 8)`), but got "
            f"{type(init_transform_fn).__name__}"
        )
    if init_scale is not None and (
        isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real)
        or not init_scale > 0 or init_scale == float("inf")
    ):
        raise ValueError(f"init_scale must be None or a finite number > 0 (a Python float), got {init_scale!r}")


class AutoNormalizingFlow(_GuideSummaries, _GuideSaving, AutoContinuous):
    r"""
    Normalizing-flow guide over the whole (unconstrained) latent space.

    All latent sites of ``model`` are mapped to unconstrained space with
    :func:`~torch.distributions.biject_to` and concatenated into one vector
    :math:`z \in \mathbb{R}^D` (as in every :class:`AutoContinuous` guide). The
    variational family is

    .. math::

        \epsilon \sim q_0 = \mathcal{N}(0, I_D)\ (\text{or Student-t, see ``base``}), \qquad
        z = \mu + L\, f_K \circ \dots \circ f_1(\epsilon),

    where :math:`f_k` are the flow layers returned by ``init_transform_fn(D)``,
    :math:`\mu` is a learnable location and :math:`L` is a learnable positive
    diagonal scale (``full_rank=False``) or a lower-triangular Cholesky factor
    ``diag(scale) @ scale_tril`` with unit diagonal ``scale_tril``
    (``full_rank=True``, as :class:`~pyro.infer.autoguide.AutoMultivariateNormal`).
    The density is obtained by the change of variables formula

    .. math::

        \log q(z) = \log q_0(\epsilon)
            - \sum_k \log\left|\det \frac{\partial f_k}{\partial x}\right|
            - \log|\det L| .

    The flows act in the *standardised* frame and the affine layer places the
    result, so the flows only need to model the non-Gaussian shape, not the
    location and scale of the posterior (a ``tanh`` layer fed raw coordinates of
    scale 100 would saturate). Since flows are initialised near the identity,
    at step 0 the guide is approximately :math:`\mathcal{N}(\mu_0,
    \mathrm{diag}(s_0^2))` with :math:`\mu_0` given by ``init_loc_fn`` and :math:`s_0`
    by ``init_scale`` (a number, as in :class:`~pyro.infer.autoguide.AutoNormal`, or by
    default from the curvature of the log joint at :math:`\mu_0`). With ``full_rank=True`` and
    identity flows the family contains every multivariate normal, so the guide
    is a strict superset of :class:`~pyro.infer.autoguide.AutoMultivariateNormal`.

    Differences from Pyro's :class:`~pyro.infer.autoguide.AutoNormalizingFlow`:
    the learnable affine layer and ``init_loc_fn``/``init_scale``; works with
    :class:`~pyro.infer.JitTrace_ELBO` (pyro#3132); :meth:`get_posterior` has a
    ``log_prob`` valid for any value when the flows are invertible (the flows of
    this package are); :meth:`median` and :meth:`quantiles` are available;
    enumerated discrete sites are hidden from the guide automatically.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyro_nfvi.guides import AutoNormalizingFlow
        >>> from pyro_nfvi.helpers import planar_flow
        >>> def model(data):
        ...     loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(data)):
        ...         pyro.sample("obs", dist.Normal(loc, scale), obs=data)
        >>> data = torch.randn(50) + 3.0
        >>> pyro.clear_param_store()
        >>> guide = AutoNormalizingFlow(model, lambda dim: planar_flow(dim, 4))
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> for step in range(20):
        ...     loss = svi.step(data)
        >>> sorted(guide.median(data))
        ['loc', 'scale']
        >>> guide.quantiles([0.05, 0.5, 0.95], data)["loc"].shape
        torch.Size([3])

    Saving and loading: see :class:`~pyro_nfvi.guides.saving._GuideSaving`.

    Reference:

    [1] Danilo Jimenez Rezende, Shakir Mohamed (2015), "Variational Inference
        with Normalizing Flows", ICML. https://arxiv.org/abs/1505.05770

    [2] Alp Kucukelbir et al. (2017), "Automatic Differentiation Variational
        Inference", JMLR.

    [3] Priyank Jaini, Ivan Kobyzev, Yaoliang Yu, Marcus Brubaker (2020), "Tails of
        Lipschitz Triangular Flows", ICML. https://arxiv.org/abs/1907.04481

    :param callable model: a Pyro model with continuous latent sites.
    :param callable init_transform_fn: called with the latent dimension ``D``;
        returns a :class:`~torch.distributions.Transform` on ``real_vector``
        (e.g. a :class:`~pyro.distributions.TransformModule`; trainable
        parameters of an ``nn.Module`` are registered with Pyro) or a list of
        transforms that is composed in order.
    :param callable init_loc_fn: per-site initialisation of the location
        :math:`\mu`. See Pyro's ``pyro.infer.autoguide.initialization``. Default
        :func:`~pyro.infer.autoguide.initialization.init_to_median`.
    :param init_scale: initial (unconstrained-space) standard deviation of every latent
        coordinate, > 0; or ``None`` (default): per coordinate, from the curvature of the
        log joint at the initial point (a diagonal Laplace approximation; 0.1 where the
        log joint is not concave there; clamped to [1e-3, 1]), see
        :func:`~pyro_nfvi.guides.curvature.inspect_model`. A fixed 0.1 (AutoNormal's) left a Neal's-funnel guide
        at ELBO -0.84 after 1000 steps of the default schedule; from the curvature, -0.02.
        These scales are then halved (up to 6 times; ``initial_scale_halvings`` says how
        often) while a few draws of the initial guide land where the log joint collapses
        (:func:`~pyro_nfvi.guides.curvature.tame_initial_scale`: an exponential link fed a
        wide group scale times a placed site, as in stochastic volatility).
    :param full_rank: if ``True`` the affine layer is a lower-triangular
        (full covariance) matrix ``diag(scale) @ scale_tril`` initialised to
        ``init_scale * I``; if ``False`` it is diagonal. Default ``None``: full rank up to
        ``FULL_RANK_MAX_DIM`` (200) latent dimensions, where its D² parameters are cheap
        (on the posterior suite it matched or beat the diagonal base, most on correlated
        posteriors such as logistic regression), diagonal above.
    :param bool stl: sticking-the-landing gradients (Roeder, Wu & Duvenaud 2017, default
        ``True``): the guide's log-density of its own sample is differentiated only along
        the sample's path, dropping the score-function term whose expectation is zero and
        whose noise does not vanish at the optimum. The score :math:`\nabla_z \log q(z)`
        this needs is pushed forward through the layers by Sherman–Morrison / Woodbury
        (``push_score``, no inverse solve; transforms without it fall back to autograd
        through their inverses; a flow with a layer that has neither, such as Pyro's
        ``Planar``, gets a ``RuntimeWarning`` at setup and the ordinary gradient). Works with
        every ELBO of Pyro that scores the guide's
        sample with ``log_prob`` (``Trace_ELBO``, ``JitTrace_ELBO``, vectorised particles).
    :param centered: how hierarchical sites are parameterised. A *hierarchical* site is a
        Normal, LogNormal or MultivariateNormal site whose prior loc or scale depends on
        another latent site (found automatically, the sites that make funnels, e.g.
        ``theta ~ N(mu, tau)``, or an AR(1) latent series ``h ~ MVN(mu, L(phi, sigma))``).
        The flow draws a coordinate :math:`x` for it and the guide places the site at
        :math:`(1 - c)\,\mathrm{loc} + \mathrm{scale}^{1 - c} x` (a MultivariateNormal
        site at :math:`(1 - c)\,\mathrm{loc} + L_c x` with a partially non-centred
        Cholesky factor, see :func:`~pyro_nfvi.guides.placement.mvn_placement`), with loc and scale
        computed by the model's prior from the values placed before it (the partial
        non-centring of Gorinova, Moore & Hoffman 2020, applied inside the guide: the
        model is unchanged). ``None`` (default): ``c`` is learnable per coordinate,
        initialised at the shrinkage factor of the site (0: no data, a funnel becomes
        Gaussian; 1: data dominate); a float in [0, 1] fixes ``c``; ``1.0`` turns the
        feature off (the flow acts on the model's own coordinates, as Pyro's guides do).
        Every value works with :meth:`get_transform` and ``NeuTraReparam``.
    :param str base: the base distribution of :math:`\epsilon`. ``"normal"`` (default):
        :math:`\mathcal{N}(0, I_D)`. ``"studentt"``: independent Student-t coordinates
        :math:`\epsilon_j \sim t_{\nu_j}(0, 1)` with learnable degrees of freedom
        :math:`\nu_j > 1` (``base_df``, initialised at ``STUDENTT_INIT_DF`` = 10), the
        tail-adaptive base of Jaini et al. (2020): planar, radial and Sylvester layers are
        identity plus a bounded term, so they cannot make the tails of a normal base heavier,
        and a posterior with heavier tails (scale parameters in log space, horseshoe
        shrinkage, stochastic volatility) leaves a PSIS :math:`\hat k > 0.7`. The
        log-density stays exact, :math:`\log q` gains the t log-density in place of the
        normal one, sticking the landing pushes the t score
        :math:`-(\nu_j + 1)\epsilon_j/(\nu_j + \epsilon_j^2)`, and :math:`\nu` is trained
        through the reparameterised t draw. Opt-in: on the README's two-site example it
        lowers :math:`\hat k` at the same ELBO, but on the posterior suite (stochastic
        volatility, horseshoe, banana) it did not lower :math:`\hat k` below 0.7 and, from
        10 degrees of freedom, lost ELBO on two of them (``benchmarks/results/tails.md``).
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    """

    scale_constraint = constraints.softplus_positive
    scale_tril_constraint = constraints.unit_lower_cholesky
    #: degrees of freedom of the Student-t base: > 1, so that its mean exists
    df_constraint = constraints.greater_than(1.0)
    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    def __init__(
        self,
        model: Callable,
        init_transform_fn: Callable[[int], Union[Transform, Sequence[Transform]]],
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: Optional[float] = None,
        full_rank: Optional[bool] = None,
        stl: bool = True,
        centered: Optional[float] = None,
        base: str = "normal",
        create_plates: Optional[Callable] = None,
    ) -> None:
        _check_options(init_transform_fn, init_scale, centered, base, full_rank, stl)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._init_loc_fn = init_loc_fn  # to wrap a model re-attached after loading
        self._init_transform_fn = init_transform_fn
        self._init_scale = None if init_scale is None else float(init_scale)
        self._full_rank_option = None if full_rank is None else bool(full_rank)
        self.full_rank = self._full_rank_option  # resolved at setup when None
        self.stl = bool(stl)
        self.centered = None if centered is None else float(centered)
        self.base_kind = base
        self.create_plates = create_plates
        self.transform = None
        self._hierarchical: Dict[str, slice] = {}

    # ------------------------------------------------------------------ setup
    def _setup_prototype(self, *args, **kwargs) -> None:
        try:
            self._setup_prototype_impl(*args, **kwargs)
        except Exception:
            self.prototype_trace = None  # a later call retries from scratch
            raise

    def _setup_prototype_impl(self, *args, **kwargs) -> None:
        # AutoGuide's part only; the observed sites it hides are recorded, so that a later
        # call with one of them left unobserved (Predictive with y=None) is not mistaken
        # for a new latent site
        observed = set()

        def hide(msg, hide_fn=type(self)._prototype_hide_fn):
            if msg["type"] == "sample" and msg["is_observed"]:
                observed.add(msg["name"])
            return hide_fn(msg)

        self._prototype_hide_fn = hide
        try:
            autoguide_setup_prototype(self, *args, **kwargs)
        finally:
            del self._prototype_hide_fn  # back to the class's
        self._observed_at_setup = frozenset(observed)
        # parameters already in Pyro's param store (a checkpoint loaded before the first
        # call: pyro.get_param_store().load) are taken from there, as Pyro's guides do
        restored = self._pyro_context.active and self._pyro_get_fullname("scale") in pyro.get_param_store()
        self._unconstrained_shapes, self._cond_indep_stacks = latent_layout(
            self.prototype_trace, type(self).__name__)
        self.latent_dim = sum(_product(s) for s in self._unconstrained_shapes.values())
        loc = self._init_loc()
        self.loc = torch.nn.Parameter(loc)
        self.scale = PyroParam(
            torch.full_like(loc, self._init_scale or _DEFAULT_INIT_SCALE), self.scale_constraint
        )
        for name in ("loc", "scale"):  # values from the param store must fit this model
            if getattr(self, name).shape != loc.shape:
                raise ValueError(
                    f"Pyro's param store holds {self._pyro_get_fullname(name)!r} of shape "
                    f"{tuple(getattr(self, name).shape)}, from another guide of this name; this "
                    f"model needs shape {tuple(loc.shape)}: call pyro.clear_param_store() first"
                )
        self.full_rank = (
            self.latent_dim <= FULL_RANK_MAX_DIM
            if self._full_rank_option is None
            else self._full_rank_option
        )
        if self.full_rank:
            self.scale_tril = PyroParam(eye_like(loc, self.latent_dim), self.scale_tril_constraint)
        if getattr(self, "base_kind", "normal") == "studentt":
            self.base_df = PyroParam(torch.full_like(loc, STUDENTT_INIT_DF), self.df_constraint)
        self.transform = build_flow(self._init_transform_fn, self.latent_dim, loc)
        if self.stl:
            why = score_unavailable(elementary_parts([self.transform]), self.latent_dim, loc)
            if why is not None:
                warnings.warn(
                    f"{type(self).__name__}: sticking-the-landing gradients need the score "
                    f"∇ log q at the sample, through every layer, but {why}; the guide uses "
                    "the ordinary gradient (stl=False)", RuntimeWarning)
                self.stl = False
        if restored:
            take_stored_module_params(self, "transform", self.transform)
        self._setup_hierarchical(args, kwargs, keep_scale=restored)
        if self._hierarchical and not restored:
            self._start_at_init_values(args, kwargs)
        self._arg_shapes = _arg_shapes(args, kwargs)
        # the model's arguments for get_transform(), which places the hierarchical sites
        # by running the prior (not pickled: only the data of the first call); whether the
        # placement depends on them is checked here, outside any model run (under Pyro's
        # NeuTraReparam get_transform() is called from inside one)
        self._placement_args = (args, kwargs)
        if self._hierarchical:
            self._nfvi_placement_check = (self._placement_args,
                                          _arguments_in_placement(self, args, kwargs))
        if self._init_scale is None and not restored:  # curvature scales, set up above
            self.initial_scale_halvings = tame_initial_scale(
                self, split_init_messenger(self.model)[1], args, kwargs)

    def _setup_hierarchical(self, args, kwargs, keep_scale: bool = False) -> None:
        """Find the hierarchical sites and set the initial scales (unless ``keep_scale``:
        restored from the param store) and centredness (see
        :func:`~pyro_nfvi.guides.curvature.inspect_model`)."""
        like = dict(dtype=self.loc.dtype, device=self.loc.device)
        self._hierarchical, scale, centering = inspect_model(
            self.model, self.prototype_trace, self._unconstrained_shapes, self._init_scale,
            self.centered, like, args, kwargs)
        if scale is not None and not keep_scale:
            with torch.no_grad():
                self.scale = scale
        if centering is not None:
            self.centering = PyroParam(centering, constraints.unit_interval)

    def _start_at_init_values(self, args, kwargs) -> None:
        """``loc`` holds ``init_loc_fn``'s unconstrained values, but a hierarchical site is
        emitted at the placement of its coordinate: replace each such value by the
        coordinate that places at it (one run of the model's prior at the initial values),
        so that the guide starts at ``init_loc_fn``'s point."""
        layout = SiteLayout.of(self)
        with torch.no_grad(), fork_rng():
            us = {name: u.clone() for name, u in layout.split(self.loc).items()}
            unplacer = _UnplaceLatents(us, self._centerings(), layout.fns)
            _run_latents(unplacer, self.model, args, kwargs)
            xs = {name: unplacer.xs.get(name, u) for name, u in us.items()}
            self.loc.copy_(torch.cat([xs[name].reshape(-1) for name, *_ in layout.sites]))

    def _centerings(self) -> Dict[str, Optional[torch.Tensor]]:
        """The centredness of each hierarchical site, shaped like its unconstrained value
        (``None`` for fully non-centred). The learnable one is read once: each read of a
        Pyro parameter is a ``pyro.param`` statement."""
        if not self._hierarchical:
            return {}
        if self.centered == 0.0:
            return dict.fromkeys(self._hierarchical)
        if self.centered is not None:
            c = torch.tensor(self.centered, dtype=self.loc.dtype, device=self.loc.device)
            return dict.fromkeys(self._hierarchical, c)
        flat = self.centering
        return {name: flat[where].reshape(self._unconstrained_shapes[name])
                for name, where in self._hierarchical.items()}

    def _centering(self, name: str) -> Optional[torch.Tensor]:
        """The centredness of one hierarchical site (see :meth:`_centerings`)."""
        return self._centerings()[name]

    @property
    def hierarchical_sites(self) -> Dict[str, Optional[torch.Tensor]]:
        """The sites this guide places relative to their prior's loc and scale, with their
        current centredness (0: non-centred, 1: centred; ``None`` means 0). Empty before the
        first call."""
        with torch.no_grad():
            return self._centerings()

    def _check_setup(self, *args, **kwargs) -> None:
        if self.prototype_trace is None:
            with self._pyro_context:  # as in a call: the param store's values are used
                self._setup_prototype(*args, **kwargs)

    def _check_args(self, args, kwargs) -> None:
        """If the shapes of the model's arguments changed since setup, re-run the model to
        check that the latent sites kept their shapes."""
        shapes = _arg_shapes(args, kwargs)
        if shapes != self._arg_shapes:
            check_latent_shapes(self.model, self._prototype_hide_fn, self.prototype_trace,
                                type(self).__name__, args, kwargs,
                                getattr(self, "_observed_at_setup", frozenset()))
            self._arg_shapes = shapes

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Draw the latent sites (a dict of constrained values), as every Pyro autoguide."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._check_args(args, kwargs)
        latent = self.sample_latent(*args, **kwargs)  # z ~ q: get_posterior().rsample()
        return self._emit_sites(latent, args, kwargs)

    def _emit_sites(self, latent: torch.Tensor, args, kwargs) -> Dict[str, torch.Tensor]:
        """Split the packed latent ``z`` per site, place the sites and emit each as a
        ``Delta`` inside its plates."""
        plates = self._create_plates(*args, **kwargs)
        layout = SiteLayout.of(self)  # the per-site views of z, computed once
        xs = layout.split(latent)
        # the centredness is read here, outside the blocked model run, so that its
        # pyro.param statement reaches SVI's parameter capture
        centering = self._centerings()
        fns = layout.fns
        placed = place_latents(self.model, xs, centering, fns, args, kwargs)
        result = {}
        for name, fn in fns.items():
            value, log_density = placed[name]
            delta = _JacobianDelta(value, log_density=log_density, event_dim=fn.event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        return result

    # ---------------------------------------------------------- distributions
    def get_base_dist(self) -> dist.TorchDistribution:
        """The base distribution (event dim 1): :math:`\\mathcal{N}(0, I_D)`, or with
        ``base="studentt"`` independent Student-t coordinates
        :math:`t_{\\nu_j}(0, 1)` with the learnable degrees of freedom ``base_df``."""
        if getattr(self, "base_kind", "normal") == "studentt":
            df = self.base_df
            return dist.StudentT(df, torch.zeros_like(df), torch.ones_like(df)).to_event(1)
        # the raw parameter: only its shape, dtype and device are read (self.loc would
        # issue a pyro.param statement, and _affine reads it anyway)
        loc = self._parameters.get("loc")
        loc = self.loc if loc is None else loc
        key = (loc.shape, loc.dtype, loc.device)
        cached = getattr(self, "_base_dist_cache", None)
        if cached is None or cached[0] != key:  # built once: it has no parameters
            zeros = torch.zeros(loc.shape, dtype=loc.dtype, device=loc.device)
            cached = (key, dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            self._base_dist_cache = cached
        return cached[1]

    def _flow(self) -> Transform:
        """The flow; read past PyroModule's ``pyro.module`` registration when all its
        parameters are frozen (that registration would only warn, once per parameter)."""
        module = self._modules.get("transform")
        if module is not None and not any(p.requires_grad for p in module.parameters()):
            return module
        return self.transform

    def _affine(self) -> Transform:
        if self.full_rank:
            return ScaledUnitLowerAffine(self.loc, self.scale, self.scale_tril)
        return dist.transforms.AffineTransform(self.loc, self.scale, event_dim=1)

    def get_transform(self, *args, **kwargs) -> Transform:
        """
        The bijection from the base noise :math:`\\epsilon` to the packed unconstrained
        latent vector, with its exact log-determinant; what
        :class:`~pyro.infer.reparam.NeuTraReparam` runs NUTS through.

        Without hierarchical sites: ``ComposeTransform([flow, affine])``. With them (the
        default ``centered=None``): a :class:`~pyro_nfvi.guides.neutra.PlacedFlowTransform`,
        flow, affine, then the placement of the hierarchical sites, which runs the model's
        prior with ``args``, ``kwargs`` if given, else with the arguments of the guide's
        first call (the data it was fitted to). A ``ValueError`` names the way out where
        the placement depends on those arguments
        (:class:`~pyro_nfvi.guides.NeuTraReparam`, which passes them).

        Example (Pyro's NeuTra recipe, unchanged)::

            >>> import torch, pyro, pyro.distributions as dist
            >>> from pyro.infer import MCMC, NUTS
            >>> from pyro.infer.reparam import NeuTraReparam
            >>> from pyro_nfvi.guides import AutoPlanarFlow
            >>> def funnel():
            ...     y = pyro.sample("y", dist.Normal(0.0, 3.0))
            ...     pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)).expand([2]).to_event(1))
            >>> guide = AutoPlanarFlow(funnel, num_flows=2)
            >>> guide()  # doctest: +ELLIPSIS
            {...}
            >>> neutra = NeuTraReparam(guide.requires_grad_(False))
            >>> mcmc = MCMC(NUTS(neutra.reparam(funnel)), num_samples=5, warmup_steps=5,
            ...             disable_progbar=True)
            >>> mcmc.run()
            >>> draws = neutra.transform_sample(mcmc.get_samples()["y_shared_latent"])
            >>> draws["x"].shape
            torch.Size([5, 2])
        """
        self._check_setup(*args, **kwargs)
        parts = [self._flow(), self._affine()]
        if not self._hierarchical:
            return ComposeTransform(parts)
        args, kwargs = placement_arguments(self, args, kwargs)
        return PlacedFlowTransform(self, parts, args, kwargs)

    def get_posterior(self, *args, **kwargs) -> dist.TransformedDistribution:
        """
        The variational distribution over the packed unconstrained latent vector,
        a :class:`~pyro.distributions.TransformedDistribution` of
        :meth:`get_base_dist` by ``[flow, affine]``. ``log_prob`` works on any
        value provided the flow implements its inverse.
        """
        self._check_setup(*args, **kwargs)
        transforms = [self._flow(), self._affine()]
        base = self.get_base_dist()
        standard = getattr(self, "base_kind", "normal") == "normal"
        cached = getattr(self, "_posterior_template", None)
        if cached is None or cached._standard_base != standard or (
                standard and cached.base_dist is not base):
            cached = _FlowPosterior(base, transforms)
            cached._standard_base = standard
            cached.transforms = []  # holds no parameters: each call supplies its own
            if not standard:  # nor the base: its degrees of freedom are parameters
                cached.base_dist = None
            self._posterior_template = cached
        cached._stl = self.stl
        return cached.with_transforms(transforms, None if standard else base)
