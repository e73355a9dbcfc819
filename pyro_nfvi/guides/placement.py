"""Placement of hierarchical sites: finding them, and running the model's prior to put each
at ``(1 - c) loc + scale^(1 - c) x`` (partial non-centring, centredness ``c``); a
multivariate normal site at ``(1 - c) loc + L_c x`` with ``L_c`` the partially
non-centred Cholesky factor of :func:`mvn_placement`."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform

import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.messenger import Messenger

from .._compat import split_init_messenger


def _unwrap(fn):
    """The distribution behind Pyro's Independent / Expanded / Masked wrappers."""
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution,
                          dist.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _loc_scale(fn) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, scale)`` of a Normal or LogNormal site behind Pyro's Independent /
    Expanded / Masked wrappers (for a LogNormal: of the Normal of its log), else ``None``."""
    fn = _unwrap(fn)
    if isinstance(fn, (torch.distributions.Normal, torch.distributions.LogNormal)):
        return fn.loc, fn.scale
    return None


def _loc_scale_tril(fn) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, scale_tril)`` of a MultivariateNormal site behind Pyro's wrappers, else
    ``None``."""
    fn = _unwrap(fn)
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return fn.loc, fn.scale_tril
    return None


def _prior_params(fn) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The parameters the placement reads: ``(loc, scale)`` or ``(loc, scale_tril)``."""
    params = _loc_scale(fn)
    return params if params is not None else _loc_scale_tril(fn)


def _conditional_scale(scale_tril: torch.Tensor) -> torch.Tensor:
    r"""The prior sd of each coordinate of ``N(loc, L L^T)`` given the others,
    :math:`1/\sqrt{(\Sigma^{-1})_{ii}}` with :math:`\Sigma^{-1} = L^{-T} L^{-1}` (the
    role a Normal site's scale plays in the initial centredness)."""
    eye = torch.eye(scale_tril.shape[-1], dtype=scale_tril.dtype, device=scale_tril.device)
    inv = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # L^{-1}
    return inv.pow(2).sum(-2).rsqrt()  # diag(L^{-T} L^{-1})_i = sum_k (L^{-1})_{ki}^2


def _partial_factor(scale_tril: torch.Tensor, c: Optional[torch.Tensor]):
    """``(L_c, log diag L_c)``, see :func:`mvn_placement`."""
    d = scale_tril.diagonal(dim1=-2, dim2=-1)
    if c is None:
        return scale_tril, torch.log(d)
    one_minus_c = (1 - c).expand(d.shape)
    unit = scale_tril / d.unsqueeze(-2)  # M = L diag(d)^{-1}: unit lower triangular
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    unit_c = eye + one_minus_c.unsqueeze(-1) * (unit - eye)  # row i scaled by (1 - c_i)
    log_d_c = one_minus_c * torch.log(d)
    return unit_c * log_d_c.exp().unsqueeze(-2), log_d_c


def _normal_placement(loc: torch.Tensor, scale: torch.Tensor, c: Optional[torch.Tensor],
                      x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``((1 - c) loc + scale^(1 - c) x, (1 - c) log scale)`` (``c = None`` means 0): the
    placement of a Normal/LogNormal site and its log-Jacobian, per coordinate."""
    if c is None:
        value, log_jac = loc + scale * x, torch.log(scale)
    else:
        keep = 1 - c  # one op for the three uses (each also a node in the backward)
        # scale^(1 - c) as the exp of the log-Jacobian: pow's backward would take two
        # more logs and powers
        log_jac = keep * torch.log(scale)
        value = keep * loc + log_jac.exp() * x
    return value, log_jac.expand(value.shape)


def _normal_unplacement(loc: torch.Tensor, scale: torch.Tensor, c: Optional[torch.Tensor],
                        value: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_normal_placement`: the ``x`` that places at ``value``."""
    if c is None:
        return (value - loc) / scale
    return (value - (1 - c) * loc) / scale.pow(1 - c)


def mvn_placement(loc: torch.Tensor, scale_tril: torch.Tensor, c: Optional[torch.Tensor],
                  x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Partial non-centring of a multivariate normal site :math:`h \sim
    \mathcal{N}(\mu, LL^\top)`: ``(h, log|dh/dx|)`` per coordinate (summing it over the
    last dimension gives the log-determinant) for the guide's coordinate ``x``.

    Write :math:`L = M\,\mathrm{diag}(d)` with :math:`d = \mathrm{diag}(L) > 0` and
    :math:`M` unit lower triangular. With centredness :math:`c \in [0, 1]^T` (one per
    coordinate; ``None`` means 0),

    .. math::

        h = (1 - c) \odot \mu + L_c\, x, \qquad
        L_c = ig(I + \mathrm{diag}(1 - c)(M - I)ig)\,\mathrm{diag}ig(d^{1 - c}ig),
        \qquad \log|\det L_c| = \sum_i (1 - c_i) \log d_i .

    :math:`L_c` is lower triangular with diagonal :math:`d^{1-c}`, so the log-determinant
    is exact and cancellation-free. :math:`c = 0` is the non-centred
    :math:`h = \mu + Lx` (a Gaussian prior becomes :math:`x \sim \mathcal{N}(0, I)`),
    :math:`c = 1` the centred :math:`h = x`; for a diagonal :math:`L` it is the
    univariate placement :math:`(1 - c)\mu + \sigma^{1-c} x` coordinate by coordinate
    (Gorinova, Moore & Hoffman 2020, "Automatic reparameterisation of probabilistic
    programs", ICML).

    Example::

        >>> import torch
        >>> L = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
        >>> x = torch.ones(2)
        >>> h, log_jac = mvn_placement(torch.zeros(2), L, None, x)  # non-centred: L x
        >>> h.tolist(), round(log_jac.sum().item(), 4)  # log det L = log 2
        ([1.0, 2.5], 0.6931)
        >>> h, log_jac = mvn_placement(torch.zeros(2), L, torch.ones(2), x)  # centred: x
        >>> h.tolist(), log_jac.sum().item()
        ([1.0, 1.0], 0.0)
    """
    if c is None:
        h = loc + (scale_tril @ x.unsqueeze(-1)).squeeze(-1)
        return h, torch.log(scale_tril.diagonal(dim1=-2, dim2=-1)).expand(h.shape)
    # L_c x without forming L_c (whose T x T entries cost a pass each, with their
    # backward): with y = d^(1-c) x, L_c x = y + (1 - c)(M y - y) and M y = L (y / d) =
    # L (d^(-c) x), so one (batched) matrix-vector product and vector ops
    keep = 1 - c
    log_d = torch.log(scale_tril.diagonal(dim1=-2, dim2=-1))
    log_jac = keep * log_d
    y = log_jac.exp() * x
    my = (scale_tril @ (torch.exp(-c * log_d) * x).unsqueeze(-1)).squeeze(-1)
    h = keep * loc + y + keep * (my - y)
    return h, log_jac.expand(h.shape)


def mvn_unplacement(loc: torch.Tensor, scale_tril: torch.Tensor, c: Optional[torch.Tensor],
                    h: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`mvn_placement`: the ``x`` that places at ``h`` (one
    triangular solve)."""
    factor, _ = _partial_factor(scale_tril, c)
    shift = loc if c is None else (1 - c) * loc
    r = (h - shift).unsqueeze(-1)
    factor = factor.expand(r.shape[:-2] + factor.shape[-2:])
    return torch.linalg.solve_triangular(factor, r, upper=False).squeeze(-1)


def _is_identity(transform) -> bool:
    """Whether ``transform`` is the identity (``biject_to`` of a real support)."""
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def to_site(fn, unconstrained: torch.Tensor, log_jac: Optional[torch.Tensor] = None,
            unmasked: bool = True):
    """``(value, log|d x / d value|)``: an unconstrained draw mapped by the support bijection
    of the site distribution ``fn``; ``log_jac`` (shaped like ``unconstrained``) is the
    log-Jacobian of a placement ``x -> unconstrained`` that came before. ``unmasked=False``
    (the guide runs under ``poutine.mask(False)``, what Pyro's ``AutoContinuous`` checks,
    in the guide's context): the value, with log-density 0."""
    transform = biject_to(fn.support)
    if not unmasked:
        return transform(unconstrained), 0.0
    if _is_identity(transform):  # a real support: no map, no log-Jacobian of its own
        if log_jac is None:
            return unconstrained, 0.0
        return unconstrained, -sum_rightmost(log_jac, fn.event_dim)
    value = transform(unconstrained)
    # log|d unconstrained / d value| = -log|d value / d unconstrained|: the forward map's
    # log-Jacobian at the values it was just given (no inverse transform object)
    log_density = -transform.log_abs_det_jacobian(unconstrained, value)
    log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + fn.event_dim)
    if log_jac is not None:  # (Multivariate)Normal/LogNormal: value and x have one shape
        log_density = log_density - sum_rightmost(log_jac, fn.event_dim)
    return value, log_density


class _LatentsOnly(Exception):
    """Raised by the messengers below once every latent site has been seen, so that the
    rest of the model (typically its likelihood) is not run."""


def _run_latents(messenger: Messenger, model: Callable, args, kwargs) -> None:
    """Run ``model`` under ``messenger`` (blocked from outer handlers) up to the last
    site ``messenger`` needs. A model wrapped in Pyro's ``InitMessenger`` (every
    autoguide's ``model``) runs with ``messenger`` inside the wrapper: the sites it sets
    skip the init strategy (which would draw prior samples only to be overwritten)."""
    init_fn, inner = split_init_messenger(model)
    fn = messenger(inner)
    if init_fn is not None:
        fn = InitMessenger(init_fn)(fn)
    try:
        poutine.block(fn)(*args, **kwargs)
    except _LatentsOnly:
        pass


def _support_bounds(support) -> list:
    """The tensor bounds of an interval-type support (through ``independent``) that carry
    a gradient: a bound computed from other sites."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    bounds = [getattr(support, a, None) for a in ("lower_bound", "upper_bound")]
    return [b for b in bounds if torch.is_tensor(b) and b.requires_grad]


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
        bounds = _support_bounds(msg["fn"].support)
        if bounds and self.leaves:
            grads = torch.autograd.grad([b.sum() for b in bounds], list(self.leaves.values()),
                                        allow_unused=True, retain_graph=True)
            owners = [n for n, g in zip(self.leaves, grads) if g is not None]
            if owners:
                raise ValueError(
                    f"site {name!r} has a support whose bounds depend on the latent site(s) "
                    f"{owners}: the guide maps each site through the bijection of its support "
                    "at setup, which would not follow the bounds. Write the site on a fixed "
                    "support, e.g. x = a * u with u ~ Uniform(0, 1) for x ~ Uniform(0, a)"
                )
        transform = biject_to(msg["fn"].support)
        leaf = transform.inv(self.values[name]).detach().clone().requires_grad_()
        params = _prior_params(msg["fn"])
        if params is not None:
            scale = torch.as_tensor(params[1]).detach()
            if _loc_scale(msg["fn"]) is None:  # MultivariateNormal: conditional sds
                scale = _conditional_scale(scale)
            self.scales[name] = scale
            outs = [p for p in params if torch.is_tensor(p) and p.requires_grad]
            if outs and self.leaves:
                grads = torch.autograd.grad([o.sum() for o in outs], list(self.leaves.values()),
                                            allow_unused=True, retain_graph=True)
                if any(g is not None for g in grads):
                    self.found.append(name)
        self.leaves[name] = leaf
        msg["value"] = transform(leaf)
        msg["is_observed"] = True


class _PlaceLatents(Messenger):
    """Runs the model with the guide's unconstrained draws ``xs`` and turns them into site
    values: a hierarchical site (a key of ``centering``) gets ``(1 - c) loc + scale^(1 - c)
    x`` (partial non-centring with centredness ``c``, Gorinova, Moore & Hoffman 2020; ``c =
    None`` means 0) from the loc and scale its prior has given the values placed before
    it (a MultivariateNormal site: :func:`mvn_placement`); every other site gets ``x``. Then
    the support bijection of the site's prototype distribution (``fns``). Records ``(value,
    log|d x / d value|)`` per site in ``placed``; the unconstrained values in
    ``unconstrained``; for the hierarchical sites the log of the placement's diagonal
    Jacobian (``(1 - c) log scale``, triangular for a MultivariateNormal site) in ``log_jac``
    and the prior's parameters the placement read in ``params``."""

    def __init__(self, xs: Dict[str, torch.Tensor], centering: Dict[str, Optional[torch.Tensor]],
                 fns: Dict[str, object], densities: bool = True, unmasked: bool = True) -> None:
        super().__init__()
        self.xs, self.centering, self.fns = xs, centering, fns
        self.densities = densities  # False: values only (``placed`` holds log-density None)
        self.unmasked = unmasked  # False: log-densities 0 (see to_site)
        self.placed: Dict[str, tuple] = {}
        self.unconstrained: Dict[str, torch.Tensor] = {}
        self.log_jac: Dict[str, torch.Tensor] = {}
        self.params: Dict[str, tuple] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.xs:
            return
        x = self.xs[name]
        if name in self.centering and _loc_scale(msg["fn"]) is None:  # MultivariateNormal
            loc, scale_tril = _loc_scale_tril(msg["fn"])
            unconstrained, log_jac = mvn_placement(loc, scale_tril, self.centering[name], x)
            self.log_jac[name], self.params[name] = log_jac, (loc, scale_tril)
        elif name in self.centering:
            loc, scale = _loc_scale(msg["fn"])
            unconstrained, log_jac = _normal_placement(loc, scale, self.centering[name], x)
            self.log_jac[name], self.params[name] = log_jac, (loc, scale)
        else:
            unconstrained, log_jac = x, None
        if self.densities:
            value, log_density = to_site(self.fns[name], unconstrained, log_jac, self.unmasked)
        else:
            value, log_density = biject_to(self.fns[name].support)(unconstrained), None
        self.unconstrained[name] = unconstrained
        self.placed[name] = (value, log_density)
        msg["value"] = value
        msg["is_observed"] = True
        if len(self.placed) == len(self.xs):
            raise _LatentsOnly


class _UnplaceLatents(Messenger):
    """The inverse of :class:`_PlaceLatents`: runs the model with the sites set from their
    unconstrained values ``us`` and records in ``xs`` the guide's coordinate of each,
    ``(u - (1 - c) loc) / scale^(1 - c)`` for a hierarchical site, ``u`` for the others."""

    def __init__(self, us: Dict[str, torch.Tensor], centering: Dict[str, Optional[torch.Tensor]],
                 fns: Dict[str, object]) -> None:
        super().__init__()
        self.us, self.centering, self.fns = us, centering, fns
        self.xs: Dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.us:
            return
        u = self.us[name]
        if name in self.centering and _loc_scale(msg["fn"]) is None:  # MultivariateNormal
            loc, scale_tril = _loc_scale_tril(msg["fn"])
            self.xs[name] = mvn_unplacement(loc, scale_tril, self.centering[name], u)
        elif name in self.centering:
            loc, scale = _loc_scale(msg["fn"])
            self.xs[name] = _normal_unplacement(loc, scale, self.centering[name], u)
        else:
            self.xs[name] = u
        msg["value"] = biject_to(self.fns[name].support)(u)
        msg["is_observed"] = True
        if len(self.xs) == len(self.us):
            raise _LatentsOnly


def place_latents(model: Callable, xs: Dict[str, torch.Tensor],
                  centering: Dict[str, Optional[torch.Tensor]], fns: Dict[str, object],
                  args, kwargs) -> Dict[str, tuple]:
    """``{site: (value, log|d x / d value|)}`` for the unconstrained draws ``xs``: the
    hierarchical sites (keys of ``centering``) placed by one run of ``model``'s prior up to
    its last latent site, the others mapped by their support bijection alone."""
    placed: Dict[str, tuple] = {}
    # the guide's own mask, read here, in the guide's context (inside the blocked model
    # run below it would see the model's masks instead)
    unmasked = poutine.get_mask() is not False
    if centering:
        placer = _PlaceLatents(xs, centering, fns, unmasked=unmasked)
        # without argument checks of the prior's distributions: the model's own run (the
        # ELBO's) builds them again from the same values and checks them there (only
        # those switched off: pyro.validation_enabled also saves and sets two more flags)
        checks = dist.is_validation_enabled()
        dist.enable_validation(False)
        try:
            _run_latents(placer, model, args, kwargs)
        finally:
            dist.enable_validation(checks)
        placed = placer.placed
    for name, x in xs.items():  # every site, if no placement; else any the run missed
        if name not in placed:
            placed[name] = to_site(fns[name], x, unmasked=unmasked)
    return placed
