"""Placement of hierarchical sites: finding them, and running the model's prior to put each
at ``(1 - c) loc + scale^(1 - c) x`` (partial non-centring, centredness ``c``)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch.distributions import biject_to

import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger


def _loc_scale(fn) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(loc, scale)`` of a Normal or LogNormal site behind Pyro's Independent /
    Expanded / Masked wrappers (for a LogNormal: of the Normal of its log), else ``None``."""
    while isinstance(fn, (torch.distributions.Independent, dist.ExpandedDistribution,
                          dist.MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, (torch.distributions.Normal, torch.distributions.LogNormal)):
        return fn.loc, fn.scale
    return None


def to_site(fn, unconstrained: torch.Tensor, log_jac: Optional[torch.Tensor] = None):
    """``(value, log|d x / d value|)``: an unconstrained draw mapped by the support bijection
    of the site distribution ``fn``; ``log_jac`` (shaped like ``unconstrained``) is the
    log-Jacobian of a placement ``x -> unconstrained`` that came before."""
    transform = biject_to(fn.support)
    value = transform(unconstrained)
    if poutine.get_mask() is False:
        return value, 0.0
    log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
    log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + fn.event_dim)
    if log_jac is not None:  # Normal/LogNormal: value and x have the same shape
        log_density = log_density - sum_rightmost(log_jac, fn.event_dim)
    return value, log_density


class _LatentsOnly(Exception):
    """Raised by the messengers below once every latent site has been seen, so that the
    rest of the model (typically its likelihood) is not run."""


def _run_latents(messenger: Messenger, model: Callable, args, kwargs) -> None:
    """Run ``model`` under ``messenger`` (blocked from outer handlers) up to its last
    latent site."""
    try:
        poutine.block(messenger(model))(*args, **kwargs)
    except _LatentsOnly:
        pass


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


class _PlaceLatents(Messenger):
    """Runs the model with the guide's unconstrained draws ``xs`` and turns them into site
    values: a hierarchical site (a key of ``centering``) gets ``(1 - c) loc + scale^(1 - c)
    x`` (partial non-centring with centredness ``c``, Gorinova, Moore & Hoffman 2020; ``c =
    None`` means 0) from the loc and scale its prior has given the values placed before
    it; every other site gets ``x``. Then the support bijection of the site's prototype
    distribution (``fns``). Records ``(value, log|d x / d value|)`` per site in ``placed``."""

    def __init__(self, xs: Dict[str, torch.Tensor], centering: Dict[str, Optional[torch.Tensor]],
                 fns: Dict[str, object]) -> None:
        super().__init__()
        self.xs, self.centering, self.fns = xs, centering, fns
        self.placed: Dict[str, tuple] = {}

    def _pyro_sample(self, msg) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.xs:
            return
        x = self.xs[name]
        if name in self.centering:
            loc, scale = _loc_scale(msg["fn"])
            c = self.centering[name]
            if c is None:
                unconstrained = loc + scale * x
                log_jac = torch.log(scale)
            else:
                unconstrained = (1 - c) * loc + scale.pow(1 - c) * x
                log_jac = (1 - c) * torch.log(scale)
            value, log_density = to_site(self.fns[name], unconstrained,
                                         log_jac.expand(unconstrained.shape))
        else:
            value, log_density = to_site(self.fns[name], x)
        self.placed[name] = (value, log_density)
        msg["value"] = value
        msg["is_observed"] = True
        if len(self.placed) == len(self.xs):
            raise _LatentsOnly


def place_latents(model: Callable, xs: Dict[str, torch.Tensor],
                  centering: Dict[str, Optional[torch.Tensor]], fns: Dict[str, object],
                  args, kwargs) -> Dict[str, tuple]:
    """``{site: (value, log|d x / d value|)}`` for the unconstrained draws ``xs``: the
    hierarchical sites (keys of ``centering``) placed by one run of ``model``'s prior up to
    its last latent site, the others mapped by their support bijection alone."""
    placed: Dict[str, tuple] = {}
    if centering:
        placer = _PlaceLatents(xs, centering, fns)
        _run_latents(placer, model, args, kwargs)
        placed = placer.placed
    for name, x in xs.items():  # every site, if no placement; else any the run missed
        if name not in placed:
            placed[name] = to_site(fns[name], x)
    return placed
