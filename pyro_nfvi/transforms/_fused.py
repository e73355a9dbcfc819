"""Hand-written forward/backward for K-layer planar and radial stacks.

A K-layer stack is latency-bound: with batch 256 and D = 2 every tensor op costs a few
microseconds of dispatch whatever its size, and autograd roughly triples the op count.
These ``autograd.Function``s run the layer loop with ~4 ops per layer forward and ~5
backward, and return the per-layer activations (``t`` for planar, ``r`` for radial) so
that the log-det, a cheap vectorised function of them, is differentiated by autograd.

Only used for unbatched parameters (``(K, D)``), the case of a learnable stack; the
conditional (batched-parameter) case and ``torch.compile`` use the plain autograd loop.
Both paths compute the same map (checked in the tests).
"""

from __future__ import annotations

from typing import Tuple

import torch


class _PlanarStack(torch.autograd.Function):
    """``(x (N, D), u_hat (K, D), w (K, D), b (K,)) -> (y (N, D), t (N, K))``."""

    @staticmethod
    def forward(ctx, x, u_hat, w, b):
        N, K = x.shape[0], w.shape[0]
        xs = torch.empty((K + 1,) + x.shape, dtype=x.dtype, device=x.device)
        t = torch.empty((K, N), dtype=x.dtype, device=x.device)
        xs[0] = x
        # unbind once: per-layer indexing would cost a dispatch per access
        xs_, t_, u_, w_, b_ = xs.unbind(0), t.unbind(0), u_hat.unbind(0), w.unbind(0), b.unbind(0)
        for k in range(K):
            torch.addmv(b_[k], xs_[k], w_[k], out=t_[k]).tanh_()
            torch.addr(xs_[k], t_[k], u_[k], out=xs_[k + 1])
        ctx.save_for_backward(xs, t, u_hat, w)
        return xs_[K].clone(), t.t()

    @staticmethod
    def backward(ctx, gy, gt):
        xs, t, u_hat, w = ctx.saved_tensors
        K = w.shape[0]
        sech2 = 1 - t * t  # (K, N)
        dz = torch.empty_like(t)
        gys = torch.empty_like(xs)  # gys[k + 1]: gradient w.r.t. layer k's output
        gys[K] = gy
        g_, dz_, s_ = gys.unbind(0), dz.unbind(0), sech2.unbind(0)
        gt_, u_, w_ = gt.t().contiguous().unbind(0), u_hat.unbind(0), w.unbind(0)
        for k in reversed(range(K)):
            # dL/dz = (g . u_hat_k + dL/dt_k) * (1 - t_k^2)
            torch.addmv(gt_[k], g_[k + 1], u_[k], out=dz_[k]).mul_(s_[k])
            torch.addr(g_[k + 1], dz_[k], w_[k], out=g_[k])
        g_u = torch.bmm(t.unsqueeze(1), gys[1:]).squeeze(1)  # sum_n t_kn * g_kn
        g_w = torch.bmm(dz.unsqueeze(1), xs[:K]).squeeze(1)
        return g_[0], g_u, g_w, dz.sum(1)


class _RadialStack(torch.autograd.Function):
    """``(x (N, D), x0 (K, D), alpha (K,), beta (K,)) -> (y (N, D), r (N, K))``."""

    @staticmethod
    def forward(ctx, x, x0, alpha, beta):
        N, K = x.shape[0], x0.shape[0]
        diffs = torch.empty((K,) + x.shape, dtype=x.dtype, device=x.device)
        r = torch.empty((K, N), dtype=x.dtype, device=x.device)
        d_, r_, x0_ = diffs.unbind(0), r.unbind(0), x0.unbind(0)
        for k in range(K):
            torch.sub(x, x0_[k], out=d_[k])
            torch.linalg.vector_norm(d_[k], dim=1, out=r_[k])
            h = torch.add(r_[k], alpha[k]).reciprocal_().mul_(beta[k])
            x = torch.addcmul(x, d_[k], h.unsqueeze(1))
        ctx.save_for_backward(diffs, r, alpha, beta)
        return x, r.t()

    @staticmethod
    def backward(ctx, gy, gr):
        diffs, r, alpha, beta = ctx.saved_tensors
        K = alpha.shape[0]
        a = alpha.unsqueeze(1) + r  # (K, N)
        phi = beta.unsqueeze(1) / a
        dphi = -phi / a
        inv_r = 1 / r.clamp_min(torch.finfo(r.dtype).tiny)  # r = 0 implies d = 0
        gdots = torch.empty_like(r)
        gds = torch.empty_like(diffs)  # gradient w.r.t. each layer's x - x0
        d_, gd_, gdot_ = diffs.unbind(0), gds.unbind(0), gdots.unbind(0)
        gr_, phi_, dphi_, inv_r_ = gr.t().unbind(0), phi.unsqueeze(2).unbind(0), dphi.unbind(0), inv_r.unbind(0)
        g = gy
        for k in reversed(range(K)):
            torch.linalg.vecdot(g, d_[k], out=gdot_[k])
            # y = x + phi(r) d: dL/dd = phi g + (phi'(r) (g.d) + dL/dr) d / r
            coef = torch.addcmul(gr_[k], dphi_[k], gdot_[k]).mul_(inv_r_[k])
            torch.addcmul(g * phi_[k], d_[k], coef.unsqueeze(1), out=gd_[k])
            g = g + gd_[k]
        g_x0 = -gds.sum(1)
        g_beta = (gdots / a).sum(1)
        g_alpha = (gdots * dphi).sum(1)
        return g, g_x0, g_alpha, g_beta


def use_fused(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the hand-written stack applies: unbatched params, eager mode, and
    no higher-order autograd tracing."""
    if any(p.dim() != 2 for p in params):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return x.dim() >= 1 and x.dtype == params[0].dtype


def planar_stack(x, u_hat, w, b) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, t)`` of K planar layers; ``x`` of any batch shape."""
    shape = x.shape
    y, t = _PlanarStack.apply(x.reshape(-1, shape[-1]), u_hat, w, b.reshape(-1))
    return y.reshape(shape), t.reshape(shape[:-1] + (w.shape[0],))


def radial_stack(x, x0, alpha, beta) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, r)`` of K radial layers; ``x`` of any batch shape."""
    shape = x.shape
    y, r = _RadialStack.apply(x.reshape(-1, shape[-1]), x0, alpha.reshape(-1), beta.reshape(-1))
    return y.reshape(shape), r.reshape(shape[:-1] + (x0.shape[0],))
