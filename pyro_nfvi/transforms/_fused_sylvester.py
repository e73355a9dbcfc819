"""A hand-written forward/backward for a learnable K-layer Sylvester stack, and its score push.

The plain autograd path of :class:`~pyro_nfvi.transforms.sylvester.StackedSylvester`
(the reference, kept in :mod:`.sylvester`) costs ~25 small torch ops to build ``Q``,
``R``, ``R~``, ``A = QR`` and ``B = R~Q^T`` and ~10 per layer, each about tripled by
autograd. Here one ``autograd.Function`` takes the raw parameters ``(b, R, R_tilde[, U])``
and does everything (the bounded triangles, the compact-WY Householder product, the K
layers, the summed log-det) with a closed-form backward, written once against an array
namespace ``xp``: NumPy on zero-copy views on CPU (a NumPy call costs ~1 µs, a torch op
~3-5 µs), torch elsewhere. The route is :func:`~pyro_nfvi.transforms._fused.stack_route`'s,
as for the planar and radial stacks; batched (conditioned) parameters use the plain loop.

Backward of the layer loop, with ``z_k`` the input of layer ``k``, ``t = tanh(z_k B_k^T +
b_k)``, ``det = t^2 + q(1 - t^2)`` and ``g`` the gradient at the layer's output:
``g_t = g A_k + ḡ 2t(1 - q)/det``, ``g_a = g_t (1 - t^2)``, ``g_A = g^T t``,
``g_B = g_a^T z_k``, ``g_b = Σ g_a``, ``g_q = Σ ḡ (1 - t^2)/det`` and ``g ← g + g_a B_k``
(``ḡ`` the log-det's upstream gradient). Then back through ``A = QR``, ``B = R~Q^T``,
the bounded triangles (elementwise) and ``Q = I - U T^{-1} U_{:M}^T``,
``T = ½ diag(U^T U) + striu(U^T U)``: with ``X = T^{-1} U_{:M}^T``, ``g_U = -g_Q X^T``,
``g_V = T^{-T}(-U^T g_Q)``, ``g_T = -g_V X^T`` (upper part), ``g_{U_{:M}} += g_V^T`` and
``g_U += U (g_G + g_G^T)`` with ``g_G`` the upper part of ``g_T`` (diagonal halved).
"""

from __future__ import annotations

import math

from typing import Optional, Tuple

import numpy as np
import torch

from . import _fused
from ._fused import FUSED_NUMPY, KERNEL_ROUTES, PLAIN, _kernel_for, _namespace, _strict_triangle, _to_torch
from ._math import DIAG_BOUND, OFFDIAG_BOUND, planar_det_parts

__all__ = ["sylvester_stack_kernel", "sylvester_stack_push_kernel", "sylvester_stack_push_score"]

# Test/benchmark hook: False sends every stack down the plain autograd loop (the
# reference, and "today's" Sylvester stack in benchmarks/bench_sylvester.py).
USE_KERNEL = True

# Above this bottleneck the score push solves its M x M triangular systems with one
# batched solve per layer instead of M vectorised substitution steps.
_PUSH_LOOP_MAX_M = 8


# The score push builds the triangular systems of all layers at once up to this many
# entries (K N M^2; 4 MiB in float32), layer by layer above.
_PUSH_BATCHED_MAX = 1 << 20


# NumPy matrix products up to this many multiply-adds stay in NumPy (measured: one
# thread there, and ~5x faster than torch.matmul on zero-copy views at 256 x 50 x 8);
# larger ones go through torch (see :func:`._fused._mm`).
_NUMPY_GEMM_MAX = 1 << 22


def _mm(xp, a, b):
    return _fused._mm(xp, a, b, numpy_gemm_max=_NUMPY_GEMM_MAX)


def _empty(xp, shape, like):
    return np.empty(shape, like.dtype) if xp is np else like.new_empty(shape)


def _sum_samples(xp, a):
    """``a (K, N, M)`` summed over the samples (axis 1). In NumPy as a product with a
    vector of ones: NumPy reduces a middle or a short last axis elementwise (20x slower
    at 16 x 256 x 8 than the matrix product)."""
    if xp is np:
        return np.ones(a.shape[1], dtype=a.dtype) @ a
    return a.sum(1)


def _set_diag(xp, a, v):
    """``a`` (a fresh array with a zero diagonal, e.g. a strict triangle) with ``v`` written
    on its diagonal in place: one pass over the diagonal, where ``a + diag_embed(v)``
    would build and add a whole ``(..., M, M)`` array."""
    if xp is np:
        np.einsum("...ii->...i", a)[...] = v  # a writeable view of the diagonal
    else:
        a.diagonal(0, -2, -1).copy_(v)
    return a


# From this many right-hand sides, NumPy's (row-major) systems are solved transposed.
_TRANSPOSED_SOLVE_MIN_RHS = 8


def _solve_triangular(xp, a, b, upper: bool):
    # every system here is triangular: a batched triangular solve (torch's, on zero-copy
    # strided views for NumPy) is 1.4-3x faster than NumPy's LU solve at M >= 16
    if xp is not np:
        return torch.linalg.solve_triangular(a, b, upper=upper)
    a, b = torch.from_numpy(a), torch.from_numpy(b)
    if b.shape[-1] >= _TRANSPOSED_SOLVE_MIN_RHS:
        # x = a^{-1} b as x^T = b^T a^{-T}: the transposed views of row-major arrays are
        # the column-major ones LAPACK takes, so nothing is copied (2x faster at
        # 16 x 53 x 53 with 53 right-hand sides; slower for one)
        return torch.linalg.solve_triangular(a.mT, b.mT, upper=not upper, left=False).mT.numpy()
    return torch.linalg.solve_triangular(a, b, upper=upper).numpy()


def _contig(xp, a):
    return np.ascontiguousarray(a) if xp is np else a.contiguous()


def _flip_odd(xp, a, axis):
    """``a (K, ...)`` with layers ``k`` odd flipped along ``axis`` (a copy)."""
    out = a.copy() if xp is np else a.clone()
    if xp is np:
        out[1::2] = np.flip(a[1::2], axis)
    else:
        out[1::2] = a[1::2].flip(axis)
    return out


def _triangles(xp, R_raw, Rt_raw):
    """The bounded triangles of :func:`.sylvester.sylvester_triangles` and what their
    backward needs."""
    th_r = xp.tanh(R_raw.diagonal(0, -2, -1))
    th_s = xp.tanh(Rt_raw.diagonal(0, -2, -1))
    log_q = DIAG_BOUND * th_r
    rt = xp.exp(DIAG_BOUND * th_s)
    q = xp.exp(log_q)
    d = xp.expm1(log_q)
    width = OFFDIAG_BOUND * math.sqrt(R_raw.shape[-1])  # see sylvester._bounded
    th_off_r = xp.tanh(_strict_triangle(xp, R_raw) / width)
    th_off_s = xp.tanh(_strict_triangle(xp, Rt_raw) / width)
    R = _set_diag(xp, OFFDIAG_BOUND * th_off_r, d / rt)  # tanh(0) = 0 on the diagonal
    Rt = _set_diag(xp, OFFDIAG_BOUND * th_off_s, rt)
    return R, Rt, q, (th_r, th_s, rt, q, d, th_off_r, th_off_s)


def _triangles_backward(xp, saved, gR, gRt, gq):
    th_r, th_s, rt, q, d, th_off_r, th_off_s = saved
    gRd, gRtd = gR.diagonal(0, -2, -1), gRt.diagonal(0, -2, -1)
    g_logq = gRd * q / rt + gq * q
    g_rt = gRtd - gRd * d / (rt * rt)
    root_m = math.sqrt(gR.shape[-1])
    g_R = _set_diag(xp, _strict_triangle(xp, gR) * (1 - th_off_r * th_off_r) / root_m,
                    g_logq * DIAG_BOUND * (1 - th_r * th_r))
    g_Rt = _set_diag(xp, _strict_triangle(xp, gRt) * (1 - th_off_s * th_off_s) / root_m,
                     g_rt * rt * DIAG_BOUND * (1 - th_s * th_s))
    return g_R, g_Rt


def _householder(xp, U, M):
    """``Q (K, D, M)`` of :func:`.sylvester.householder_product` and what backward needs."""
    G = U.swapaxes(-1, -2) @ U  # (K, n, n)
    gd = G.diagonal(0, -2, -1)
    floor = xp.finfo(U.dtype).eps ** 2
    keep = gd > floor
    T = _set_diag(xp, _strict_triangle(xp, G), 0.5 * xp.where(keep, gd, floor))
    X = _solve_triangular(xp, T, U[:, :M, :].swapaxes(-1, -2), upper=True)  # (K, n, M)
    eye = np.eye(U.shape[1], M, dtype=U.dtype) if xp is np else torch.eye(U.shape[1], M, dtype=U.dtype, device=U.device)
    return eye - U @ X, (T, X, keep)


def _householder_backward(xp, U, M, saved, gQ):
    T, X, keep = saved
    gU = -(gQ @ X.swapaxes(-1, -2))
    gX = -(U.swapaxes(-1, -2) @ gQ)  # (K, n, M)
    gV = _solve_triangular(xp, T.swapaxes(-1, -2), gX, upper=False)  # (K, n, M)
    gT = -(gV @ X.swapaxes(-1, -2))
    gU[:, :M, :] += gV.swapaxes(-1, -2)
    gG = _set_diag(xp, _strict_triangle(xp, gT), 0.5 * gT.diagonal(0, -2, -1) * keep)
    gU += U @ (gG + gG.swapaxes(-1, -2))
    return gU


def _parts(xp, b, R_raw, Rt_raw, U):
    """``At (K, M, D) = A^T``, ``Bt (K, D, M) = B^T``, ``q``, and what backward needs."""
    M = b.shape[-1]
    R, Rt, q, tri = _triangles(xp, R_raw, Rt_raw)
    if U is not None:
        Q, hh = _householder(xp, U, M)
        At = _contig(xp, R.swapaxes(-1, -2) @ Q.swapaxes(-1, -2))  # (QR)^T
        Bt = _contig(xp, Q @ Rt.swapaxes(-1, -2))  # (R~Q^T)^T
    else:  # triangular: Q = I for even layers, the reversal for odd ones
        Q, hh = None, None
        At = _flip_odd(xp, _contig(xp, R.swapaxes(-1, -2)), -1)  # (P R)^T = R^T P^T
        Bt = _flip_odd(xp, _contig(xp, Rt.swapaxes(-1, -2)), -2)  # (R~ P^T)^T = P R~^T
    return At, Bt, q, (R, Rt, Q, tri, hh)


def _parts_backward(xp, U, M, saved, gAt, gBt, gq):
    R, Rt, Q, tri, hh = saved
    if Q is not None:
        # A = Q R, B = R~ Q^T: g_R = Q^T g_A, g_R~ = g_B Q, g_Q = g_A R^T + g_B^T R~
        gA, gB = gAt.swapaxes(-1, -2), gBt.swapaxes(-1, -2)
        gR = Q.swapaxes(-1, -2) @ gA
        gRt = gB @ Q
        gQ = gA @ R.swapaxes(-1, -2) + gBt @ Rt
        gU = _householder_backward(xp, U, M, hh, gQ)
    else:
        gR = _flip_odd(xp, gAt, -1).swapaxes(-1, -2)
        gRt = _flip_odd(xp, gBt, -2).swapaxes(-1, -2)
        gU = None
    g_R, g_Rt = _triangles_backward(xp, tri, gR, gRt, gq)
    return g_R, g_Rt, gU


def _forward(xp, x, b, R_raw, Rt_raw, U):
    At, Bt, q, parts = _parts(xp, b, R_raw, Rt_raw, U)
    K, N, M = b.shape[0], x.shape[0], b.shape[1]
    zs = _empty(xp, (K + 1,) + tuple(x.shape), x)  # zs[k]: the input of layer k
    ts = _empty(xp, (K, N, M), x)
    zs[0] = x
    for k in range(K):
        xp.tanh(_mm(xp, zs[k], Bt[k]) + b[k], out=ts[k])
        xp.add(zs[k], _mm(xp, ts[k], At[k]), out=zs[k + 1])
    # hp = h'(a), kept for the backward and the score push
    det, hp = planar_det_parts(ts, q[:, None, :], xp)
    ladj = xp.log(det).sum(0).sum(1)  # over layers first: see _sum_samples
    return zs[K], ladj, (At, Bt, q, parts, zs, ts, hp, det)


def _backward(xp, x, b, R_raw, Rt_raw, U, saved, gy, gl):
    At, Bt, q, parts, zs, ts, hp, det = saved
    K, M = b.shape
    A, B = _contig(xp, At.swapaxes(-1, -2)), _contig(xp, Bt.swapaxes(-1, -2))
    gl_det = gl[None, :, None] / det  # (K, N, M)
    gq = _sum_samples(xp, gl_det * hp)
    # dL/da through the log-det (h' turns dL/dt into dL/da in the loop below)
    g_a_ld = gl[None, :, None] * _log_det_grad(ts, hp, det, q[:, None, :])
    # gs[k + 1]: dL/d(output of layer k), written in place layer by layer; gs[0]: dL/dx
    gs = _empty(xp, zs.shape, x)
    gs[K] = gy
    g_as = _empty(xp, ts.shape, x)
    for k in reversed(range(K)):
        g, g_a = gs[k + 1], g_as[k]
        xp.multiply(_mm(xp, g, A[k]), hp[k], out=g_a)
        g_a += g_a_ld[k]
        xp.add(g, _mm(xp, g_a, B[k]), out=gs[k])
    g, gs = gs[0], gs[1:]
    gAt = ts.swapaxes(-1, -2) @ gs  # (K, M, D)
    gBt = zs[:K].swapaxes(-1, -2) @ g_as  # (K, D, M)
    g_R, g_Rt, gU = _parts_backward(xp, U, M, parts, gAt, gBt, gq)
    return g, _sum_samples(xp, g_as), g_R, g_Rt, gU


class _SylvesterStack(torch.autograd.Function):
    """``(x (..., D), b, R, R_tilde, U or None) -> (y, ladj)``; see the module docstring.
    A double backward (``create_graph=True``) recomputes the plain autograd loop and
    differentiates it, as :class:`._fused._FusedStack` does."""

    @staticmethod
    def forward(ctx, x, b, R, Rt, U, route, plain, score):
        tensors = (x, b, R, Rt) + ((U,) if U is not None else ())
        xp, arrays = _namespace(route, *(tensors + ((score,) if score is not None else ())))
        xa, ba, Ra, Rta = arrays[:4]
        Ua = arrays[4] if U is not None else None
        shape = tuple(x.shape)
        xa = xa.reshape(-1, shape[-1])
        with np.errstate(all="ignore"):
            y, ladj, saved = _forward(xp, xa, ba, Ra, Rta, Ua)
            if score is not None:  # the score pushed from the layers' saved quantities
                sy = _push_saved(xp, saved, arrays[-1].reshape(xa.shape))
        ctx.save_for_backward(*tensors)
        ctx.plain = plain
        ctx.saved, ctx.arrays, ctx.shape, ctx.route, ctx.has_U = saved, (xa, ba, Ra, Rta, Ua), shape, route, U is not None
        out = _to_torch(xp, _contig(xp, y).reshape(shape), ladj.reshape(shape[:-1]))
        if score is None:
            return out
        (sy,) = _to_torch(xp, _contig(xp, sy).reshape(shape))
        ctx.mark_non_differentiable(sy)
        return out + (sy,)

    @staticmethod
    def backward(ctx, gy, gl, *unused):  # the pushed score (if any) has no gradient
        tensors = ctx.saved_tensors  # raises if an input was modified in place since forward
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            return _plain_backward(ctx, tensors, gy, gl)
        xp, (gya, gla) = _namespace(ctx.route, gy, gl)
        xa, ba, Ra, Rta, Ua = ctx.arrays
        D = ctx.shape[-1]
        with np.errstate(all="ignore"):
            gx, gb, gR, gRt, gU = _backward(xp, xa, ba, Ra, Rta, Ua, ctx.saved, gya.reshape(-1, D), gla.reshape(-1))
        gx, gb, gR, gRt = _to_torch(xp, _contig(xp, gx).reshape(ctx.shape), gb, gR, gRt)
        if gU is not None:
            (gU,) = _to_torch(xp, gU)
        return gx, gb, gR, gRt, gU, None, None, None


def _plain_backward(ctx, tensors, gy, gl):
    """Vector-Jacobian product of the plain autograd loop, with its graph kept."""
    x, params = tensors[0], tuple(tensors[1:]) + ((None,) if not ctx.has_U else ())
    needs = ctx.needs_input_grad[:5]
    inputs = (x,) + params
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    _fused._PLAIN_DEPTH += 1
    try:
        y, ladj = ctx.plain(x, params)
    finally:
        _fused._PLAIN_DEPTH -= 1
    grads = iter(torch.autograd.grad((y, ladj), wanted, (gy, gl), create_graph=True, allow_unused=True))
    out = [next(grads) if need and t is not None else None for t, need in zip(inputs, needs)]
    return tuple(out) + (None, None, None)  # no gradient for route, plain, score


def kernel_route(x: torch.Tensor, b: torch.Tensor, route: Optional[str]) -> str:
    if route is None:
        route = _kernel_for(x)
    if route not in KERNEL_ROUTES:
        raise ValueError(f"route must be one of {KERNEL_ROUTES}, got {route!r}")
    if route == FUSED_NUMPY and not (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)):
        raise ValueError(f"route {FUSED_NUMPY!r} needs CPU float32/float64 tensors, got {x.dtype} on {x.device}")
    return route


def sylvester_route(x: torch.Tensor, params) -> str:
    """:func:`._fused.stack_route` for Sylvester parameters ``(b, R, R_tilde[, U])``: a
    kernel only for unbatched parameters (``b (K, M)``, ``R (K, M, M)``, ...)."""
    b, R, Rt, U = params
    if not USE_KERNEL or R.dim() != 3 or Rt.dim() != 3 or (U is not None and U.dim() != 3):
        return PLAIN
    return _fused.stack_route(x, b)


def sylvester_stack_kernel(x, params, plain, route=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ladj)`` of a K-layer Sylvester stack from unbatched raw parameters ``(b (K, M),
    R (K, M, M), R_tilde (K, M, M), U (K, D, n) or None)`` (``None``: the triangular
    kind); ``plain(x, params)``: the plain autograd loop, which a double backward
    differentiates (passed in: this module sits below :mod:`.sylvester`); ``route``: one
    of :data:`._fused.KERNEL_ROUTES` (default: ``x``'s device)."""
    b, R, Rt, U = params
    return _SylvesterStack.apply(x, b, R, Rt, U, kernel_route(x, b, route), plain, None)


def sylvester_stack_push_kernel(
    x, params, plain, score, route=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, ladj, ∇_y log p_Y(y))``: :func:`sylvester_stack_kernel` and
    :func:`sylvester_stack_push_score` in one pass (the push reuses the forward's layer
    quantities); ``score = ∇_x log p_X(x)`` of ``x``'s shape, no gradient through it."""
    b, R, Rt, U = params
    return _SylvesterStack.apply(x, b, R, Rt, U, kernel_route(x, b, route), plain, score.detach())


def _log_det_grad(t, hp, det, q):
    """``d log det / d a = 2 t h' (1 - q) / det``, per coordinate, for ``det = t^2 + q h'``
    with ``t = tanh(a)`` and ``h' = 1 - t^2``: what the backward and the score push take."""
    return 2 * t * hp * (1 - q) / det


def _push_score_layer(xp, s, At, Bt, Wt_low, g_det, hp, det, lower=None):
    """The score through one layer (see :func:`.sylvester.sylvester_push_score`), from
    ``hp = 1 - t^2`` and ``det = t^2 + q hp`` of its activation ``t = tanh(z B^T + b)``,
    ``g_det`` (:func:`_log_det_grad`, the log-det's gradient in the pre-activation) and
    ``Wt_low``, the strict lower triangle of ``W^T = (R~ R)^T``; ``lower``: the systems'
    matrices ``(N, M, M)`` if built already (see :func:`_push_saved`)."""
    s = s - _mm(xp, g_det, Bt.T)
    r = _mm(xp, s, At.T)  # A^T s, (N, M)
    M = det.shape[-1]
    if M <= _PUSH_LOOP_MAX_M:
        # (I + W^T H) w = r, lower triangular: w_i = (r_i - Σ_{j<i} W_ji h_j w_j) / det_i
        v = xp.empty_like(r)
        for i in range(M):
            w_i = r[:, i] if i == 0 else r[:, i] - v[:, :i] @ Wt_low[i, :i]
            v[:, i] = hp[:, i] * w_i / det[:, i]
    else:
        if lower is None:
            lower = _set_diag(xp, Wt_low[None] * hp[:, None, :], det)
        w = _solve_triangular(xp, lower, r[:, :, None], upper=False)[:, :, 0]
        v = hp * w
    return s - _mm(xp, v, Bt.T)


def _push_saved(xp, saved, s):
    """The score pushed through the stack from what :func:`_forward` saved: the
    elementwise factors (and, above the substitution loop, the triangular systems) of all
    layers in one pass each, then the sequential part layer by layer."""
    At, Bt, q, (Rm, Rtm, _, _, _), _, ts, hp, det = saved
    K, M = q.shape
    Wt_low = _strict_lower_wt(xp, Rm, Rtm)
    g_det = _log_det_grad(ts, hp, det, q[:, None, :])
    lower = None
    if M > _PUSH_LOOP_MAX_M and ts.shape[0] * ts.shape[1] * M * M <= _PUSH_BATCHED_MAX:
        lower = _set_diag(xp, Wt_low[:, None] * hp[:, :, None, :], det)  # (K, N, M, M)
    for k in range(K):
        s = _push_score_layer(xp, s, At[k], Bt[k], Wt_low[k], g_det[k], hp[k], det[k],
                              None if lower is None else lower[k])
    return s


def _strict_lower_wt(xp, Rm, Rtm):
    """The strict lower triangles of ``W^T = (R~ R)^T``, all layers in one call."""
    return _strict_triangle(xp, (Rtm @ Rm).swapaxes(-1, -2), upper=False)


def _push_layer(xp, z, s, At, Bt, b, q, Wt_low):
    """One layer of :func:`.sylvester.sylvester_push_score` on ``(N, D)`` arrays."""
    t = xp.tanh(_mm(xp, z, Bt) + b)
    det, hp = planar_det_parts(t, q, xp)
    y = z + _mm(xp, t, At)
    return y, _push_score_layer(xp, s, At, Bt, Wt_low, _log_det_grad(t, hp, det, q), hp, det)


def sylvester_stack_push_score(x, score, params, route=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ∇_y log p_Y(y))`` through a K-layer stack with unbatched raw parameters (as
    :func:`sylvester_stack_kernel`), layer by layer in one NumPy/torch pass, no graph."""
    b, R, Rt, U = params
    route = kernel_route(x, b, route)
    tensors = (x, score, b, R, Rt) + ((U,) if U is not None else ())
    with torch.no_grad():
        xp, arrays = _namespace(route, *(t.detach() for t in tensors))
        xa, sa, ba, Ra, Rta = arrays[:5]
        Ua = arrays[5] if U is not None else None
        shape = tuple(x.shape)
        z, s = xa.reshape(-1, shape[-1]), sa.reshape(-1, shape[-1])
        with np.errstate(all="ignore"):
            At, Bt, q, (Rm, Rtm, _, _, _) = _parts(xp, ba, Ra, Rta, Ua)
            Wt_low = _strict_lower_wt(xp, Rm, Rtm)
            for k in range(ba.shape[0]):
                z, s = _push_layer(xp, z, s, At[k], Bt[k], ba[k], q[k], Wt_low[k])
        return _to_torch(xp, _contig(xp, z).reshape(shape), _contig(xp, s).reshape(shape))
