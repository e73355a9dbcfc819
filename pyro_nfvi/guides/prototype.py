"""What the guide learns from tracing the model once: which sites it covers, their
unconstrained shapes and plates, and the checks that the model still matches later."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch.distributions import biject_to

import pyro.poutine as poutine
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.utils import helpful_support_errors

from .._rng import fork_rng


def _hide_from_prototype(msg) -> bool:
    # Like Pyro's prototype_hide_fn, but also hide discrete sites that the user
    # has configured for enumeration: TraceEnum_ELBO marginalises them out.
    if prototype_hide_fn(msg):
        return True
    if msg["type"] == "sample" and msg["infer"].get("enumerate"):
        support = getattr(msg["fn"], "support", None)
        return bool(getattr(support, "is_discrete", False))
    return False


def _arg_shapes(args, kwargs) -> tuple:
    """What of the model's arguments can change the latent shapes: tensor and array shapes,
    integers (Python or NumPy) and the lengths of lists and tuples."""
    def key(a):
        if torch.is_tensor(a) or isinstance(a, np.ndarray):
            return tuple(a.shape)
        if isinstance(a, numbers.Integral) and not isinstance(a, bool):
            return int(a)
        if isinstance(a, (list, tuple)):
            return ("len", len(a))
        return None
    return tuple(map(key, args)), tuple(sorted((k, key(v)) for k, v in kwargs.items()))


def latent_layout(prototype_trace, guide_name: str
                  ) -> Tuple[Dict[str, torch.Size], Dict[str, tuple]]:
    """``(shapes, stacks)``: each latent site's unconstrained shape and plate stack, in
    model order. Raises a ``ValueError`` for what a flow guide over the whole latent space
    cannot learn: discrete sites, local sites of a subsampled plate, no latent at all."""
    shapes, stacks = {}, {}
    for site_name, site in prototype_trace.iter_stochastic_nodes():
        support = site["fn"].support
        if support.is_discrete:
            raise ValueError(
                f"{guide_name} cannot handle the discrete latent site '{site_name}' "
                f"({type(site['fn']).__name__}). Enumerate it "
                f"(pyro.sample(..., infer={{'enumerate': 'parallel'}}) with "
                f"TraceEnum_ELBO) or marginalise it out of the model."
            )
        with helpful_support_errors(site):
            shapes[site_name] = biject_to(support).inv(site["value"]).shape
        stacks[site_name] = site["cond_indep_stack"]
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size < frame.full_size:
                raise ValueError(
                    f"{guide_name} cannot learn the local latent site '{site_name}' of the "
                    f"subsampled plate '{frame.name}' (size {frame.size} of "
                    f"{frame.full_size}): it would learn one posterior per subsample "
                    "slot, not per data row. Use pyro_nfvi.amortized.AutoAmortizedFlow "
                    "(an amortized flow for the plate's local latents), or do not "
                    "subsample that plate."
                )
    if not shapes:
        raise ValueError(
            f"{guide_name} found no continuous latent sites in the model (its sample sites "
            "are observed, or discrete and enumerated, which TraceEnum_ELBO marginalises); "
            "use an empty guide instead, e.g. `lambda *a, **k: None`."
        )
    return shapes, stacks


def check_latent_shapes(model: Callable, hide_fn: Callable, prototype_trace, guide_name: str,
                        args, kwargs, observed: frozenset = frozenset()) -> None:
    """Re-run ``model`` (its random stream forked, the sites ``hide_fn`` hides blocked) and
    check that every latent site kept the shape it had in ``prototype_trace``. Sites in
    ``observed`` (observed at setup) may now be latent: the model samples them, as under
    Pyro's guides (``Predictive`` with the data left out)."""
    model = poutine.block(model, hide_fn)
    with fork_rng():  # leave the user's random stream alone
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    for name, site in trace.iter_stochastic_nodes():
        if name in observed and name not in prototype_trace.nodes:
            continue
        old = prototype_trace.nodes.get(name)
        if old is None or old["value"].shape != site["value"].shape:
            before = None if old is None else tuple(old["value"].shape)
            raise ValueError(
                f"{guide_name} was set up for the latent site '{name}' with "
                f"shape {before}, but the model now gives it shape "
                f"{tuple(site['value'].shape)}: create a new guide for the new data "
                "(or use pyro_nfvi.amortized.AutoAmortizedFlow for per-datum latents)."
            )


class SiteLayout:
    """Where each latent site lies in the guide's packed latent vector, read once from the
    prototype trace: what ``AutoContinuous._unpack_latent`` recomputes on every call (it
    walks the trace and broadcasts each site's shape), which a guide pays every step.

    :param prototype_trace: the guide's prototype trace (the layout is valid while the
        guide keeps this trace: see :meth:`of`).
    :param unconstrained_shapes: each site's unconstrained shape, in model order.
    """

    #: the batch shapes whose per-site view shapes are kept (a guide sees one or two)
    MAX_BATCH_SHAPES = 8

    def __init__(self, prototype_trace, unconstrained_shapes: Dict[str, torch.Size]) -> None:
        self.trace = prototype_trace
        self.fns: Dict[str, object] = {}
        self.sites = []  # (name, start, size, unconstrained shape, event dim)
        pos = 0
        for name, site in prototype_trace.iter_stochastic_nodes():
            shape = unconstrained_shapes[name]
            size = math.prod(shape)
            event_dim = site["fn"].event_dim + len(shape) - len(site["value"].shape)
            self.sites.append((name, pos, size, shape, event_dim))
            self.fns[name] = site["fn"]
            pos += size
        self._view_shapes: Dict[torch.Size, list] = {}

    @classmethod
    def of(cls, guide) -> "SiteLayout":
        """The layout of ``guide`` (an ``AutoContinuous`` guide after setup), built on first
        use and again whenever the guide's prototype trace is replaced."""
        layout = guide.__dict__.get("_nfvi_site_layout")
        if layout is None or layout.trace is not guide.prototype_trace:
            layout = cls(guide.prototype_trace, guide._unconstrained_shapes)
            guide.__dict__["_nfvi_site_layout"] = layout
        return layout

    def split(self, latent: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{site: unconstrained value}``: the same views of ``latent (..., D)`` as
        ``AutoContinuous._unpack_latent`` (a site's shape broadcast against the batch
        shape of ``latent``)."""
        batch_shape = latent.shape[:-1]
        shapes = self._view_shapes.get(batch_shape)
        if shapes is None:
            if len(self._view_shapes) >= self.MAX_BATCH_SHAPES:
                self._view_shapes.clear()
            shapes = self._view_shapes[batch_shape] = [
                torch.broadcast_shapes(shape, batch_shape + (1,) * event_dim)
                for _, _, _, shape, event_dim in self.sites
            ]
        return {
            name: latent.narrow(-1, pos, size).view(view_shape)  # narrow: no index parsing
            for (name, pos, size, _, _), view_shape in zip(self.sites, shapes)
        }
