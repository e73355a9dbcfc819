"""Normalizing-flow autoguides for Pyro.

:class:`AutoNormalizingFlow` is a drop-in superset of
:class:`pyro.infer.autoguide.AutoNormalizingFlow`; :class:`AutoPlanarFlow` and
:class:`AutoRadialFlow` are shortcuts that stack planar / radial flows
(Rezende & Mohamed 2015).
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from contextlib import ExitStack
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, Transform
from torch.distributions.utils import _standard_normal

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import ComposeTransformModule, LowerCholeskyAffine
from pyro.distributions.util import eye_like, sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.autoguide.utils import _product, helpful_support_errors
from pyro.nn.module import PyroParam
from pyro.poutine.messenger import Messenger

from ._compat import autoguide_setup_prototype
from ._validation import check_int
from .helpers import planar_flow, radial_flow
from .transforms._base import LadjCacheMixin

__all__ = ["AutoNormalizingFlow", "AutoPlanarFlow", "AutoRadialFlow"]


def _flatten_transform(t: Transform):
    """Yield the elementary parts of a (possibly nested) composed transform."""
    if isinstance(t, ComposeTransform):
        for part in t.parts:
            yield from _flatten_transform(part)
    else:
        yield t


class _FlowPosterior(dist.TransformedDistribution):
    """
    A :class:`~pyro.distributions.TransformedDistribution` that remembers the
    log-density of its most recent sample.

    ``log_prob`` of the value returned by the last ``rsample``/``sample`` call is
    computed in the forward pass (``log q(z) = log p(eps) - sum log|det J|``), so
    no inverse is needed during training (fast, exact, and safe under the JIT).
    ``log_prob`` of any other value goes through the transforms' inverses.

    With ``_standard_base = True`` (set where the base is N(0, I)), ``rsample`` draws the
    base noise and its log-density directly: the same draws, fewer ops.
    """

    _standard_base = False
    #: sticking-the-landing: score the sample with stopped parameters (set by the guide)
    _stl = False

    def with_transforms(self, transforms) -> "_FlowPosterior":
        """A copy with new transforms of the same shapes: skips the shape checks of
        ``__init__`` (a guide calls this every step; only the parameters change)."""
        new = copy.copy(self)
        new.transforms = transforms
        new.__dict__.pop("_nfvi_last", None)
        return new

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_FlowPosterior, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._standard_base, new._stl = self._standard_base, self._stl
        return new

    def rsample(self, sample_shape=torch.Size()):
        base = self.base_dist
        if self._standard_base:
            shape = torch.Size(sample_shape) + base.batch_shape + base.event_shape
            mean = base.mean
            x = _standard_normal(shape, dtype=mean.dtype, device=mean.device)
            log_q = -0.5 * (x * x).sum(-1) - _HALF_LOG_2PI * x.shape[-1]
        else:
            x = base.rsample(sample_shape)
            log_q = base.log_prob(x)
        eps = x
        event_dim = len(self.event_shape)
        for outer in self.transforms:
            for t in _flatten_transform(outer):
                if isinstance(t, LadjCacheMixin):  # this package's flows: one pass
                    y, ladj = t.call_and_ladj(x)
                else:
                    y = t(x)
                    ladj = t.log_abs_det_jacobian(x, y)
                log_q = log_q - sum_rightmost(ladj, event_dim - t.codomain.event_dim)
                x = y
        if self._stl and self._standard_base and x.requires_grad and torch.is_grad_enabled():
            log_q = _stl_surrogate(self, eps, x, log_q)
        self._nfvi_last = (x, log_q)
        return x

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            x = self.rsample(sample_shape)
        return x

    def log_prob(self, value):
        last = getattr(self, "_nfvi_last", None)
        if last is not None and value is last[0]:
            return last[1]
        return super().log_prob(value)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@torch.no_grad()
def _push_score(t: Transform, x: torch.Tensor, score: torch.Tensor):
    """``(t(x), ∇ log density)`` pushed through one elementary transform without an
    inverse solve, or ``None`` where the transform does not say how."""
    if hasattr(t, "push_score"):  # this package's flows
        return t.push_score(x, score)
    if isinstance(t, dist.transforms.AffineTransform) and t.event_dim == 1:
        return t(x), score / t.scale
    if isinstance(t, LowerCholeskyAffine):
        tril = t.scale_tril
        s = torch.linalg.solve_triangular(tril.mT, score.unsqueeze(-1), upper=True)
        return t(x), s.squeeze(-1)
    return None


def _stl_surrogate(posterior, eps, z, log_q):
    r"""``log q(z)`` with the gradient of sticking the landing (Roeder, Wu & Duvenaud
    2017): the value is unchanged, but its gradient is only the path term
    :math:`\nabla_z \log q_{\bar\phi}(z) \cdot \partial z / \partial\phi` — the
    score-function term, whose expectation is zero, is dropped. The score
    :math:`\nabla_z \log q(z)` at the sample is pushed forward from the base noise layer by
    layer (``push_score``: Sherman–Morrison for planar/radial, no inverse solve); for
    transforms without it, it is computed by autograd through their inverses."""
    x, score = eps.detach(), -eps.detach()  # ∇ log N(ε; 0, I) = -ε
    for outer in posterior.transforms:
        for t in _flatten_transform(outer):
            pushed = _push_score(t, x, score)
            if pushed is None:
                score = None
                break
            x, score = pushed
        if score is None:
            break
    if score is None:
        z_ = z.detach().requires_grad_()
        with torch.enable_grad():
            lp = dist.TransformedDistribution.log_prob(posterior, z_)
            (score,) = torch.autograd.grad(lp.sum(), z_)
    return log_q.detach() + (score * (z - z.detach())).sum(-1)


def _loc_scale(fn):
    """``(loc, scale)`` of a Normal or LogNormal site behind Pyro's Independent /
    Expanded / Masked wrappers (for a LogNormal: of the Normal of its log), else ``None``."""
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution,
                          dist.MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, (torch.distributions.Normal, torch.distributions.LogNormal)):
        return fn.loc, fn.scale
    return None


class _LatentsOnly(Exception):
    """Raised by the messengers below once every latent site has been seen, so that the
    rest of the model (typically its likelihood) is not run."""


class _PlaceLatents(Messenger):
    """Runs the model with the guide's unconstrained draws ``x`` and turns them into site
    values: a hierarchical site gets ``(1 - c) loc + scale^(1 - c) x`` (partial
    non-centring with centredness ``c``, Gorinova, Moore & Hoffman 2020) from the loc and
    scale its prior has given the values placed before it; every other site gets ``x``.
    Then the site's support bijection. Records ``(value, log|d x / d value|)`` per site."""

    def __init__(self, guide: "AutoNormalizingFlow", xs: Dict[str, torch.Tensor],
                 centering: Dict[str, Optional[torch.Tensor]]) -> None:
        super().__init__()
        self.guide, self.xs, self.centering = guide, xs, centering
        self.placed: Dict[str, tuple] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.xs:
            return
        guide, x = self.guide, self.xs[name]
        fn = guide.prototype_trace.nodes[name]["fn"]
        event_dim = fn.event_dim
        transform = biject_to(fn.support)
        log_jac = None
        if name in guide._hierarchical:
            loc, scale = _loc_scale(msg["fn"])
            c = self.centering[name]
            if c is None:
                unconstrained = loc + scale * x
                log_jac = torch.log(scale)
            else:
                unconstrained = (1 - c) * loc + scale.pow(1 - c) * x
                log_jac = (1 - c) * torch.log(scale)
            log_jac = log_jac.expand(unconstrained.shape)
        else:
            unconstrained = x
        value = transform(unconstrained)
        if poutine.get_mask() is False:
            log_density = 0.0
        else:
            log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
            log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + event_dim)
            if log_jac is not None:  # Normal/LogNormal: value and x have the same shape
                log_density = log_density - sum_rightmost(log_jac, event_dim)
        self.placed[name] = (value, log_density)
        msg["value"] = value
        msg["is_observed"] = True
        if len(self.placed) == len(self.xs):
            raise _LatentsOnly


def _run_latents(messenger: Messenger, model: Callable, args, kwargs) -> None:
    """Run ``model`` under ``messenger`` (blocked from outer handlers) up to its last
    latent site."""
    try:
        poutine.block(messenger(model))(*args, **kwargs)
    except _LatentsOnly:
        pass


#: largest latent dimension for which the default affine base is full rank
FULL_RANK_MAX_DIM = 200

#: initial scale where the curvature says nothing (AutoNormal's default)
_DEFAULT_INIT_SCALE = 0.1
#: the automatic initial scales are clamped to this range: at the prototype (a prior
#: median) a weakly identified coordinate under a wide prior has a tiny curvature, and
#: starting wider than unit scale wrecked the stochastic-volatility model of the suite
#: (ELBO -81 ± 3 with a cap of 10, -71.8 with 1; the funnel is as good with 1)
_INIT_SCALE_BOUNDS = (1e-3, 1.0)

#: bounds of the initial centredness: strictly inside (0, 1), so the ELBO can move it
_CENTERING_BOUNDS = (0.02, 0.98)
#: above this many coordinates the curvature of a site is estimated from one
#: Hessian-vector product (row sums) instead of one per coordinate
_EXACT_CURVATURE_MAX = 32


class _Unconstrained(Messenger):
    """Runs the model with every latent site set from a leaf tensor in unconstrained space
    (at the prototype values), recording the leaves, each Normal/LogNormal site's prior
    scale, and (``found``) the hierarchical ones: those whose loc or scale is a function of
    an earlier latent site."""

    def __init__(self, values: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values
        self.leaves: Dict[str, torch.Tensor] = {}
        self.scales: Dict[str, torch.Tensor] = {}
        self.found: list = []

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.values:
            return
        transform = biject_to(msg["fn"].support)
        leaf = transform.inv(self.values[name]).detach().clone().requires_grad_()
        params = _loc_scale(msg["fn"])
        if params is not None:
            self.scales[name] = torch.as_tensor(params[1]).detach()
            outs = [p for p in params if torch.is_tensor(p) and p.requires_grad]
            if outs and self.leaves:
                grads = torch.autograd.grad([o.sum() for o in outs], list(self.leaves.values()),
                                            allow_unused=True, retain_graph=True)
                if any(g is not None for g in grads):
                    self.found.append(name)
        self.leaves[name] = leaf
        msg["value"] = transform(leaf)
        msg["is_observed"] = True


def _log_joint_curvature(model: Callable, values: Dict[str, torch.Tensor], args, kwargs):
    """``(found, diag, scales)``: the hierarchical sites (see :class:`_Unconstrained`), the
    diagonal of the Hessian of the model's log joint in
    unconstrained coordinates at the prototype values (site → tensor shaped like the site's
    unconstrained value; exact per coordinate for up to ``_EXACT_CURVATURE_MAX``
    coordinates in all, else row sums within each site), and the prior scales of the
    Normal / LogNormal sites. ``diag`` is ``None`` where the model is not twice
    differentiable there."""
    probe = _Unconstrained(values)
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        trace = poutine.block(poutine.trace(probe(model)).get_trace)(*args, **kwargs)
        log_joint = trace.log_prob_sum()
        names = list(probe.leaves)
        leaves = [probe.leaves[n] for n in names]
        grads = torch.autograd.grad(log_joint, leaves, create_graph=True, allow_unused=True)
        exact = sum(leaf.numel() for leaf in leaves) <= _EXACT_CURVATURE_MAX
        diag: Dict[str, Optional[torch.Tensor]] = {}
        for name, leaf, grad in zip(names, leaves, grads):
            if grad is None or not grad.requires_grad:  # linear or absent: no curvature
                diag[name] = torch.zeros_like(leaf)
                continue
            flat = grad.reshape(-1)
            if exact:
                rows = [torch.autograd.grad(flat[j], leaf, retain_graph=True, allow_unused=True)[0]
                        for j in range(flat.numel())]
                if any(r is None for r in rows):
                    diag[name] = None
                    continue
                d = torch.stack([r.reshape(-1)[j] for j, r in enumerate(rows)])
            else:
                (r,) = torch.autograd.grad(flat.sum(), leaf, retain_graph=True, allow_unused=True)
                d = None if r is None else r.reshape(-1)
            diag[name] = None if d is None else d.detach().reshape(leaf.shape)
    return probe.found, diag, probe.scales


def _arg_shapes(args, kwargs) -> tuple:
    """What of the model's arguments can change the latent shapes: tensor shapes and ints."""
    def key(a):
        if torch.is_tensor(a):
            return tuple(a.shape)
        if isinstance(a, int) and not isinstance(a, bool):
            return a
        return None
    return tuple(map(key, args)), tuple(sorted((k, key(v)) for k, v in kwargs.items()))


def _hide_from_prototype(msg) -> bool:
    # Like Pyro's prototype_hide_fn, but also hide discrete sites that the user
    # has configured for enumeration: TraceEnum_ELBO marginalises them out.
    if prototype_hide_fn(msg):
        return True
    if msg["type"] == "sample" and msg["infer"].get("enumerate"):
        support = getattr(msg["fn"], "support", None)
        return bool(getattr(support, "is_discrete", False))
    return False


class AutoNormalizingFlow(AutoContinuous):
    r"""
    Normalizing-flow guide over the whole (unconstrained) latent space.

    All latent sites of ``model`` are mapped to unconstrained space with
    :func:`~torch.distributions.biject_to` and concatenated into one vector
    :math:`z \in \mathbb{R}^D` (as in every :class:`AutoContinuous` guide). The
    variational family is

    .. math::

        \epsilon \sim \mathcal{N}(0, I_D), \qquad
        z = \mu + L\, f_K \circ \dots \circ f_1(\epsilon),

    where :math:`f_k` are the flow layers returned by ``init_transform_fn(D)``,
    :math:`\mu` is a learnable location and :math:`L` is a learnable positive
    diagonal scale (``full_rank=False``) or a lower-triangular Cholesky factor
    ``diag(scale) @ scale_tril`` with unit diagonal ``scale_tril``
    (``full_rank=True``, as :class:`~pyro.infer.autoguide.AutoMultivariateNormal`).
    The density is obtained by the change of variables formula

    .. math::

        \log q(z) = \log \mathcal{N}(\epsilon; 0, I)
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

    Saving and loading: like all Pyro autoguides, parameters are created lazily
    on the first call, so run the guide once (with the model's arguments)
    before :meth:`load_state_dict`::

        guide = AutoNormalizingFlow(model, init_transform_fn)
        guide(data)                    # creates the parameters
        guide.load_state_dict(state)   # now the keys match

    For a model without arguments :meth:`load_state_dict` does this setup itself.

    Reference:

    [1] Danilo Jimenez Rezende, Shakir Mohamed (2015), "Variational Inference
        with Normalizing Flows", ICML. https://arxiv.org/abs/1505.05770

    [2] Alp Kucukelbir et al. (2017), "Automatic Differentiation Variational
        Inference", JMLR.

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
        :meth:`_init_from_curvature`. A fixed 0.1 (AutoNormal's) left a Neal's-funnel guide
        at ELBO -0.84 after 1000 steps of the default schedule; from the curvature, -0.02.
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
        through their inverses). Works with every ELBO of Pyro that scores the guide's
        sample with ``log_prob`` (``Trace_ELBO``, ``JitTrace_ELBO``, vectorised particles).
    :param centered: how hierarchical sites are parameterised. A *hierarchical* site is a
        Normal or LogNormal site whose prior loc or scale depends on another latent site
        (found automatically, the sites that make funnels, e.g. ``theta ~ N(mu, tau)``).
        The flow draws a coordinate :math:`x` for it and the guide places the site at
        :math:`(1 - c)\,\mathrm{loc} + \mathrm{scale}^{1 - c} x`, with loc and scale
        computed by the model's prior from the values placed before it (the partial
        non-centring of Gorinova, Moore & Hoffman 2020, applied inside the guide: the
        model is unchanged). ``None`` (default): ``c`` is learnable per coordinate,
        initialised at the shrinkage factor of the site (0: no data, a funnel becomes
        Gaussian; 1: data dominate); a float in [0, 1] fixes ``c``; ``1.0`` turns the
        feature off (the flow acts on the model's own coordinates, as Pyro's guides do,
        which :meth:`get_transform` and ``NeuTraReparam`` need).
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    """

    scale_constraint = constraints.softplus_positive
    scale_tril_constraint = constraints.unit_lower_cholesky

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
        create_plates: Optional[Callable] = None,
    ) -> None:
        if centered is not None and (
            isinstance(centered, bool)
            or not isinstance(centered, numbers.Real)
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
            isinstance(init_scale, bool)
            or not isinstance(init_scale, numbers.Real)
            or not init_scale > 0
            or init_scale == float("inf")
        ):
            raise ValueError(f"Expected init_scale > 0 (finite) or None, but got {init_scale!r}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._init_transform_fn = init_transform_fn
        self._init_scale = None if init_scale is None else float(init_scale)
        self._full_rank_option = None if full_rank is None else bool(full_rank)
        self.full_rank = self._full_rank_option  # resolved at setup when None
        self.stl = bool(stl)
        self.centered = None if centered is None else float(centered)
        self.create_plates = create_plates
        self.transform = None
        self._hierarchical: Dict[str, slice] = {}

    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    # ------------------------------------------------------------------ setup
    def _setup_prototype(self, *args, **kwargs) -> None:
        try:
            self._setup_prototype_impl(*args, **kwargs)
        except Exception:
            self.prototype_trace = None  # a later call retries from scratch
            raise

    def _setup_prototype_impl(self, *args, **kwargs) -> None:
        autoguide_setup_prototype(self, *args, **kwargs)  # AutoGuide's part only
        self._unconstrained_shapes = {}
        self._cond_indep_stacks = {}
        name = type(self).__name__
        for site_name, site in self.prototype_trace.iter_stochastic_nodes():
            support = site["fn"].support
            if support.is_discrete:
                raise ValueError(
                    f"{name} cannot handle the discrete latent site '{site_name}' "
                    f"({type(site['fn']).__name__}). Enumerate it "
                    f"(pyro.sample(..., infer={{'enumerate': 'parallel'}}) with "
                    f"TraceEnum_ELBO) or marginalise it out of the model."
                )
            with helpful_support_errors(site):
                self._unconstrained_shapes[site_name] = biject_to(support).inv(
                    site["value"]
                ).shape
            self._cond_indep_stacks[site_name] = site["cond_indep_stack"]
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.size < frame.full_size:
                    raise ValueError(
                        f"{name} cannot learn the local latent site '{site_name}' of the "
                        f"subsampled plate '{frame.name}' (size {frame.size} of "
                        f"{frame.full_size}): it would learn one posterior per subsample "
                        "slot, not per data row. Use pyro_nfvi.amortized.AutoAmortizedFlow "
                        "(an amortized flow for the plate's local latents), or do not "
                        "subsample that plate."
                    )
        if not self._unconstrained_shapes:
            raise ValueError(
                f"{name} found no latent variables in the model (all sample sites "
                "are observed); use an empty guide instead, e.g. `lambda *a, **k: None`."
            )
        self.latent_dim = sum(_product(s) for s in self._unconstrained_shapes.values())

        loc = self._init_loc()
        self.loc = torch.nn.Parameter(loc)
        self.scale = PyroParam(
            torch.full_like(loc, self._init_scale or _DEFAULT_INIT_SCALE), self.scale_constraint
        )
        self.full_rank = (
            self.latent_dim <= FULL_RANK_MAX_DIM
            if self._full_rank_option is None
            else self._full_rank_option
        )
        if self.full_rank:
            self.scale_tril = PyroParam(
                eye_like(loc, self.latent_dim), self.scale_tril_constraint
            )

        transform = self._init_transform_fn(self.latent_dim)
        if isinstance(transform, (list, tuple)):
            transform = ComposeTransformModule(list(transform))
        if not isinstance(transform, Transform):
            raise TypeError(
                "init_transform_fn must return a torch.distributions.Transform "
                f"(or a list of them), but returned {type(transform).__name__}"
            )
        if isinstance(transform, torch.nn.Module):
            transform = transform.to(device=loc.device, dtype=loc.dtype)
        self.transform = transform
        self._setup_hierarchical(args, kwargs)
        self._arg_shapes = _arg_shapes(args, kwargs)

    def _setup_hierarchical(self, args, kwargs) -> None:
        """Find the Normal/LogNormal sites whose prior loc or scale depends on another latent
        site (the centred hierarchical sites that make funnels) and give each a learnable
        centredness (``centered=None``); with ``init_scale=None`` set every coordinate's
        initial scale from the curvature of the log joint (see :meth:`_init_from_curvature`)."""
        self._hierarchical = {}
        if self.centered == 1.0 and self._init_scale is not None:
            return  # nothing to find or to initialise from the model
        values = {name: site["value"] for name, site in self.prototype_trace.iter_stochastic_nodes()}
        found, diag, prior_scales = _log_joint_curvature(self.model, values, args, kwargs)
        pos = 0
        for name in found if self.centered != 1.0 else []:
            size = _product(self._unconstrained_shapes[name])
            self._hierarchical[name] = slice(pos, pos + size)
            pos += size
        self._init_from_curvature(diag, prior_scales)

    def _init_from_curvature(self, diag, prior_scales) -> None:
        r"""Initial centredness and scales from the diagonal curvature ``-H`` of the log
        joint at the prototype (a diagonal Laplace approximation, Gaussian-exact):

        * an ordinary coordinate gets scale :math:`1/\sqrt{-H_{jj}}` (``init_scale`` where
          the log joint is not concave there);
        * a hierarchical coordinate with prior scale :math:`\tau` has data information
          :math:`I = -H_{jj} - 1/\tau^2`, shrinkage :math:`\kappa = \tau^2 I/(1 + \tau^2 I)`
          (for :math:`\theta \sim N(\mu, \tau)` seen with noise :math:`s`, :math:`I = 1/s^2`
          and :math:`c = \kappa` makes the coordinate's posterior scale independent of
          :math:`\tau` to first order, Gorinova, Moore & Hoffman 2020, §3), initial
          centredness :math:`c = \kappa^2` in [0.02, 0.98] (squared: the prototype's scale,
          a prior median, usually overstates the posterior's group scale when the data are
          weak, and a centred funnel costs more than a non-centred site with strong data;
          on the posterior suite κ² matched fixed non-centring on eight schools and kept
          data-rich groups centred), and scale :math:`\tau^c/\sqrt{1 + \tau^2 I}`, the
          conditional posterior scale of its coordinate.
        """
        lo, hi = _CENTERING_BOUNDS
        fallback = _DEFAULT_INIT_SCALE if self._init_scale is None else self._init_scale
        scales, centering = [], []
        for name in self._unconstrained_shapes:
            shape = self._unconstrained_shapes[name]
            d = diag.get(name)
            neg = None if d is None else (-d).reshape(shape)
            if name in self._hierarchical:
                tau2 = prior_scales[name].expand(shape) ** 2
                info = torch.zeros(shape) if neg is None else (neg - 1 / tau2).clamp_min(0)
                kappa = tau2 * info / (1 + tau2 * info)
                c = (kappa * kappa).clamp(lo, hi) if self.centered is None else torch.full(
                    shape, self.centered)
                centering.append(c.reshape(-1))
                scale = tau2.sqrt() ** c / (1 + tau2 * info).sqrt()
            elif neg is None:
                scale = torch.full(shape, fallback)
            else:
                scale = torch.where(neg > 0, neg.clamp_min(1e-12).rsqrt(), torch.full(shape, fallback))
            scales.append(scale.reshape(-1))
        like = dict(dtype=self.loc.dtype, device=self.loc.device)
        if self._init_scale is None:
            scale = torch.cat(scales).to(**like).clamp(_INIT_SCALE_BOUNDS[0], _INIT_SCALE_BOUNDS[1])
            with torch.no_grad():
                self.scale = torch.where(torch.isfinite(scale), scale, torch.full_like(scale, fallback))
        if self._hierarchical and self.centered is None:
            self.centering = PyroParam(torch.cat(centering).to(**like), constraints.unit_interval)

    def _centering(self, name: str) -> Optional[torch.Tensor]:
        """The centredness of a hierarchical site, shaped like its unconstrained value
        (``None`` for fully non-centred)."""
        if self.centered == 0.0:
            return None
        if self.centered is not None:
            return torch.tensor(self.centered, dtype=self.loc.dtype, device=self.loc.device)
        return self.centering[self._hierarchical[name]].reshape(self._unconstrained_shapes[name])

    @property
    def hierarchical_sites(self) -> Dict[str, Optional[torch.Tensor]]:
        """The sites this guide places relative to their prior's loc and scale, with their
        current centredness (0: non-centred, 1: centred; ``None`` means 0). Empty before the
        first call."""
        with torch.no_grad():
            return {name: self._centering(name) for name in self._hierarchical}

    def _check_args(self, args, kwargs) -> None:
        """Called guide-side: if the shapes of the model's arguments changed since setup,
        re-run the model to check that the latent sites kept their shapes."""
        shapes = _arg_shapes(args, kwargs)
        if shapes == self._arg_shapes:
            return
        model = poutine.block(self.model, self._prototype_hide_fn)
        with torch.random.fork_rng(devices=[]):  # leave the user's random stream alone
            trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        for name, site in trace.iter_stochastic_nodes():
            old = self.prototype_trace.nodes.get(name)
            if old is None or old["value"].shape != site["value"].shape:
                before = None if old is None else tuple(old["value"].shape)
                raise ValueError(
                    f"{type(self).__name__} was set up for the latent site '{name}' with "
                    f"shape {before}, but the model now gives it shape "
                    f"{tuple(site['value'].shape)}: create a new guide for the new data "
                    "(or use pyro_nfvi.amortized.AutoAmortizedFlow for per-datum latents)."
                )
        self._arg_shapes = shapes

    def _check_setup(self, *args, **kwargs) -> None:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)

    def forward(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Draw the latent sites (a dict of constrained values), as every Pyro autoguide."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        else:
            self._check_args(args, kwargs)
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        xs = {site["name"]: x for site, x in self._unpack_latent(latent)}
        if self._hierarchical:
            # read the centredness here, outside the blocked model run, so that its
            # pyro.param statement reaches SVI's parameter capture
            centering = {name: self._centering(name) for name in self._hierarchical}
            placer = _PlaceLatents(self, xs, centering)
            _run_latents(placer, self.model, args, kwargs)
            placed = placer.placed
        else:
            placed = {}
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if name in placed:
                value, log_density = placed[name]
            else:
                transform = biject_to(site["fn"].support)
                value = transform(xs[name])
                if poutine.get_mask() is False:
                    log_density = 0.0
                else:
                    log_density = transform.inv.log_abs_det_jacobian(value, xs[name])
                    log_density = sum_rightmost(
                        log_density, log_density.dim() - value.dim() + site["fn"].event_dim
                    )
            delta = dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        return result

    # -------------------------------------------------------- distributions
    def get_base_dist(self) -> dist.TorchDistribution:
        """The base distribution :math:`\\mathcal{N}(0, I_D)` (event dim 1)."""
        loc = self.loc
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
            return LowerCholeskyAffine(
                self.loc, scale_tril=self.scale[..., None] * self.scale_tril
            )
        return dist.transforms.AffineTransform(self.loc, self.scale, event_dim=1)

    def get_transform(self, *args, **kwargs) -> Transform:
        """
        The bijection from the base noise :math:`\\epsilon` to the
        unconstrained latent :math:`z`: ``ComposeTransform([flow, affine])``.
        Used e.g. by :class:`~pyro.infer.reparam.NeuTraReparam`.
        """
        self._check_setup(*args, **kwargs)
        if self._hierarchical:
            raise NotImplementedError(
                f"{type(self).__name__}.get_transform(): the sites "
                f"{sorted(self._hierarchical)} are placed relative to their prior's loc and "
                "scale, which is not one fixed transform of the latent vector. Construct "
                "the guide with centered=1.0 to use it with NeuTraReparam."
            )
        return ComposeTransform([self._flow(), self._affine()])

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
        cached = getattr(self, "_posterior_template", None)
        if cached is None or cached.base_dist is not base:
            cached = _FlowPosterior(base, transforms)
            cached._standard_base = True
            cached.transforms = []  # holds no parameters: each call supplies its own
            self._posterior_template = cached
        cached._stl = self.stl
        return cached.with_transforms(transforms)

    # ------------------------------------------------------ summaries
    @torch.no_grad()
    def _constrained_samples(self, num_samples: int, args, kwargs) -> Dict[str, torch.Tensor]:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
        self._check_setup(*args, **kwargs)
        # one vectorised draw of the whole guide, in a sample plate left of the model's
        nesting = max([-f.dim for f in self._prototype_frames.values()], default=0)
        with poutine.block(), pyro.plate("_nfvi_draws", num_samples, dim=-nesting - 1):
            values = self(*args, **kwargs)
        return {
            name: value.reshape((num_samples,) + self.prototype_trace.nodes[name]["value"].shape)
            for name, value in values.items()
        }

    @torch.no_grad()
    def quantiles(
        self, quantiles: Union[Sequence[float], torch.Tensor], *args, num_samples: int = 1000, **kwargs
    ) -> Dict[str, torch.Tensor]:
        """
        Marginal posterior quantiles of each latent site, in constrained space.

        There is no closed form for a flow, so this is a Monte-Carlo estimate
        from ``num_samples`` draws of the guide (default 1000; the standard error
        of a quantile scales like ``1/sqrt(num_samples)``). Draws are mapped to
        constrained space per site and quantiles are taken per coordinate. For
        sites whose support transform is elementwise and monotone (real,
        positive, interval, ...) this equals mapping unconstrained quantiles;
        for non-elementwise supports (e.g. a simplex) these are per-coordinate
        marginal quantiles, so e.g. the medians of a simplex site need not sum
        to one. The estimate uses the global torch RNG (seed it for
        reproducibility).

        :param quantiles: quantile levels in [0, 1], e.g. ``[0.05, 0.5, 0.95]``.
        :param int num_samples: number of Monte-Carlo draws (keyword only).
        :return: dict from site name to a tensor of shape
            ``(len(quantiles),) + site_shape``.
        """
        samples = self._constrained_samples(num_samples, args, kwargs)
        qs = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        if qs.dim() != 1 or ((qs < 0) | (qs > 1)).any():
            raise ValueError(f"quantiles must be a 1-D sequence in [0, 1], got {quantiles!r}")
        return {
            name: torch.quantile(value.to(qs.dtype), qs, dim=0).to(value.dtype)
            for name, value in samples.items()
        }

    @torch.no_grad()
    def median(self, *args, num_samples: int = 1000, **kwargs) -> Dict[str, torch.Tensor]:
        """
        Marginal posterior median of each latent site, in constrained space.

        A Monte-Carlo estimate from ``num_samples`` draws (default 1000), see
        :meth:`quantiles`.

        :return: dict from site name to a tensor of the site's shape.
        """
        q = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in q.items()}

    # ------------------------------------------------------ save / load
    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """
        As :meth:`torch.nn.Module.load_state_dict`. Parameters only exist after
        the guide has been run once: call ``guide(*args, **kwargs)`` first. For
        models without arguments this method runs that setup itself.
        """
        if self.prototype_trace is None and len(state_dict):
            try:
                self._setup_prototype()
            except TypeError as e:
                raise RuntimeError(
                    f"{type(self).__name__} has no parameters yet: call "
                    "guide(*args, **kwargs) once with the model's arguments "
                    "before load_state_dict()."
                ) from e
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


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
    :param bottleneck: ``M`` (default: the latent dimension; capped at it for
        ``kind="orthogonal"``, so ``bottleneck=8`` works for any model).
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
        from .transforms._base import check_input_dim
        from .transforms.sylvester import KINDS

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
        from .helpers import sylvester_flow

        if kind == "orthogonal" and bottleneck is not None:
            bottleneck = min(bottleneck, latent_dim)
        flow = sylvester_flow(
            latent_dim, num_flows, bottleneck=bottleneck, kind=kind, num_householder=num_householder
        )
        flow.reset_parameters(near_identity=True)  # step-0 guide = the affine base
        return flow


__all__.append("AutoSylvesterFlow")
