r"""NeuTra (flow-preconditioned HMC/NUTS) through a flow guide's hierarchical placement.

A flow guide with hierarchical sites (``centered != 1``, the default) draws its latent
vector in three steps: base noise :math:`\epsilon \sim \mathcal N(0, I)`, the flow and the
affine layer give the guide's coordinates :math:`x = \mu + L f(\epsilon)`, and the
*placement* puts each hierarchical site relative to its prior,

.. math::

    u_i = (1 - c_i)\,\mathrm{loc}_i(u_{<i}) + \mathrm{scale}_i(u_{<i})^{1 - c_i}\, x_i ,

with loc and scale computed by the model's prior from the sites placed before it (every
other site: :math:`u_i = x_i`). The placement is triangular in model order, so it is a
bijection of the whole latent vector with

.. math::

    \log\left|\det \frac{\partial u}{\partial x}\right|
        = \sum_{i\ \mathrm{hierarchical}} (1 - c_i) \log \mathrm{scale}_i(u_{<i}) .

:class:`PlacedFlowTransform` is the composite :math:`\epsilon \mapsto u` with this exact
log-determinant, returned by :meth:`AutoNormalizingFlow.get_transform
<pyro_nfvi.guides.AutoNormalizingFlow.get_transform>`, so that Pyro's
:class:`~pyro.infer.reparam.NeuTraReparam` runs NUTS in the standardised space
:math:`\epsilon` and maps its draws back to the model's sites. The loc and scale come from
running the model's prior, so the transform holds the model's arguments: by default those
of the guide's first call (the data it was fitted to). Where the placement depends on those
arguments (a prior loc or scale computed from a tensor argument, e.g. covariates),
``get_transform()`` without arguments raises, and :class:`NeuTraReparam` of this module is
the way out.

:class:`NeuTraReparam` is Pyro's reparameterizer with the placement done inside the model's
own run (each hierarchical site reads its loc and scale from its own prior), so the prior
is not run twice per gradient and the model's arguments are needed only to map draws back
(``transform_sample``).

Reference: M. Hoffman, P. Sountsov, J. V. Dillon, I. Langmore, D. Tran, S. Vasudevan
(2019), "NeuTra-lizing Bad Geometry in Hamiltonian Monte Carlo Using Neural Transport",
https://arxiv.org/abs/1903.03704; M. Gorinova, D. Moore, M. Hoffman (2020), "Automatic
Reparameterisation of Probabilistic Programs", ICML.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

import pyro
import pyro.distributions as dist
import pyro.infer.reparam
import pyro.poutine as poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.utils import _product
from pyro.poutine.plate_messenger import block_plate

from .._rng import fork_rng
from ..transforms._base import LadjCacheMixin
from .placement import (_loc_scale, _loc_scale_tril, _PlaceLatents, _run_latents,
                        _normal_placement, _UnplaceLatents, mvn_placement)
from .posterior import elementary_parts


def _push(parts: Sequence[Transform], x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det dy/dx|)`` through ``parts`` (each on ``real_vector``), one pass each."""
    ladj = x.new_zeros(x.shape[:-1])
    for t in parts:
        if isinstance(t, LadjCacheMixin):  # this package's flows: value and log-det at once
            y, part = t.call_and_ladj(x)
        else:
            y = t(x)
            part = t.log_abs_det_jacobian(x, y)
        ladj = ladj + sum_rightmost(part, 1 - t.codomain.event_dim)
        x = y
    return x, ladj


def _plate_nesting(prototype_trace) -> int:
    """How many dims, right of a leading batch of draws, the model's sites use as batch
    dims (plates and a distribution's own batch shape)."""
    nesting = 0
    for site in prototype_trace.nodes.values():
        if site["type"] != "sample":
            continue
        nesting = max(nesting, len(getattr(site["fn"], "batch_shape", ())))
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
    return nesting


class PlacedFlowTransform(Transform):
    r"""
    The bijection :math:`\epsilon \mapsto u` of a flow guide with hierarchical sites: flow,
    affine layer, then the placement of the hierarchical sites (see the module docstring),
    with its exact log-determinant. ``u`` is the packed unconstrained latent vector of
    :class:`~pyro.infer.autoguide.AutoContinuous` (``guide._unpack_latent`` splits it), so
    this is what :class:`~pyro.infer.reparam.NeuTraReparam` expects of ``get_transform()``.

    The placement runs the model's prior (with ``args``, ``kwargs``) up to its last latent
    site, once per call; the parameters of the guide are read when the transform is made.
    Inputs may carry leading batch dims: placed to the left of the model's plates in one
    run where the model broadcasts over them (as vectorised ELBO particles need), else one
    draw at a time. The inverse runs the prior once more and inverts the affine layer and
    the flow (which the flows of this package implement).

    With Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` the model's first latent site
    must be outside its plates (Pyro makes the latent vector there, and would add the
    log-det once per element of that site's plates); a clear error names
    :class:`NeuTraReparam` of this package, which has no such limit.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_nfvi.guides import AutoPlanarFlow
        >>> def model():
        ...     y = pyro.sample("y", dist.Normal(0.0, 3.0))
        ...     pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)).expand([3]).to_event(1))
        >>> pyro.clear_param_store()  # a new guide: no parameters of an earlier one
        >>> guide = AutoPlanarFlow(model, num_flows=2)
        >>> t = guide.get_transform()
        >>> eps = torch.randn(4, 4)
        >>> u = t(eps)
        >>> u.shape, t.log_abs_det_jacobian(eps, u).shape
        (torch.Size([4, 4]), torch.Size([4]))
        >>> torch.allclose(t.inv(u), eps, atol=1e-4)
        True

    :param guide: a set-up :class:`~pyro_nfvi.guides.AutoNormalizingFlow`.
    :param parts: the flow and affine transforms (as the guide's ``get_posterior``).
    :param tuple args: the model's positional arguments for the placement.
    :param dict kwargs: the model's keyword arguments for the placement.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, guide, parts: Sequence[Transform], args: tuple, kwargs: dict) -> None:
        super().__init__(cache_size=0)
        self.guide = guide
        self.parts = elementary_parts(parts)
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.centering = guide._centerings()
        self._nesting = _plate_nesting(guide.prototype_trace)
        self._last: Optional[tuple] = None  # (eps, u, log-det) of the last call

    # one layout for the forward and the inverse: the site's value with the batch of draws
    # to the left of every plate dim
    def _split(self, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch, out, pos = v.shape[:-1], {}, 0
        for name, site in self.guide.prototype_trace.iter_stochastic_nodes():
            shape = self.guide._unconstrained_shapes[name]
            size = _product(shape)
            pad = (1,) * (self._nesting - len(site["fn"].batch_shape)) if batch else ()
            out[name] = v[..., pos:pos + size].reshape(batch + pad + shape)
            pos += size
        return out

    @staticmethod
    def _join(values: Dict[str, torch.Tensor], like: Dict[str, torch.Tensor],
              batch: torch.Size) -> torch.Tensor:
        return torch.cat([torch.broadcast_to(values[n], x.shape).reshape(batch + (-1,))
                          for n, x in like.items()], dim=-1)

    def _fns(self) -> Dict[str, object]:
        nodes = self.guide.prototype_trace.iter_stochastic_nodes()
        return {name: site["fn"] for name, site in nodes}

    def _run(self, messenger) -> None:
        try:
            _run_latents(messenger, self.guide.model, self.args, self.kwargs)
        except ValueError as e:
            if "duplicate plate" not in str(e):
                raise
            # Pyro's NeuTraReparam calls the transform at the model's first latent site;
            # inside a plate the prior cannot be re-run (and Pyro would add the log-det
            # once per element of that plate)
            raise ValueError(
                f"{type(self.guide).__name__}'s transform was called inside the model's "
                f"plate ({e}): Pyro's NeuTraReparam makes the whole latent vector at the "
                "model's first latent site, which is inside a plate here. Use "
                "`pyro_nfvi.guides.NeuTraReparam(guide)` in place of Pyro's (it places the "
                "sites in the model's own run and adds the log-det once), or move the "
                "model's global sites before its plates."
            ) from e

    def _rows(self, fn, v: torch.Tensor):
        """``fn(v)`` for a batch ``v``: in one run of the prior where the model broadcasts
        over leading dims (as for vectorised ELBO particles), else one row at a time."""
        if v.dim() == 1:
            return fn(v)
        try:
            return fn(v)
        except (RuntimeError, ValueError, IndexError):  # a model that does not broadcast
            flat = v.reshape(-1, v.shape[-1])
            outs = [fn(row) for row in flat]
            if isinstance(outs[0], tuple):
                return tuple(torch.stack(o).reshape(v.shape[:-1] + o[0].shape) for o in zip(*outs))
            return torch.stack(outs).reshape(v.shape[:-1] + outs[0].shape)

    def _call(self, eps: torch.Tensor) -> torch.Tensor:
        u, ladj = self._rows(self._place, eps)
        self._last = (eps, u, ladj)
        return u

    def _place(self, eps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, ladj = _push(self.parts, eps)
        batch = x.shape[:-1]
        xs = self._split(x)
        placer = _PlaceLatents(xs, self.centering, self._fns(), densities=False)
        self._run(placer)
        us = {name: placer.unconstrained.get(name, x_i) for name, x_i in xs.items()}
        for name, log_jac in placer.log_jac.items():
            ladj = ladj + torch.broadcast_to(log_jac, xs[name].shape).reshape(batch + (-1,)).sum(-1)
        return self._join(us, xs, batch), ladj

    def _inverse(self, u: torch.Tensor) -> torch.Tensor:
        return self._rows(self._unplace, u)

    def _unplace(self, u: torch.Tensor) -> torch.Tensor:
        us = self._split(u)
        unplacer = _UnplaceLatents(us, self.centering, self._fns())
        self._run(unplacer)
        x = self._join({n: unplacer.xs.get(n, u_i) for n, u_i in us.items()}, us, u.shape[:-1])
        for t in reversed(self.parts):
            x = t.inv(x)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:math:`\\log|\\det \\partial u / \\partial \\epsilon|` at ``x`` (= ε; ``y`` must
        be ``self(x)``): flow + affine + placement, from the forward pass when ``(x, y)``
        is the last pair computed, else recomputed from ``x``."""
        last = self._last
        if last is None or last[0] is not x or last[1] is not y:
            self._call(x)
            last = self._last
        return last[2]


def _arguments_in_placement(guide, args: tuple, kwargs: dict
                            ) -> Tuple[Optional[List[str]], Optional[str]]:
    """``(names, None)``: the floating-point tensor arguments of the model (``args[i]`` or
    the keyword) that the prior loc or scale of a hierarchical site is computed from, found
    by autograd at the prototype values; ``(None, why)`` when that run failed."""
    new_args, new_kwargs, leaves = list(args), dict(kwargs), {}
    for i, a in enumerate(args):
        if torch.is_tensor(a) and a.is_floating_point():
            new_args[i] = leaves[f"args[{i}]"] = a.detach().clone().requires_grad_()
    for k, a in kwargs.items():
        if torch.is_tensor(a) and a.is_floating_point():
            new_kwargs[k] = leaves[k] = a.detach().clone().requires_grad_()
    if not leaves:
        return [], None
    xs, fns = {}, {}
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        fns[name] = site["fn"]
        xs[name] = biject_to(site["fn"].support).inv(site["value"]).detach()
    with torch.no_grad():
        centering = guide._centerings()
    placer = _PlaceLatents(xs, centering, fns, densities=False)
    try:
        with torch.enable_grad(), fork_rng():
            _run_latents(placer, guide.model, tuple(new_args), new_kwargs)
    except Exception as e:  # noqa: BLE001 -- e.g. an in-place change of an argument
        return None, f"{type(e).__name__}: {e}"
    outs = [p for pair in placer.params.values() for p in pair
            if torch.is_tensor(p) and p.requires_grad]
    if not outs:
        return [], None
    grads = torch.autograd.grad(outs, list(leaves.values()),
                                grad_outputs=[torch.ones_like(o) for o in outs],
                                allow_unused=True)
    return [name for name, g in zip(leaves, grads) if g is not None], None


def placement_arguments(guide, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """The model arguments a guide's :class:`PlacedFlowTransform` uses: those given, else
    those of the guide's first call, provided
    the placement does not depend on them (a ``ValueError`` naming the way out if it
    does)."""
    if args or kwargs:
        return args, kwargs
    name = type(guide).__name__
    sites = sorted(guide._hierarchical)
    way_out = (
        "Pass the model's arguments: use `pyro_nfvi.guides.NeuTraReparam(guide, *args, "
        "**kwargs)` in place of Pyro's NeuTraReparam (or call "
        "`guide.get_transform(*args, **kwargs)`), or construct the guide with centered=1.0 "
        "(no placement)."
    )
    stored = guide.__dict__.get("_placement_args")
    if stored is None:
        raise ValueError(
            f"{name}.get_transform(): the hierarchical sites {sites} are placed by running "
            "the model's prior, and this guide does not know the model's arguments (it was "
            f"loaded from a file). {way_out}"
        )
    check = guide.__dict__.get("_nfvi_placement_check")
    if check is None or check[0] is not stored:
        check = (stored, _arguments_in_placement(guide, *stored))
        guide.__dict__["_nfvi_placement_check"] = check
    names, why = check[1]
    if names is None:
        raise ValueError(
            f"{name}.get_transform(): could not check whether the placement of the "
            f"hierarchical sites {sites} depends on the model's arguments (running the "
            f"prior with gradient-tracking copies of them failed: {why}). {way_out}"
        )
    if names:
        raise ValueError(
            f"{name}.get_transform(): the placement of the hierarchical sites {sites} "
            f"depends on the model's arguments {names} (a prior loc or scale is computed "
            "from them), so the guide's transform is not one fixed map of the latent "
            f"vector, which Pyro's NeuTraReparam needs. {way_out}"
        )
    return stored


class NeuTraReparam(pyro.infer.reparam.NeuTraReparam):
    r"""
    Pyro's :class:`~pyro.infer.reparam.NeuTraReparam` (same use: ``neutra.reparam(model)``,
    NUTS, ``neutra.transform_sample``), which places a flow guide's hierarchical sites
    *inside* the model's own run: at each hierarchical site the prior's loc and scale are
    read from the site itself, so the model's prior is not run a second time per gradient
    (as it is under Pyro's reparameterizer, where the whole latent vector must be made at
    the first site), and the sampling works whatever the model's arguments are. The
    log-determinant of the flow and the affine layer is added once, as a factor outside the
    model's plates (Pyro's reparameterizer adds it to the first site, once per element of
    that site's plates; for every guide, this class adds it once). Any other guide, or
    one without hierarchical sites: its ``get_transform()``, as in Pyro.

    ``transform_sample`` runs the placement with ``args``, ``kwargs`` (default: those of the
    guide's first call; required where the placement depends on them).

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import MCMC, NUTS
        >>> from pyro_nfvi.guides import AutoPlanarFlow, NeuTraReparam
        >>> def model(x):
        ...     beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
        ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
        ...     with pyro.plate("groups", len(x)):
        ...         pyro.sample("theta", dist.Normal(beta * x, tau))
        >>> x = torch.linspace(-1, 1, 4)
        >>> guide = AutoPlanarFlow(model, num_flows=2)
        >>> guide(x)  # doctest: +ELLIPSIS
        {...}
        >>> neutra = NeuTraReparam(guide.requires_grad_(False), x)
        >>> mcmc = MCMC(NUTS(neutra.reparam(model)), num_samples=5, warmup_steps=5,
        ...             disable_progbar=True)
        >>> mcmc.run(x)
        >>> sorted(neutra.transform_sample(mcmc.get_samples()["beta_shared_latent"][0]))
        ['beta', 'tau', 'theta']

    :param guide: a trained :class:`~pyro.infer.autoguide.AutoContinuous` guide.
    :param args: the model's positional arguments (for ``transform_sample``).
    :param kwargs: the model's keyword arguments (for ``transform_sample``).
    """

    def __init__(self, guide, *args, **kwargs) -> None:
        super().__init__(guide)
        self._model_args = (args, kwargs)

    def _places(self) -> bool:
        # a flow guide of this package with hierarchical sites (duck-typed: flow.py imports
        # this module)
        guide = self.guide
        return bool(getattr(guide, "_hierarchical", None)) and hasattr(guide, "_centering")

    def apply(self, msg):
        name, fn, guide = msg["name"], msg["fn"], self.guide
        places = self._places()
        if name not in guide.prototype_trace.nodes:
            return {"fn": fn, "value": msg["value"], "is_observed": msg["is_observed"]}
        if msg["is_observed"]:
            raise NotImplementedError(
                f"At pyro.sample({name!r},...), NeuTraReparam does not support observe "
                "statements.")
        if name not in self.x_unconstrained:  # the first site: the shared latent
            if not places:  # any other guide: its fixed transform, as Pyro's
                try:
                    self.transform = guide.get_transform()
                except (NotImplementedError, TypeError) as e:
                    raise ValueError(
                        f"NeuTraReparam needs a guide with a `get_transform()` that does not "
                        f"depend on the model's arguments; {type(guide).__name__} has none"
                    ) from e
            with ExitStack() as stack:
                for plate in guide.plates.values():
                    stack.enter_context(block_plate(dim=plate.dim, strict=False))
                eps = pyro.sample(f"{name}_shared_latent", guide.get_base_dist().mask(False))
                if places:  # flow and affine only: the placement happens site by site
                    x, ladj = _push(elementary_parts([guide._flow(), guide._affine()]), eps)
                else:
                    x = self.transform(eps)
                    ladj = self.transform.log_abs_det_jacobian(eps, x)
                pyro.factor(f"{name}_shared_latent_log_det", ladj)  # once, outside plates
            self.x_unconstrained = {site["name"]: (site, v) for site, v in guide._unpack_latent(x)}
        site, x = self.x_unconstrained.pop(name)
        log_jac = None
        if places and name in guide._hierarchical and _loc_scale(fn) is None:  # MVN site
            u, log_jac = mvn_placement(*_loc_scale_tril(fn), guide._centering(name), x)
        elif places and name in guide._hierarchical:  # placed from this run's own prior
            loc, scale = _loc_scale(fn)
            u, log_jac = _normal_placement(loc, scale, guide._centering(name), x)
        else:
            u = x
        transform = biject_to(fn.support)
        value = transform(u)
        log_density = 0.0
        if poutine.get_mask() is not False:
            logdet = transform.log_abs_det_jacobian(u, value)
            if log_jac is not None:
                logdet = logdet + log_jac.expand(u.shape)
            logdet = sum_rightmost(logdet, logdet.dim() - value.dim() + fn.event_dim)
            log_density = fn.log_prob(value) + logdet
        return {"fn": dist.Delta(value, log_density, event_dim=fn.event_dim), "value": value,
                "is_observed": True}

    def transform_sample(self, latent):
        """Model-site draws (a dict) from draws of the shared latent, as Pyro's; the
        placement runs the model's prior with the arguments given at construction (else
        those of the guide's first call). A batch of draws that Pyro's unpacking does not
        broadcast against the model's plates is transformed draw by draw."""
        if self._places():
            self.transform = self.guide.get_transform(*self._model_args[0], **self._model_args[1])
        elif self.transform is None:  # before any run of the reparameterised model
            self.transform = self.guide.get_transform()
        batch = latent.shape[:-1]
        try:  # vectorised: draws left of the plates (e.g. padded with a dim of size 1)
            return super().transform_sample(latent)
        except RuntimeError:
            if not batch:
                raise
        draws = [super(NeuTraReparam, self).transform_sample(z) for z in latent.reshape(-1, latent.shape[-1])]
        return {name: torch.stack([d[name] for d in draws]).reshape(batch + draws[0][name].shape)
                for name in draws[0]}
