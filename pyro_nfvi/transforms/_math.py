"""The closed-form pieces of the planar and radial maps, shared by the single-layer,
stacked, fused and compiled paths."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def planar_u_hat(u: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(u_hat, q)`` with ``q = 1 + w·u_hat > 0`` (shape ``(..., 1)``).

    ``‖w‖²`` is floored at ``eps²`` so that ``w = 0`` gives ``u_hat = u`` (the map is
    then a translation and already invertible) instead of NaN.
    """
    a = (w * u).sum(-1, keepdim=True)
    sp = F.softplus(a)
    wnorm2 = (w * w).sum(-1, keepdim=True)
    floor = torch.finfo(wnorm2.dtype).eps ** 2
    denom = wnorm2.clamp_min(floor)
    u_hat = u + (sp - 1 - a) * (w / denom)
    # s = 1 except where ||w||^2 < floor; q = 1 + w.u_hat without cancellation.
    s = wnorm2 / denom
    q = sp * s + (1 + a) * (1 - s)
    return u_hat, q.clamp_min(torch.finfo(q.dtype).tiny)


def planar_log_det(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``log(1 + (q-1)(1-t²))`` computed as ``log(t² + q(1-t²))`` (no cancellation)."""
    t2 = t * t
    return torch.log(torch.addcmul(t2, q, 1 - t2).clamp_min(torch.finfo(t.dtype).tiny))


def _log_pos(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def radial_ab(alpha_prime: torch.Tensor, beta_prime: torch.Tensor):
    """Return ``(alpha, beta, s)`` with ``alpha > 0`` and ``s = alpha + beta > 0``."""
    alpha = F.softplus(alpha_prime)
    s = F.softplus(beta_prime)
    return alpha, s - alpha, s


def radial_log_det(r, alpha, s, input_dim: int) -> torch.Tensor:
    """Log-det of the radial map at distance ``r`` from the centre (shape ``(..., 1)``)."""
    log_ar = _log_pos(alpha + r)
    ld = _log_pos(alpha * s + r * (2 * alpha + r)) - 2 * log_ar
    if input_dim > 1:
        ld = ld + (input_dim - 1) * (_log_pos(s + r) - log_ar)
    return ld
