"""The guide's variational distribution: the flow it is built from, and :class:`_FlowPosterior`,
the base (``N(0, I)``, or a Student-t with learnable degrees of freedom) pushed through
``[flow, affine]`` in one pass that also yields ``log q``."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, List

import torch
from torch.distributions.transforms import ComposeTransform, Transform
from torch.distributions.utils import _standard_normal

import pyro.distributions as dist
from pyro.distributions.transforms import ComposeTransformModule
from pyro.distributions.util import sum_rightmost

from ..transforms._base import LadjCacheMixin
from .stl import autograd_score, initial_score, push_score_through, stl_surrogate

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _flatten_transform(t: Transform) -> Iterator[Transform]:
    """Yield the elementary parts of a (possibly nested) composed transform."""
    if isinstance(t, ComposeTransform):
        for part in t.parts:
            yield from _flatten_transform(part)
    else:
        yield t


def build_flow(init_transform_fn, latent_dim: int, like: torch.Tensor) -> Transform:
    """The flow ``init_transform_fn(latent_dim)`` (a list is composed), on ``like``'s
    device and dtype."""
    transform = init_transform_fn(latent_dim)
    if isinstance(transform, (list, tuple)):
        transform = ComposeTransformModule(list(transform))
    if not isinstance(transform, Transform):
        raise TypeError(
            "init_transform_fn must return a torch.distributions.Transform "
            f"(or a list of them), but returned {type(transform).__name__}"
        )
    if isinstance(transform, torch.nn.Module):
        transform = transform.to(device=like.device, dtype=like.dtype)
    # a flow of the wrong size would otherwise fail inside the first step: this package's
    # layers say their size; others are probed with one zero vector (in eval mode, so
    # that no module updates running statistics on it)
    dims = [getattr(t, "input_dim", None) for t in _flatten_transform(transform)]
    if dims and all(isinstance(d, int) for d in dims):
        if any(d != latent_dim for d in dims):
            raise ValueError(
                f"init_transform_fn({latent_dim}) returned a transform of input_dim {dims}, but "
                f"the model's latent dimension is {latent_dim}"
            )
        return transform
    try:
        with eval_mode(transform), torch.no_grad():
            transform(torch.zeros(1, latent_dim, dtype=like.dtype, device=like.device))
    except Exception as e:
        raise ValueError(
            f"init_transform_fn({latent_dim}) returned a transform that does not map vectors of "
            f"the model's latent dimension {latent_dim}: {type(e).__name__}: {e}"
        ) from e
    return transform


@contextlib.contextmanager
def eval_mode(module) -> Iterator[None]:
    """Run a block with ``module`` (a ``torch.nn.Module``; anything else is left alone) in
    eval mode, each submodule's own mode restored after: a probe run must not update
    running statistics (BatchNorm) on inputs the model never sees."""
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, torch.nn.Module) else []
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, training in modes:
            m.training = training


def elementary_parts(transforms) -> List[Transform]:
    """The elementary transforms of a list of (possibly composed) transforms, in order."""
    return [t for outer in transforms for t in _flatten_transform(outer)]


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

    def with_transforms(self, transforms, base_dist=None) -> "_FlowPosterior":
        """A copy with new transforms (and base, if given) of the same shapes: skips the
        shape checks of ``__init__`` (a guide calls this every step; only the parameters
        change)."""
        new = copy.copy(self)
        new.transforms = transforms
        if base_dist is not None:
            new.base_dist = base_dist
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
        return self._push(x, log_q)

    def _push(self, x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Push base draws ``x`` (log-density ``log_q``) through the transforms, one pass
        each for the value and the log-det; remember ``(z, log q(z))``.

        Sticking the landing needs the score ``∇ log q`` at the sample: it is pushed
        through the parts in the same loop, by the fused stacks in the same kernel call
        as the value (``call_ladj_and_push``) and by :func:`~.stl.push_score_through`
        elsewhere, with the values of the reference :func:`~.stl.stl_log_q`."""
        eps = x
        event_dim = len(self.event_shape)
        parts = elementary_parts(self.transforms)
        stl = self._stl and torch.is_grad_enabled()
        score = initial_score(eps, self._base_score(eps)) if stl else None
        for t in parts:
            if score is not None and hasattr(t, "call_ladj_and_push"):
                y, ladj, score = t.call_ladj_and_push(x, score)
            else:
                if isinstance(t, LadjCacheMixin):  # this package's flows: one pass
                    y, ladj = t.call_and_ladj(x)
                else:
                    y = t(x)
                    ladj = t.log_abs_det_jacobian(x, y)
                if score is not None:  # None from here on if t cannot push it
                    score = push_score_through(t, x, score)
            log_q = log_q - sum_rightmost(ladj, event_dim - t.codomain.event_dim)
            x = y
        if stl and x.requires_grad:
            if score is None:  # a part without a score push: autograd through the inverses
                log_prob = lambda z: dist.TransformedDistribution.log_prob(self, z)  # noqa: E731
                score = autograd_score(x, log_prob)
            log_q = stl_surrogate(log_q, x, score)
        self._nfvi_last = (x, log_q)
        return x

    def _base_score(self, eps: torch.Tensor):
        """``∇_ε log q_0(ε)`` of the base at the noise ``eps`` (``None``: standard normal,
        ``-ε``); by autograd through the base's ``log_prob`` in ``ε`` alone otherwise."""
        if self._standard_base:
            return None
        x = eps.detach().requires_grad_()
        with torch.enable_grad():
            (score,) = torch.autograd.grad(self.base_dist.log_prob(x).sum(), x)
        return score

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            x = self.rsample(sample_shape)
        return x

    def log_prob(self, value):
        last = getattr(self, "_nfvi_last", None)
        if last is not None and value is last[0]:
            return last[1]
        return super().log_prob(value)
