"""Posterior summaries of a flow guide, which has no closed form: marginal quantiles and
medians estimated from one vectorised draw of the whole guide."""

from __future__ import annotations

from typing import Dict, Sequence, Union

import torch

import pyro
import pyro.poutine as poutine


@torch.no_grad()
def constrained_samples(guide, num_samples: int, args, kwargs) -> Dict[str, torch.Tensor]:
    """``num_samples`` draws of every latent site of ``guide``, in constrained space,
    stacked on a new leading dimension."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    guide._check_setup(*args, **kwargs)
    # one vectorised draw of the whole guide, in a sample plate left of the model's
    nesting = max([-f.dim for f in guide._prototype_frames.values()], default=0)
    with poutine.block(), pyro.plate("_nfvi_draws", num_samples, dim=-nesting - 1):
        values = guide(*args, **kwargs)
    return {
        name: value.reshape((num_samples,) + guide.prototype_trace.nodes[name]["value"].shape)
        for name, value in values.items()
    }


@torch.no_grad()
def sample_quantiles(
    guide, quantiles: Union[Sequence[float], torch.Tensor], num_samples: int, args, kwargs
) -> Dict[str, torch.Tensor]:
    """Per-coordinate quantiles of :func:`constrained_samples` (see
    :meth:`~pyro_nfvi.guides.AutoNormalizingFlow.quantiles`)."""
    samples = constrained_samples(guide, num_samples, args, kwargs)
    qs = torch.as_tensor(quantiles, dtype=guide.loc.dtype, device=guide.loc.device)
    if qs.dim() != 1 or ((qs < 0) | (qs > 1)).any():
        raise ValueError(f"quantiles must be a 1-D sequence in [0, 1], got {quantiles!r}")
    return {
        name: torch.quantile(value.to(qs.dtype), qs, dim=0).to(value.dtype)
        for name, value in samples.items()
    }


class _GuideSummaries:
    """Marginal quantiles and medians of a flow guide (mixed into
    :class:`~pyro_nfvi.guides.AutoNormalizingFlow`, ahead of Pyro's ``AutoContinuous``)."""

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
        return sample_quantiles(self, quantiles, num_samples, args, kwargs)

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
