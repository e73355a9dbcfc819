"""Initial scales and centredness from the curvature of the model's log joint at the
prototype (a diagonal Laplace approximation)."""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

import pyro.poutine as poutine
from pyro.infer.autoguide.utils import _product

from .._rng import fork_rng

from .placement import _Unconstrained

#: initial scale where the curvature says nothing (AutoNormal's default)
_DEFAULT_INIT_SCALE = 0.1
#: the automatic initial scales are clamped to this range: at the prototype (a prior
#: median) a weakly identified coordinate under a wide prior has a tiny curvature, and
#: starting wider than unit scale wrecked the stochastic-volatility model of the suite
#: (ELBO -81 ± 3 with a cap of 10, -71.8 with 1; the funnel is as good with 1)
_INIT_SCALE_BOUNDS = (1e-3, 1.0)
#: the initial scales are halved (at most ``_TAME_MAX_HALVINGS`` times) while the mean of
#: the log weights of ``_TAME_DRAWS`` draws of the initial guide lies more than
#: ``_TAME_GAP_PER_DIM`` nats per latent dimension below their median: a few draws land
#: where the log joint collapses (an exponential link fed a wide group scale times a
#: placed site), and their first gradient inflates plain Adam's second moment for
#: thousands of steps. On the posterior suite the gap was at most 3.8 per dimension
#: (softmax regression) except on stochastic volatility (1524 and 8.7e6 for 2 of 3 seeds)
_TAME_GAP_PER_DIM = 10.0
_TAME_DRAWS = 32
_TAME_MAX_HALVINGS = 6
_TAME_SEED = 20212
#: bounds of the initial centredness: strictly inside (0, 1), so the ELBO can move it
_CENTERING_BOUNDS = (0.02, 0.98)
#: above this many coordinates the curvature of a site is estimated from one
#: Hessian-vector product (row sums) instead of one per coordinate
_EXACT_CURVATURE_MAX = 32


def _log_joint_curvature(model: Callable, values: Dict[str, torch.Tensor], args, kwargs):
    """``(found, diag, scales)``: the hierarchical sites (see :class:`_Unconstrained`), the
    diagonal of the Hessian of the model's log joint in
    unconstrained coordinates at the prototype values (site → tensor shaped like the site's
    unconstrained value; exact per coordinate for up to ``_EXACT_CURVATURE_MAX``
    coordinates in all, else row sums within each site), and the prior scales of the
    Normal / LogNormal sites. ``diag`` is ``None`` where the model is not twice
    differentiable there."""
    probe = _Unconstrained(values)
    with torch.enable_grad(), fork_rng():
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


def init_from_curvature(
    shapes: Dict[str, torch.Size],
    hierarchical,
    diag: Dict[str, Optional[torch.Tensor]],
    prior_scales: Dict[str, torch.Tensor],
    init_scale: Optional[float],
    centered: Optional[float],
    like: dict,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    r"""``(scale, centering)``: the initial scale of every latent coordinate (``None`` when
    ``init_scale`` fixes it) and the initial centredness of the hierarchical ones (``None``
    unless there are some and ``centered`` is ``None``), flat in site order, from the
    diagonal curvature ``-H`` of the log joint at the prototype (Gaussian-exact):

    * an ordinary coordinate gets scale :math:`1/\sqrt{-H_{jj}}` (``init_scale``, else 0.1,
      where the log joint is not concave there);
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

    The scales are clamped to ``_INIT_SCALE_BOUNDS``; ``like`` gives their dtype/device.
    """
    lo, hi = _CENTERING_BOUNDS
    fallback = _DEFAULT_INIT_SCALE if init_scale is None else init_scale
    scales, centering = [], []
    for name, shape in shapes.items():
        d = diag.get(name)
        neg = None if d is None else (-d).reshape(shape)
        if name in hierarchical:
            tau2 = prior_scales[name].expand(shape) ** 2
            info = torch.zeros(shape) if neg is None else (neg - 1 / tau2).clamp_min(0)
            ratio = tau2 * info
            # written to stay in [0, 1] where the curvature overflows (an exponential link
            # far from the data: tau^2 I = inf gives 1, not inf/inf); an undefined curvature
            # (NaN) counts as no information: non-centred, the funnel-safe side
            kappa = torch.where(torch.isnan(ratio), torch.zeros_like(ratio), 1 / (1 + 1 / ratio))
            c = (kappa * kappa).clamp(lo, hi) if centered is None else torch.full(shape, centered)
            centering.append(c.reshape(-1))
            scale = tau2.sqrt() ** c / (1 + ratio).sqrt()
        elif neg is None:
            scale = torch.full(shape, fallback)
        else:
            scale = torch.where(neg > 0, neg.clamp_min(1e-12).rsqrt(), torch.full(shape, fallback))
        scales.append(scale.reshape(-1))
    flat_scale = None
    if init_scale is None:
        s = torch.cat(scales).to(**like).clamp(_INIT_SCALE_BOUNDS[0], _INIT_SCALE_BOUNDS[1])
        flat_scale = torch.where(torch.isfinite(s), s, torch.full_like(s, fallback))
    flat_centering = None
    if hierarchical and centered is None:
        flat_centering = torch.cat(centering).to(**like)
    return flat_scale, flat_centering


def inspect_model(model: Callable, prototype_trace, shapes: Dict[str, torch.Size],
                  init_scale: Optional[float], centered: Optional[float], like: dict,
                  args, kwargs) -> Tuple[Dict[str, slice], Optional[torch.Tensor],
                                         Optional[torch.Tensor]]:
    """``(hierarchical, scale, centering)`` from one differentiable run of ``model`` at the
    prototype values: the hierarchical sites (the Normal/LogNormal/MultivariateNormal sites whose prior loc or
    scale depends on another latent site, which make funnels; none if ``centered == 1``),
    each with its slice of the flat centredness vector, and the initial scales and
    centredness of :func:`init_from_curvature`. The model is not run when ``centered == 1``
    and ``init_scale`` is given (nothing to find or initialise)."""
    hierarchical: Dict[str, slice] = {}
    if centered == 1.0 and init_scale is not None:
        return hierarchical, None, None
    values = {name: site["value"] for name, site in prototype_trace.iter_stochastic_nodes()}
    found, diag, prior_scales = _log_joint_curvature(model, values, args, kwargs)
    pos = 0
    for name in found if centered != 1.0 else []:
        size = _product(shapes[name])
        hierarchical[name] = slice(pos, pos + size)
        pos += size
    scale, centering = init_from_curvature(shapes, hierarchical, diag, prior_scales,
                                           init_scale, centered, like)
    return hierarchical, scale, centering


def tame_initial_scale(guide, model: Callable, args, kwargs) -> int:
    """Halve the set-up ``guide``'s scales while its draws include collapses of the log
    joint (see ``_TAME_GAP_PER_DIM``); returns the number of halvings. The draws come from
    a forked random stream with a fixed seed (the user's stream is left alone); a model
    that cannot be scored here is left as it is (the first step reports its errors)."""
    from .._weights import _draw  # the guide must be callable: after its setup

    halvings = 0
    with fork_rng(), torch.no_grad():
        torch.manual_seed(_TAME_SEED)
        for halvings in range(_TAME_MAX_HALVINGS + 1):
            try:
                lw = _draw(model, guide, args, kwargs, _TAME_DRAWS, None, None, None)[1]
            except Exception:  # noqa: BLE001 -- a safeguard, not a check
                return halvings
            lw = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)
            median = lw.median()
            if not torch.isfinite(median) or not median - lw.mean() > _TAME_GAP_PER_DIM * guide.latent_dim:
                return halvings
            if halvings < _TAME_MAX_HALVINGS:
                guide.scale = guide.scale * 0.5
    return halvings
