"""Sticking the landing: the surrogate ``log q`` whose gradient is the path term only, and
the push of the score ``∇ log q`` forward through the layers without an inverse."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.distributions.transforms import Transform

import pyro.distributions as dist
from pyro.distributions.transforms import LowerCholeskyAffine

from .affine import ScaledUnitLowerAffine


@torch.no_grad()
def _push_score(
    t: Transform, x: torch.Tensor, score: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(t(x), ∇ log density)`` pushed through one elementary transform without an
    inverse solve, or ``None`` where the transform does not say how."""
    if hasattr(t, "push_score"):  # this package's flows
        return t.push_score(x, score)
    pushed = _affine_score(t, score)
    return None if pushed is None else (t(x), pushed)


def _affine_score(t: Transform, score: torch.Tensor) -> Optional[torch.Tensor]:
    """The score pushed through the guide's affine layer (``None``: not one of them)."""
    if isinstance(t, dist.transforms.AffineTransform) and t.event_dim == 1:
        return score / t.scale
    if isinstance(t, ScaledUnitLowerAffine):
        return t.pushed_score(score)
    if isinstance(t, LowerCholeskyAffine):
        tril = t.scale_tril
        s = torch.linalg.solve_triangular(tril.mT, score.unsqueeze(-1), upper=True)
        return s.squeeze(-1)
    return None


@torch.no_grad()
def push_score_through(t: Transform, x: torch.Tensor, score: torch.Tensor) -> Optional[torch.Tensor]:
    """The score ``∇ log density`` of ``x`` pushed through the elementary transform ``t``
    (the score of ``t(x)``), or ``None`` where ``t`` does not say how; what
    :func:`stl_log_q` does per part, for a caller that already has ``t(x)``."""
    if hasattr(t, "push_score"):
        return t.push_score(x.detach(), score)[1]
    return _affine_score(t, score)


def initial_score(eps: torch.Tensor, base_score: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The base score the push starts from: ``base_score``, or the standard normal's
    ``-ε``; no gradient."""
    return -eps.detach() if base_score is None else base_score.detach()


def stl_surrogate(log_q: torch.Tensor, z: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    r"""``log q(z)`` whose gradient is the path term only: value ``log_q``, gradient
    :math:`\nabla_z \log q \cdot \partial z / \partial\phi` with ``score`` =
    :math:`\nabla_z \log q(z)` held fixed."""
    return log_q.detach() + (score * (z - z.detach())).sum(-1)


def autograd_score(z: torch.Tensor, log_prob: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``∇_z log q(z)`` by autograd through ``log_prob`` (the transforms' inverses): the
    fallback where a part cannot push the score."""
    z_ = z.detach().requires_grad_()
    with torch.enable_grad():
        (score,) = torch.autograd.grad(log_prob(z_).sum(), z_)
    return score


def stl_log_q(
    parts: Sequence[Transform],
    eps: torch.Tensor,
    z: torch.Tensor,
    log_q: torch.Tensor,
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    base_score: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""``log q(z)`` with the gradient of sticking the landing (Roeder, Wu & Duvenaud
    2017): the value is unchanged, but its gradient is only the path term
    :math:`\nabla_z \log q_{\bar\phi}(z) \cdot \partial z / \partial\phi` — the
    score-function term, whose expectation is zero, is dropped.

    ``z`` is the elementary transforms ``parts`` applied to the base noise ``eps``, whose
    score :math:`\nabla_\epsilon \log q_0(\epsilon)` is ``base_score`` (default: the
    standard normal's, :math:`-\epsilon`; a Student-t base's is
    :math:`-(\nu + 1)\epsilon/(\nu + \epsilon^2)`). The score :math:`\nabla_z \log
    q(z)` at the sample is pushed forward from the base noise layer by layer (``push_score``: Sherman–Morrison for planar/radial, no
    inverse solve); if any part lacks it, the score is computed by autograd through
    ``log_prob`` (the transforms' inverses).

    This is the reference; the guide's posterior pushes the score in its forward pass
    instead (``call_ladj_and_push`` of the fused stacks, :func:`push_score_through`
    elsewhere), with the same values."""
    x = eps.detach()
    score = initial_score(eps, base_score)  # ∇ log N(ε; 0, I) = -ε
    for t in parts:
        pushed = _push_score(t, x, score)
        if pushed is None:
            score = None
            break
        x, score = pushed
    if score is None:
        score = autograd_score(z, log_prob)
    return stl_surrogate(log_q, z, score)


def score_unavailable(parts: Sequence[Transform], dim: int, like: torch.Tensor) -> Optional[str]:
    """Why the score ``∇ log q`` cannot be had through ``parts`` (a message), or ``None``:
    every part must push it (``push_score``) or invert a value it did not make (the
    autograd fallback); Pyro's planar, radial and Sylvester layers, for instance, only
    invert their cached outputs. Probed with one zero vector, without gradients."""
    if all(hasattr(t, "push_score") for t in parts):  # this package's layers: nothing to run
        return None
    x = torch.zeros(1, dim, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        for t in parts:
            y = t(x)
            if not hasattr(t, "push_score"):
                try:
                    t.inv(y.clone())
                except (NotImplementedError, KeyError, RuntimeError) as e:
                    return f"{type(t).__name__} has no score push and no inverse ({type(e).__name__})"
            x = y
    return None
