"""Hand-written forward/backward for K-layer planar and radial stacks.

A K-layer stack is latency-bound: with batch 256 and D = 2 every tensor op costs a few
microseconds of dispatch whatever its size, and autograd about triples the op count.
These ``autograd.Function`` subclasses take the packed raw parameters and compute the constrained
parameters, the K layers and the summed log-det in one node, with a closed-form backward.

The kernels are written once against a small array namespace ``xp``. For CPU float32 /
float64 tensors ``xp`` is NumPy on zero-copy views of the tensors: a NumPy call costs
~0.5-1 µs against ~3 µs for a torch op, and these loops are nothing but small calls
(at batch 4096 NumPy's ``tanh`` is also faster single-threaded). On other devices and
dtypes ``xp`` is torch itself. Both run the same code, checked against each other and
against the plain autograd loop (``gradcheck`` included) in the tests.

Which route a stack takes is decided in one place, :func:`stack_route` (see its table).
Only unbatched parameters (``(K, D)``, a learnable stack) take a kernel; the conditional
(batched-parameter) case and ``torch.compile`` use the plain autograd loops of
:mod:`._math`. This module needs nothing from the layer modules (:mod:`.planar`,
:mod:`.radial` import it, not the reverse). Every kernel route is compared with that loop (values,
gradients, ``gradcheck``) in ``tests/test_transforms.py::test_every_kernel_route_matches_autograd``,
which enumerates :data:`KERNEL_ROUTES`: a hand edit of :mod:`._math` that the backward
does not follow fails there.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .._compat import compile_unavailable_errors, functorch_transforms_active
from ._math import (
    maximum,
    planar_det_parts,
    planar_stack_loop,
    PLANAR_U_SHIFT,
    planar_u_hat_parts,
    radial_ab,
    radial_log_det,
    radial_stack_loop,
    softplus_grad,
    split_planar_theta,
    split_radial_theta,
)

# Test hook: False sends CPU float32/float64 stacks down the torch kernel too (the tests
# compare both kernels on one machine). Read only by :func:`stack_route`.
USE_NUMPY = True

#: The routes of a K-layer planar/radial stack (see :func:`stack_route`).
PLAIN, FUSED_NUMPY, FUSED_TORCH = "plain", "fused-numpy", "fused-torch"
#: The routes that run a hand-written backward: each is checked against autograd.
KERNEL_ROUTES = (FUSED_NUMPY, FUSED_TORCH)


def _namespace(route: str, *tensors: torch.Tensor):
    """``(xp, arrays)`` for a kernel route: NumPy views of the tensors, or torch itself."""
    if route == FUSED_NUMPY:
        # contiguous: autograd's grads are often broadcast (stride 0), which sends NumPy's
        # matmul down a slow non-BLAS path
        return np, [np.ascontiguousarray(a.detach().numpy()) for a in tensors]
    return torch, list(tensors)


def _to_torch(xp, *arrays):
    return tuple(torch.from_numpy(a) for a in arrays) if xp is np else arrays


def _zeros(xp, shape, like):
    return np.zeros(shape, like.dtype) if xp is np else like.new_zeros(shape)


def _contiguous_copy(xp, a):
    return np.array(a, order="C") if xp is np else a.clone(memory_format=torch.contiguous_format)


def _as_contiguous(xp, a):
    return np.ascontiguousarray(a) if xp is np else a.contiguous()


@functools.lru_cache(maxsize=32)
def _strict_mask(n: int, upper: bool) -> np.ndarray:
    mask = np.triu(np.ones((n, n), dtype=bool), 1) if upper else np.tril(np.ones((n, n), dtype=bool), -1)
    mask.setflags(write=False)  # shared by every caller
    return mask


def _strict_triangle(xp, a, upper: bool = True):
    """The strict upper (or lower) triangle of ``a (..., n, n)``, zeros elsewhere. In
    NumPy by one ``where`` on a cached mask (``np.triu`` builds its mask every call: 2-4x
    slower on these small stacks)."""
    if xp is np:
        return np.where(_strict_mask(a.shape[-1], upper), a, 0)
    return xp.triu(a, 1) if upper else xp.tril(a, -1)


# NumPy products that go through torch instead (see :func:`_mm`): matrix-vector products
# from this many multiply-adds on
_TORCH_MATVEC_MIN = 1 << 16
# and matrix-matrix products above this many: OpenBLAS (NumPy's wheels) runs a product
# of at most 4 x 65536 on one thread (GEMM_MULTITHREAD_THRESHOLD x SMP_THRESHOLD_MIN),
# where NumPy's call is about half torch.matmul's (32 x 256 x 32, one thread: 5.7 vs 10 us)
_NUMPY_GEMM_MAX = 1 << 18


def _mm(xp, a, b, numpy_gemm_max: int = _NUMPY_GEMM_MAX):
    """``a @ b`` for a 2-D ``a`` and a 1-D or 2-D ``b``. Large NumPy products (see
    :data:`_TORCH_MATVEC_MIN`; a matrix-matrix product above ``numpy_gemm_max``
    multiply-adds) go through ``torch.matmul`` on zero-copy views: NumPy's BLAS keeps its
    own thread pool, which ignores ``torch.set_num_threads`` (and oversubscribes a machine
    where torch was limited); small ones stay in NumPy, where the call is cheaper and BLAS
    does not spawn threads."""
    if xp is np:
        if b.ndim == 1:
            large = a.shape[0] * a.shape[1] >= _TORCH_MATVEC_MIN
        else:
            large = a.shape[0] * a.shape[1] * b.shape[1] > numpy_gemm_max
        if large:
            return (torch.from_numpy(a) @ torch.from_numpy(b)).numpy()
        # np.dot, not @: the same product, but matmul takes a slow loop for a transposed
        # (D, 1) view (15x at D = 20000: the radial backward's feature-major arrays)
        return np.dot(a, b)
    return a @ b


# The three scalar recurrences below are the latency-bound core of a planar stack (one
# step per layer). In NumPy each step iterates over row views (``zip``, no indexing
# calls) and uses ``np.dot``, which for these sizes costs less than ``@``; with one
# row (one draw: an SVI step with one particle) each step works on NumPy scalars,
# about half the calls' cost. The arithmetic is the same in every variant.


def _unit_diagonal(m, dtype, negate: bool = False) -> np.ndarray:
    """A C-contiguous copy of ``m`` (negated if asked) with ones on its diagonal: the rows
    the NumPy recurrences below dot against, so that one ``dot`` also adds the layer's
    own term, kept in the output's row until that layer's step."""
    out = np.negative(m, dtype=dtype, order="C") if negate else np.array(m, dtype=dtype, order="C")
    np.fill_diagonal(out, 1)
    return out


def _planar_recurrence(xp, a, m):
    """``t_k = tanh(a_k + Σ_{j<k} m_kj t_j)`` for ``a (K, N)``, ``m (K, K)``."""
    K = a.shape[0]
    if xp is not np:
        t = xp.zeros_like(a)
        for k in range(K):
            xp.tanh(a[k] + m[k, :k] @ t[:k], out=t[k])
        return t
    dot, tanh = np.dot, np.tanh
    if a.shape[1] == 1:
        t = np.zeros_like(a)
        av, tv = a[:, 0], t[:, 0]
        for k, (ak, mk) in enumerate(zip(av, m)):
            tv[k] = tanh(ak + dot(mk[:k], tv[:k]))
        return t
    # two calls a step: row k of t holds a_k until step k, so that with a unit diagonal
    # in m one dot gives a_k + Σ_{j<k} m_kj t_j (into a buffer: dot's out= may not
    # overlap its inputs, and takes only a C-contiguous array of the product's dtype)
    t = np.array(a, dtype=a.dtype, order="C")
    buf = np.empty(a.shape[1], dtype=a.dtype)
    for k, (mk, tk) in enumerate(zip(_unit_diagonal(m, a.dtype), t)):
        tanh(dot(mk[: k + 1], t[: k + 1], out=buf), out=tk)
    return t


def _planar_recurrence_grad(xp, c, s, m):
    """``g_k = s_k (c_k + Σ_{j>k} m_jk g_j)``, the adjoint of :func:`_planar_recurrence`."""
    K = c.shape[0]
    mt = m.T
    if xp is not np:
        g = xp.zeros_like(c)
        for k in reversed(range(K)):
            g[k] = s[k] * (c[k] + mt[k, k + 1 :] @ g[k + 1 :])
        return g
    dot = np.dot
    if c.shape[1] == 1:
        g = np.zeros_like(c)
        cv, sv, gv = c[:, 0], s[:, 0], g[:, 0]
        for k in reversed(range(K)):
            gv[k] = sv[k] * (cv[k] + dot(mt[k, k + 1 :], gv[k + 1 :]))
        return g
    # two calls a step, as in _planar_recurrence: row k of g holds c_k until step k, and
    # m^T (contiguous rows) gets a unit diagonal
    g = np.array(c, dtype=c.dtype, order="C")
    buf, mul = np.empty(c.shape[1], dtype=c.dtype), np.multiply
    for k, mk, sk, gk in reversed(list(zip(range(K), _unit_diagonal(mt, c.dtype), s, g))):
        mul(dot(mk[k:], g[k:], out=buf), sk, out=gk)
    return g


def _planar_forward(xp, x, th):
    """``x (N, D)``, ``th = [u | w | b] (K, 2D+1)`` -> ``y, ladj`` and what backward needs.

    Works on the layers' scalar pre-activations: with ``M = tril(W Û^T, -1)``,
    ``a_k = w_k·x + b_k + Σ_{j<k} M_kj t_j`` and ``y = x + Σ_k t_k û_k``, so each layer
    costs two small ops whatever ``D`` is, and nothing of shape ``(K, N, D)`` is stored.
    """
    D = x.shape[1]
    u, w, b = th[:, :D], th[:, D : 2 * D], th[:, 2 * D]
    u_hat, q, parts = planar_u_hat_parts(u, w, xp)  # q (K, 1)
    m = _mm(xp, w, u_hat.T)  # (K, K): w_k·û_j, used for j < k only
    a = _mm(xp, w, x.T) + b[:, None]  # (K, N)
    t = _planar_recurrence(xp, a, m)
    y = x + _mm(xp, t.T, u_hat)
    det, h1 = planar_det_parts(t, q, xp)  # (K, N)
    return y, xp.log(det).sum(0), (t, h1, det, u_hat, q, m, parts)


def _planar_backward(xp, x, th, saved, gy, gl):
    D = x.shape[1]
    u, w = th[:, :D], th[:, D : 2 * D]
    t, s_t, det, u_hat, q, m, (wu, sp, den, coef, s) = saved
    gl_det = gl[None, :] / det  # (K, N): d/d det_k of the summed log-det
    g_q = (gl_det * s_t).sum(1)[:, None]
    # c_k = dL/dt_k through y and through the log-det (d det/dt = 2 t (1 - q))
    c = _mm(xp, u_hat, gy.T)
    c += gl_det * t * (2 * (1 - q))
    g = _planar_recurrence_grad(xp, c, s_t, m)  # g_k = dL/da_k
    p = _strict_triangle(xp, _mm(xp, g, t.T), upper=False)  # p_kj = Σ_n g_kn t_jn, j < k
    g_x = gy + _mm(xp, g.T, w)
    if D >= _PLANAR_BASIS_MIN_D:
        return g_x, _planar_param_grad_large_d(xp, x, th, saved, gy, g, p, g_q)
    g_u_hat = p.T @ w + t @ gy
    # back through û = u + coef w and q = softplus(a + c) s + (1 + a)(1 - s), a = w·u
    # (the clamp of q at `tiny` never binds in practice and is ignored)
    sig = softplus_grad(xp, wu + PLANAR_U_SHIFT)
    g_coef = (g_u_hat * w).sum(1)[:, None]
    g_a = g_coef * (sig - 1) / den + g_q * (sig * s + 1 - s)
    floor = xp.finfo(x.dtype).eps ** 2
    g_wn2 = xp.where(s == 1, -g_coef * coef / den, g_q * (sp - 1 - wu) / floor)
    g_th = xp.zeros_like(th)
    g_th[:, :D] = g_u_hat + g_a * w
    g_th[:, D : 2 * D] = coef * g_u_hat + g_a * u + 2 * g_wn2 * w + p @ u_hat + g @ x
    g_th[:, 2 * D] = g.sum(1)
    return g_x, g_th


# From this dimension on, the parameter gradient of a planar stack is assembled by
# matrix products written straight into the gradient's (K, 2D+1) memory (few passes over
# (K, D) arrays) instead of a dozen elementwise ops on (K, D) temporaries.
_PLANAR_BASIS_MIN_D = 256


def _planar_param_grad_large_d(xp, x, th, saved, gy, g, p, g_q):
    """The gradient of :func:`_planar_backward` w.r.t. ``th = [u | w | b]`` for large D.

    With ``û = u + coef w`` the two (K, D) blocks are linear in ``u``, ``w``, ``gy``, ``x``:
    ``g_u = (pᵀ + diag g_a) w + t gy`` and
    ``g_w = (diag g_a + p) u + (coef pᵀ + diag(2 g_‖w‖²) + p coefᵀ) w + (coef t) gy + g x``,
    and ``g_coef_k = (g_û)_k·w_k`` comes from the Gram products ``w wᵀ`` and ``gy wᵀ``.
    Each block is a chain of accumulating products (``addmm_``, torch's BLAS on zero-copy
    views of the NumPy arrays) into its strided view of the result: nothing of size
    (K, D) is copied or stacked.
    """
    K, D = th.shape[0], x.shape[1]
    t, _, det, u_hat, q, m, (wu, sp, den, coef, s) = saved
    as_torch = torch.from_numpy if xp is np else (lambda a: a)
    tht, gyt, xt = as_torch(th), as_torch(_as_contiguous(xp, gy)), as_torch(x)
    u, w = tht[:, :D], tht[:, D : 2 * D]
    gram_ww, gram_gw = w @ w.mT, gyt @ w.mT  # w_j·w_k, gy_n·w_k
    if xp is np:
        gram_ww, gram_gw = gram_ww.numpy(), gram_gw.numpy()
    g_coef = ((p * gram_ww).sum(0) + (t * gram_gw.T).sum(1))[:, None]
    sig = softplus_grad(xp, wu + PLANAR_U_SHIFT)
    g_a = g_coef * (sig - 1) / den + g_q * (sig * s + 1 - s)
    floor = xp.finfo(x.dtype).eps ** 2
    g_wn2 = xp.where(s == 1, -g_coef * coef / den, g_q * (sp - 1 - wu) / floor)
    eye = xp.eye(K, dtype=x.dtype)
    c_uw = p.T + eye * g_a
    c_wu = eye * g_a + p
    c_ww = coef * p.T + eye * (2 * g_wn2) + p * coef.T
    g_th = xp.empty_like(th)
    gt = as_torch(g_th)
    g_u, g_w = gt[:, :D], gt[:, D : 2 * D]
    # beta=0: the uninitialised memory is not read
    g_u.addmm_(as_torch(c_uw), w, beta=0).addmm_(as_torch(t), gyt)
    g_w.addmm_(as_torch(c_wu), u, beta=0).addmm_(as_torch(c_ww), w)
    g_w.addmm_(as_torch(_as_contiguous(xp, coef * t)), gyt).addmm_(as_torch(g), xt)
    g_th[:, 2 * D] = g.sum(1)
    return g_th


# Below this dimension the radial kernel works on contiguous copies of x^T (D, N);
# from it on, on transposed views of (N, D) memory (no copies).
_RADIAL_COPY_BELOW_D = 16


def _feature_major(xp, a):
    """``a (N, D)`` as ``(D, N)``: a contiguous copy for small D (NumPy is several times
    slower broadcasting or reducing along a short inner axis), else a view."""
    return _contiguous_copy(xp, a.T) if a.shape[1] < _RADIAL_COPY_BELOW_D else _contiguous_copy(xp, a).T


def _dot0(xp, a, b):
    """``Σ_d a[d] * b[d]`` for feature-major ``(D, N)`` arrays: a product and a sum for
    small D (cheapest there), one fused pass (``einsum``) for large D."""
    return (a * b).sum(0) if a.shape[0] < _RADIAL_COPY_BELOW_D else xp.einsum("dn,dn->n", a, b)


def _radial_forward(xp, x, th):
    """``x (N, D)``, ``th = [x0 | α' | β'] (K, D+2)`` -> ``y, ladj`` and what backward needs.

    Works feature-major, on ``x^T (D, N)`` (see :func:`_feature_major`), with fused
    dot products: per layer one pass over ``x`` for ``d = x - x0``, one for ``r = |d|``
    and two for ``x += h(r) d``.
    """
    N, D, K = x.shape[0], x.shape[1], th.shape[0]
    x0 = th[:, :D, None]  # (K, D, 1)
    alpha, beta, s = radial_ab(th[:, D], th[:, D + 1], xp)
    xt = _feature_major(xp, x)  # (D, N), updated in place
    if D < _RADIAL_COPY_BELOW_D:  # same layout as xt
        diffs = _zeros(xp, (K, D, N), x)
    else:
        diffs = _zeros(xp, (K, N, D), x).swapaxes(1, 2)
    r = _zeros(xp, (K, N), x)
    for d, rk, x0k, ak, bk in zip(diffs, r, x0, alpha, beta):
        xp.subtract(xt, x0k, out=d)
        xp.sqrt(_dot0(xp, d, d), out=rk)
        xt += d * (bk / (ak + rk))
    ladj = radial_log_det(r, alpha[:, None], s[:, None], D, xp).sum(0)
    return _as_contiguous(xp, xt.T), ladj, (diffs, r, alpha, beta, s)


def _radial_backward(xp, x, th, saved, gy, gl):
    diffs, r, alpha, beta, s = saved
    K, D = th.shape[0], diffs.shape[1]
    al, sl, bl = alpha[:, None], s[:, None], beta[:, None]
    inv_a = 1 / (al + r)  # (K, N)
    phi = bl * inv_a
    dphi = -phi * inv_a
    # log-det = (D-1)(log(s+r) - log a) + log Q - 2 log a, with a = alpha + r and
    # Q = alpha s + 2 alpha r + r^2
    inv_q = 1 / (al * sl + r * (2 * al + r))
    inv_sr = 1 / (sl + r)
    gl = gl[None, :]
    g_r_ld = gl * ((D - 1) * (inv_sr - inv_a) + 2 * (al + r) * inv_q - 2 * inv_a)
    g_alpha_ld = gl * ((sl + 2 * r) * inv_q - (D + 1) * inv_a)
    g_s_ld = gl * ((D - 1) * inv_sr + al * inv_q)
    # y = x + phi(r) d: dL/dd = phi g + coef d, with coef = (phi'(r) (g·d) + dL/dr) / r
    # = c0 + c1 (g·d); dL/dx = g + dL/dd and dL/dx0 = -Σ_n dL/dd
    inv_r = 1 / maximum(xp, r, xp.finfo(r.dtype).tiny)  # r = 0 implies d = 0
    c0, c1, one_phi = g_r_ld * inv_r, dphi * inv_r, 1 + phi
    gdots, coefs = xp.zeros_like(r), xp.zeros_like(r)
    g_th = xp.zeros_like(th)
    # dL/dx0_k = -(g_k @ phi_k + d_k @ coef_k), g_k the gradient at layer k's output: for
    # small D keep the g_k and do it in two batched matmuls at the end (fewer calls);
    # for large D, two matvecs per layer (storing g_k would cost a pass over x each)
    gs = xp.zeros_like(diffs) if D < _RADIAL_COPY_BELOW_D else None
    gt = _feature_major(xp, gy)  # (D, N), updated in place
    for k in reversed(range(K)):
        d, coef, gdot = diffs[k], coefs[k], gdots[k]
        gdot[...] = _dot0(xp, gt, d)
        xp.add(c0[k], c1[k] * gdot, out=coef)
        if gs is None:
            g_th[k, :D] = -(_mm(xp, gt, phi[k]) + _mm(xp, d, coef))
        else:
            gs[k] = gt
        gt *= one_phi[k]
        gt += d * coef
    if gs is not None:
        g_th[:, :D] = -(gs @ phi[:, :, None] + diffs @ coefs[:, :, None])[:, :, 0]
    g_beta = (gdots * inv_a).sum(1)
    g_alpha = (gdots * dphi).sum(1) + g_alpha_ld.sum(1) - g_beta  # beta = s - alpha
    g_th[:, D] = g_alpha * softplus_grad(xp, th[:, D])
    g_th[:, D + 1] = (g_s_ld.sum(1) + g_beta) * softplus_grad(xp, th[:, D + 1])
    return _as_contiguous(xp, gt.T), g_th


# ------------------------------------------------------------------ score push (STL)
# ``(x, s_x) -> (y, s_y)`` with ``s = ∇ log density``, pushed forward through the K
# layers without an inverse: what sticking-the-landing needs. The per-layer formulas are
# those of :func:`.planar.planar_push_score` / :func:`.radial.radial_push_score` (the
# plain loop, the reference), rearranged so that a layer costs a few small ops.


def _planar_score_recurrence(xp, alpha, beta, us, m):
    """``c_k = α_k + β_k (us_k - Σ_{j<k} m_jk c_j)`` for ``(K, N)`` arrays and ``m (K, K)``."""
    K = alpha.shape[0]
    c = xp.zeros_like(alpha)
    mt = m.T
    if xp is not np:
        for k in range(K):
            c[k] = alpha[k] + beta[k] * (us[k] - mt[k, :k] @ c[:k])
        return c
    dot = np.dot
    if alpha.shape[1] == 1:
        av, bv, uv, cv = alpha[:, 0], beta[:, 0], us[:, 0], c[:, 0]
        for k in range(K):
            cv[k] = av[k] + bv[k] * (uv[k] - dot(mt[k, :k], cv[:k]))
        return c
    # three calls a step, as in _planar_recurrence: row k of c holds us_k until step k,
    # and -m^T gets a unit diagonal, so one dot gives us_k - Σ_{j<k} m_jk c_j
    c = np.array(us, dtype=alpha.dtype, order="C")
    buf, mul, add = np.empty(c.shape[1], dtype=c.dtype), np.multiply, np.add
    mt1 = _unit_diagonal(mt, alpha.dtype, negate=True)
    for k, (ak, bk, mk, ck) in enumerate(zip(alpha, beta, mt1, c)):
        add(ak, mul(bk, dot(mk[: k + 1], c[: k + 1], out=buf), out=buf), out=ck)
    return c


def _planar_push_saved(xp, x, th, saved, score):
    """Planar layers: ``J_k^{-T} = I - h'_k w_k û_kᵀ / det_k`` (Sherman–Morrison), so each
    layer subtracts ``c_k w_k`` from the score, with
    ``c_k = (h''_k k_k + h'_k (û_k·s_k - h''_k k_k²/det_k)) / det_k`` (``k_k = w_k·û_k``).
    Since ``û_k·s_k = û_k·s_0 - Σ_{j<k} c_j û_k·w_j``, the ``c_k`` follow a scalar
    recurrence through the same ``(K, K)`` matrix ``m`` as the forward pass, and
    ``s_y = s_0 - Σ_k c_k w_k`` is one product: nothing of size ``D`` per layer.

    Works from what :func:`_planar_forward` saved (``t``, ``h'``, ``det``, ``û``, ``q``, ``m``),
    so a forward pass that also pushes the score (:func:`planar_stack_push_kernel`)
    costs the score recurrence alone."""
    D = x.shape[1]
    w = th[:, D : 2 * D]
    t, h1, det, u_hat, q, m, _ = saved
    kq = q - 1
    h2k = -2 * t * h1 * kq  # h''(a) k
    beta = h1 / det
    alpha = (h2k - beta * h2k * kq) / det
    c = _planar_score_recurrence(xp, alpha, beta, _mm(xp, u_hat, score.T), m)
    return score - _mm(xp, c.T, w)


def _planar_push(xp, x, th, score):
    """``(y, score_y)`` of a planar stack: the forward pass, then :func:`_planar_push_saved`."""
    y, _, saved = _planar_forward(xp, x, th)
    return y, _planar_push_saved(xp, x, th, saved, score)


def _radial_push_saved(xp, x, th, saved, score):
    """Radial layers: ``J = c I + e n nᵀ`` (``n = d/r``) is symmetric, so
    ``s' = J^{-1}(s - L'(r) n) = s/c + n ((n·s - L')(1/(c+e) - 1/c) - L'/c)``, with
    ``1/c = (α+r)/(s+r)``, ``1/(c+e) = (α+r)²/(αs + 2αr + r²)`` and
    ``L' = (D-1)(1/(s+r) - 1/(α+r)) + 2(α+r)/(αs + 2αr + r²) - 2/(α+r)``: per layer
    one dot product and one update of a ``(D, N)`` array, from the ``d = x - x0`` and
    ``r = |d|`` that :func:`_radial_forward` saved."""
    diffs, r_all, alpha, _, s = saved
    D, K = x.shape[1], th.shape[0]
    st = _feature_major(xp, score)  # (D, N), the layout of the saved d, updated in place
    tiny = xp.finfo(st.dtype).tiny
    for k in range(K):
        d, r = diffs[k], r_all[k]
        ak, sk = alpha[k], s[k]
        a, sr, quad = ak + r, sk + r, ak * sk + r * (2 * ak + r)
        inv_a = 1 / a
        dlog = (D - 1) * (1 / sr - inv_a) + 2 * a / quad - 2 * inv_a
        inv_c, inv_ce = a / sr, a * a / quad
        inv_r = 1 / maximum(xp, r, tiny)
        ns = _dot0(xp, d, st) * inv_r
        # r = 0 means d = 0: no n term (the plain loop's n = d / max(r, tiny) = 0)
        coef = xp.where(r > 0, inv_r * ((ns - dlog) * (inv_ce - inv_c) - inv_c * dlog), 0.0)
        st *= inv_c
        st += d * coef
    return _as_contiguous(xp, st.T)


def _radial_push(xp, x, th, score):
    """``(y, score_y)`` of a radial stack: the forward pass, then :func:`_radial_push_saved`."""
    y, _, saved = _radial_forward(xp, x, th)
    return y, _radial_push_saved(xp, x, th, saved, score)


def _push(kernel, x, score, theta, route):
    """``(y, score_y)`` of a push kernel on ``x``, ``score`` of any (common) batch shape."""
    x, score = torch.broadcast_tensors(x, score)
    shape = tuple(x.shape)
    xp, (xa, sa, tha) = _namespace(route, x, score, theta)
    xa, sa = xa.reshape(-1, shape[-1]), sa.reshape(-1, shape[-1])
    with np.errstate(all="ignore"):
        y, sy = kernel(xp, xa, tha, sa)
        if xp is np and xa.dtype == np.float32 and not (np.isfinite(y).all() and np.isfinite(sy).all()):
            # float32 squares overflow (radial r = inf): rerun in float64, as the forward does
            y, sy = kernel(xp, xa.astype(np.float64), tha.astype(np.float64), sa.astype(np.float64))
            y, sy = y.astype(np.float32), sy.astype(np.float32)
    y, sy = _to_torch(xp, y, sy)
    return y.reshape(shape), sy.reshape(shape)


class _FusedStack(torch.autograd.Function):
    """``(x (..., D), theta (K, P)) -> (y (..., D), ladj (...))`` through the ``forward`` /
    ``backward`` kernels given. Batch dims are flattened inside (no autograd view nodes).

    The hand-written backward is not itself differentiable. When a higher-order graph is
    asked for (``create_graph=True``: Hessians, gradient penalties, HMC on a transformed
    space), the backward instead recomputes the stack with the plain autograd loop and
    differentiates that, so second derivatives are exact rather than silently zero.
    """

    @staticmethod
    def forward(ctx, x, theta, kernels, route, score):
        xp, arrays = _namespace(route, x, theta) if score is None else _namespace(route, x, theta, score)
        xa, tha = arrays[0], arrays[1]
        shape = tuple(x.shape)
        xa = xa.reshape(-1, shape[-1])
        with np.errstate(all="ignore"):  # torch does not warn on overflow either
            y, ladj, saved = kernels[0](xp, xa, tha)
            ctx.upcast = xp is np and xa.dtype == np.float32 and not np.isfinite(ladj).all()
            if ctx.upcast:
                # float32 squares overflow from |x| ~ 1e19 (radial r = inf, then NaN):
                # rerun this call in float64, rounding only the results
                xa, tha = xa.astype(np.float64), tha.astype(np.float64)
                y, ladj, saved = kernels[0](xp, xa, tha)
                y, ladj = y.astype(np.float32), ladj.astype(np.float32)
            if score is not None:
                sy = _push_after_forward(kernels, xp, xa, tha, saved, arrays[2].reshape(xa.shape), y)
        ctx.save_for_backward(x, theta)  # for autograd's in-place modification check
        ctx.saved, ctx.inputs, ctx.kernels, ctx.shape = saved, (xa, tha), kernels, shape
        ctx.route = route
        out = _to_torch(xp, y.reshape(shape), ladj.reshape(shape[:-1]))
        if score is None:
            return out
        (sy,) = _to_torch(xp, sy.reshape(shape))
        ctx.mark_non_differentiable(sy)
        return out + (sy,)

    @staticmethod
    def backward(ctx, gy, gl, *unused):  # the pushed score (if any) has no gradient
        x, theta = ctx.saved_tensors  # raises if x or theta was modified in place since forward
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            return _plain_backward(ctx, x, theta, gy, gl)
        xp, (gya, gla) = _namespace(ctx.route, gy, gl)
        (xa, tha), D = ctx.inputs, ctx.shape[-1]
        if ctx.upcast:
            gya, gla = gya.astype(np.float64), gla.astype(np.float64)
        with np.errstate(all="ignore"):
            g_x, g_th = ctx.kernels[1](xp, xa, tha, ctx.saved, gya.reshape(-1, D), gla.reshape(-1))
        if ctx.upcast:
            g_x, g_th = g_x.astype(np.float32), g_th.astype(np.float32)
        g_x, g_th = _to_torch(xp, g_x.reshape(ctx.shape), g_th)
        return g_x, g_th, None, None, None


def _push_after_forward(kernels, xp, xa, tha, saved, sa, y):
    """The score pushed through the stack from what its forward pass saved: the same
    values as the standalone push kernel (:func:`_push`), including its float64 rerun
    where float32 overflows."""
    if xa.dtype != sa.dtype:  # the forward was rerun in float64
        return kernels[3](xp, xa, tha, saved, sa.astype(xa.dtype)).astype(sa.dtype)
    sy = kernels[3](xp, xa, tha, saved, sa)
    if xp is np and xa.dtype == np.float32 and not (np.isfinite(y).all() and np.isfinite(sy).all()):
        sy = kernels[4](xp, xa.astype(np.float64), tha.astype(np.float64), sa.astype(np.float64))[1]
        sy = sy.astype(np.float32)
    return sy


# Test hooks: > 0 makes stack_route say "plain" (the reference loop); see forced_route
_PLAIN_DEPTH = 0
_FORCED: Optional[str] = None


def _plain_backward(ctx, x, theta, gy, gl):
    """Vector-Jacobian product of the plain autograd loop, with its graph kept."""
    wanted = [t for t, need in zip((x, theta), ctx.needs_input_grad[:2]) if need]
    y, ladj = ctx.kernels[2](x, theta)
    grads = iter(torch.autograd.grad((y, ladj), wanted, (gy, gl), create_graph=True, allow_unused=True))
    g_x = next(grads) if ctx.needs_input_grad[0] else None
    g_th = next(grads) if ctx.needs_input_grad[1] else None
    return g_x, g_th, None, None, None


def _planar_plain(x, theta):
    return planar_stack_loop(x, *split_planar_theta(theta, x.shape[-1]))


def _radial_plain(x, theta):
    return radial_stack_loop(x, *split_radial_theta(theta, x.shape[-1]))


# (forward kernel, backward kernel, plain autograd loop on packed parameters, score push
# from the forward's saved quantities, standalone score push)
_PLANAR = (_planar_forward, _planar_backward, _planar_plain, _planar_push_saved, _planar_push)
_RADIAL = (_radial_forward, _radial_backward, _radial_plain, _radial_push_saved, _radial_push)


def stack_route(x: torch.Tensor, *params: torch.Tensor) -> str:
    """The one place that picks how a K-layer planar/radial stack runs.

    =================  ===========================================================
    route              when
    =================  ===========================================================
    ``"plain"``        batched parameters (a conditioned stack: no kernel), one
                       layer (the plain ops are as cheap), ``x`` of another dtype,
                       tracing / ``torch.compile`` / a ``torch.func`` transform or
                       forward-mode AD (the kernels have no batching rule or jvp),
                       or forced by :func:`forced_route` (a test hook)
    ``"fused-numpy"``  otherwise, CPU float32/float64: the kernels on zero-copy NumPy
                       views (a NumPy call costs ~0.5-1 µs, a torch op ~3 µs)
    ``"fused-torch"``  otherwise (CUDA, MPS, half precision): the same kernels in torch
    =================  ===========================================================

    Measured gains of one reverse-KL training step (forward + backward) over the plain
    loop, K = 32, D = 2, 1 thread, a loaded 2-core CPU: planar ``fused-numpy`` x6 (batch
    256) and x7 (one row), ``fused-torch`` x2; radial x5-x7 and x2. A former
    pure-Python-float recurrence for one row (K <= 64) measured no gain over the NumPy
    loop and was removed. ``torch.compile`` (``compile=True``) is a user's choice, run by
    :func:`run_compiled` around the plain loop.
    """
    if any(p.dim() != 2 for p in params) or params[0].shape[0] < 2:
        return PLAIN
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or functorch_transforms_active():
        return PLAIN
    if _PLAIN_DEPTH or _FORCED == PLAIN:
        return PLAIN
    if x.dim() < 1 or x.dtype != params[0].dtype:
        return PLAIN
    return _FORCED or _kernel_for(x)


@contextlib.contextmanager
def forced_route(route: str) -> Iterator[None]:
    """Test hook: inside the block :func:`stack_route` answers ``route`` wherever a
    kernel could run (``"plain"``: everywhere), so one test can run the same stack down
    every route on one machine."""
    global _FORCED
    if route not in (PLAIN,) + KERNEL_ROUTES:
        raise ValueError(f"route must be one of {(PLAIN,) + KERNEL_ROUTES}, got {route!r}")
    previous, _FORCED = _FORCED, route
    try:
        yield
    finally:
        _FORCED = previous


def _kernel_for(x: torch.Tensor) -> str:
    if USE_NUMPY and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return FUSED_NUMPY
    return FUSED_TORCH


def _kernel_route(x: torch.Tensor, theta: torch.Tensor, route) -> str:
    if route is None:  # called directly (tests, benchmarks): the kernel of x's device
        route = _kernel_for(x)
    if route not in KERNEL_ROUTES:
        raise ValueError(f"route must be one of {KERNEL_ROUTES}, got {route!r}")
    numpy_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if route == FUSED_NUMPY and not numpy_ok:
        raise ValueError(
            f"route {FUSED_NUMPY!r} needs CPU float32/float64 tensors, got {x.dtype} on {x.device}"
        )
    return route


def planar_stack_kernel(x, theta, route=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ladj)`` of K planar layers from packed raw parameters ``theta = [u | w | b]``
    of shape ``(K, 2D+1)``; ``x`` of any batch shape. ``route``: one of
    :data:`KERNEL_ROUTES` (default: :func:`stack_route`'s choice)."""
    return _FusedStack.apply(x, theta, _PLANAR, _kernel_route(x, theta, route), None)


def radial_stack_kernel(x, theta, route=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ladj)`` of K radial layers from packed raw parameters
    ``theta = [x0 | alpha' | beta']`` of shape ``(K, D+2)``; ``x`` of any batch shape.
    ``route``: one of :data:`KERNEL_ROUTES` (default: :func:`stack_route`'s choice)."""
    return _FusedStack.apply(x, theta, _RADIAL, _kernel_route(x, theta, route), None)


def planar_stack_push_kernel(x, theta, score, route=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, ladj, ∇_y log p_Y(y))``: :func:`planar_stack_kernel` and
    :func:`planar_push_kernel` in one pass (the push reuses the forward's layer
    quantities); ``score = ∇_x log p_X(x)`` of ``x``'s shape, no gradient through it."""
    return _FusedStack.apply(x, theta, _PLANAR, _kernel_route(x, theta, route), score.detach())


def radial_stack_push_kernel(x, theta, score, route=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`planar_stack_push_kernel` for radial layers (``theta = [x0 | alpha' | beta']``)."""
    return _FusedStack.apply(x, theta, _RADIAL, _kernel_route(x, theta, route), score.detach())


def planar_push_kernel(x, score, theta, route=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, ∇_y log p_Y)`` of K planar layers (packed ``theta = [u | w | b]``) from ``x``
    and ``score = ∇_x log p_X(x)``, in one pass without an inverse (no autograd graph).
    ``route``: one of :data:`KERNEL_ROUTES` (default: :func:`stack_route`'s choice)."""
    with torch.no_grad():
        return _push(_planar_push, x, score, theta, _kernel_route(x, theta, route))


def radial_push_kernel(x, score, theta, route=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`planar_push_kernel` for radial layers (``theta = [x0 | alpha' | beta']``)."""
    with torch.no_grad():
        return _push(_radial_push, x, score, theta, _kernel_route(x, theta, route))



_COMPILED: Dict[Callable, Callable] = {}


def run_compiled(module, fn: Callable, *args) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.compile(fn)(*args)``, falling back to ``fn(*args)`` (with one warning, and
    ``module.compile`` switched off) where compilation is unavailable: only the errors of
    :func:`~pyro_nfvi._compat.compile_unavailable_errors` (no or a broken C++ compiler, a
    backend that fails to build); any other error is a real one and propagates."""
    if module.compile and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        compiled = _COMPILED.get(fn)
        if compiled is None:
            compiled = _COMPILED[fn] = torch.compile(fn)
        try:
            return compiled(*args)
        except compile_unavailable_errors() as err:
            warnings.warn(
                f"torch.compile is unavailable here ({type(err).__name__}: {err}); "
                "falling back to the eager path",
                RuntimeWarning,
            )
            module.compile = False
    return fn(*args)
