"""The closed-form pieces of the planar and radial maps, shared by the single-layer,
stacked, fused and compiled paths.

Written against an array namespace ``xp``: torch (the default, differentiable by autograd)
or NumPy (the hand-written CPU kernel of :mod:`._fused`), so every path evaluates the same
formulas.
"""

from __future__ import annotations

import math

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

#: Sylvester layers: ``log q_i`` and ``log R_tilde_ii`` lie in ``[-DIAG_BOUND, DIAG_BOUND]``,
#: off-diagonals in ``(-OFFDIAG_BOUND, OFFDIAG_BOUND)`` (see :mod:`.sylvester`)
DIAG_BOUND = 1.0
OFFDIAG_BOUND = 10.0
#: ``c = log(e - 1)`` in the planar constraint ``û = u + (softplus(w·u + c) - 1 - w·u) w/‖w‖²``:
#: ``softplus(c) = 1``, so ``u = 0`` gives ``û = 0`` and ``û`` stays bounded by ``|u|`` as
#: ``w -> 0`` (R&M's ``c = 0`` gives ``û -> (log 2 - 1) w/‖w‖²``, unbounded; see planar.py)
PLANAR_U_SHIFT = math.log(math.e - 1)
_SOFTPLUS_THRESHOLD = 20.0  # torch's default: softplus(a) = a above it


def maximum(xp, a, v: float):
    """``max(a, v)`` elementwise (``np.clip`` costs ~10x a ufunc call)."""
    return np.maximum(a, v) if xp is np else a.clamp_min(v)


def softplus(xp, a):
    """``log(1 + e^a)``, exactly as :func:`torch.nn.functional.softplus` computes it."""
    if xp is not np:
        return F.softplus(a)
    return np.where(a > _SOFTPLUS_THRESHOLD, a, np.log1p(np.exp(np.minimum(a, _SOFTPLUS_THRESHOLD))))


def softplus_grad(xp, a):
    """The derivative of :func:`softplus` as torch's autograd computes it (1 above 20)."""
    z = xp.exp(np.minimum(a, _SOFTPLUS_THRESHOLD) if xp is np else a.clamp_max(_SOFTPLUS_THRESHOLD))
    return xp.where(a > _SOFTPLUS_THRESHOLD, 1.0, z / (z + 1))


def rowdot(xp, a, b):
    """``(a * b).sum(-1)`` with the last dim kept; in NumPy for long rows one pass
    (``einsum``) without the ``a * b`` temporary (D ≥ 10⁴ latents: memory-bound)."""
    if xp is np and a.shape[-1] >= 64:
        return np.einsum("...d,...d->...", a, b)[..., None]
    return (a * b).sum(-1)[..., None]


def planar_u_hat_parts(u, w, xp=torch):
    """``(u_hat, q, (a, sp, den, coef, s))`` with ``u_hat = u + coef w``,
    ``coef = (softplus(a + c) - 1 - a) / den``, ``a = w·u``, ``c = log(e - 1)``,
    ``den = max(‖w‖², eps²)``,
    ``s = ‖w‖² / den`` and ``q = 1 + w·u_hat > 0``, all of shape ``(..., 1)`` but ``u_hat``.
    The extra parts are what the hand-written gradient needs.

    ``‖w‖²`` is floored at ``eps²`` so that ``w = 0`` gives ``u_hat = u`` (the map is
    then a translation and already invertible) instead of NaN; ``q`` is written without
    cancellation, ``q = softplus(a + c) s + (1 + a)(1 - s)``; ``sp`` is ``softplus(a + c)``.
    """
    a = rowdot(xp, w, u)
    wn2 = rowdot(xp, w, w)
    sp = softplus(xp, a + PLANAR_U_SHIFT)
    den = maximum(xp, wn2, xp.finfo(wn2.dtype).eps ** 2)
    coef = (sp - 1 - a) / den
    s = wn2 / den  # 1 except where ‖w‖² < eps²
    q = maximum(xp, sp * s + (1 + a) * (1 - s), xp.finfo(wn2.dtype).tiny)
    return u + coef * w, q, (a, sp, den, coef, s)


def planar_u_hat(u: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(u_hat, q)`` with ``q = 1 + w·u_hat > 0`` (shape ``(..., 1)``), see
    :func:`planar_u_hat_parts`."""
    u_hat, q, _ = planar_u_hat_parts(u, w)
    return u_hat, q


def planar_det_parts(t, q, xp=torch):
    """``(det J, h')``: ``det J = 1 + (q-1)(1-t²)`` of a planar layer with
    ``t = tanh(w·x + b)``, computed as ``t² + q(1-t²)`` (no cancellation), and the
    ``h' = 1 - t²`` it used (the fused kernels keep it for their backward and score push)."""
    t2 = t * t
    h1 = 1 - t2
    return maximum(xp, t2 + q * h1, xp.finfo(t2.dtype).tiny), h1


def planar_det(t, q, xp=torch):
    """``det J`` of a planar layer, see :func:`planar_det_parts`."""
    return planar_det_parts(t, q, xp)[0]


def planar_log_det(t, q, xp=torch):
    """``log det J`` of a planar layer, see :func:`planar_det`."""
    return xp.log(planar_det(t, q, xp))


def radial_ab(alpha_prime, beta_prime, xp=torch):
    """Return ``(alpha, beta, s)`` with ``alpha > 0`` and ``s = alpha + beta > 0``."""
    alpha = softplus(xp, alpha_prime)
    s = softplus(xp, beta_prime)
    return alpha, s - alpha, s


def radial_norm(d: torch.Tensor) -> torch.Tensor:
    """``‖d‖`` over the last dim (kept). In low precision the squares are summed in
    float64: in float32 ``d²`` overflows from ``|d| ≈ 2e19`` (``r = inf`` then gives NaN)."""
    if d.dtype in (torch.float16, torch.bfloat16, torch.float32) and d.device.type != "mps":
        return torch.linalg.vector_norm(d, dim=-1, keepdim=True, dtype=torch.float64).to(d.dtype)
    return torch.linalg.vector_norm(d, dim=-1, keepdim=True)


def radial_log_det(r, alpha, s, input_dim: int, xp=torch):
    """Log-det of the radial map at distance ``r`` from the centre, with
    ``h = 1/(alpha + r)``:
    ``(D-1)(log(s+r) - log(alpha+r)) + log(alpha h · s h + r h (2 alpha h + r h))``.

    The last term is ``log((alpha s + 2 alpha r + r²) / (alpha + r)²)`` with every factor
    scaled by ``h`` first: positive terms only (no cancellation as ``beta -> -alpha``)
    and no overflow of ``r²`` for large ``r``."""
    tiny = xp.finfo(r.dtype).tiny
    a = maximum(xp, alpha + r, tiny)
    ah, rh = alpha / a, r / a
    ld = xp.log(maximum(xp, ah * (s / a) + rh * (2 * ah + rh), tiny))
    if input_dim > 1:
        ld = ld + (input_dim - 1) * (xp.log(maximum(xp, s + r, tiny)) - xp.log(a))
    return ld


# The plain autograd loops of K stacked layers (parameters stacked along dim -2, with any
# batch dims): the reference every kernel route is checked against, the route of
# batched (conditioned) parameters, and the differentiable recompute of a double backward.
# They live here, not in the layer modules, so that the kernels of :mod:`._fused` need
# nothing from :mod:`.planar` / :mod:`.radial` (no import cycle).


def planar_stack_loop(x, bias, u, w) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of K planar layers ``(bias (..., K, 1), u, w (..., K, D))``,
    one layer at a time, the log-dets of all layers in one op from the activations."""
    u_hat, q = planar_u_hat(u, w)
    ts = []
    for k in range(w.shape[-2]):
        t = torch.tanh((x * w[..., k, :]).sum(-1, keepdim=True) + bias[..., k, :])
        x = x + u_hat[..., k, :] * t
        ts.append(t)
    t = torch.cat(ts, dim=-1)
    return x, planar_log_det(t, q.squeeze(-1)).sum(-1)


def radial_stack_loop(x, x0, alpha_prime, beta_prime) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of K radial layers ``(x0 (..., K, D), α', β' (..., K, 1))``,
    one layer at a time, the log-dets of all layers in one op from the radii."""
    alpha, beta, s = radial_ab(alpha_prime, beta_prime)
    rs = []
    for k in range(x0.shape[-2]):
        diff = x - x0[..., k, :]
        r = radial_norm(diff)
        x = x + (beta[..., k, :] / (alpha[..., k, :] + r)) * diff
        rs.append(r)
    r = torch.cat(rs, dim=-1)
    return x, radial_log_det(r, alpha.squeeze(-1), s.squeeze(-1), x0.shape[-1]).sum(-1)


def split_planar_theta(theta, D: int):
    """``(bias, u, w)`` from packed ``theta = [u | w | b]`` (``(..., K, 2D+1)``)."""
    return theta[..., 2 * D :], theta[..., :D], theta[..., D : 2 * D]


def split_radial_theta(theta, D: int):
    """``(x0, α', β')`` from packed ``theta = [x0 | α' | β']`` (``(..., K, D+2)``)."""
    return theta[..., :D], theta[..., D : D + 1], theta[..., D + 1 :]
