r"""Sylvester flows (van den Berg, Hasenclever, Tomczak & Welling, UAI 2018) with exact
log-determinants and exact inverses of any point.

.. math::

    y = x + Q R\, h(\tilde R Q^\top x + b),\qquad h = \tanh,

with :math:`Q \in \mathbb{R}^{D\times M}` (orthonormal columns), :math:`R, \tilde R`
upper triangular :math:`M\times M` and :math:`b \in \mathbb{R}^M`. With
:math:`A = QR`, :math:`B = \tilde R Q^\top` and :math:`a = Bx + b`, the Jacobian is
:math:`J = I_D + A\,\mathrm{diag}(h'(a))\,B`; by Sylvester's determinant identity
:math:`\det J = \det(I_M + \mathrm{diag}(h'(a))\,\tilde R R)` and :math:`\tilde R R` is upper
triangular with diagonal :math:`d_i = \tilde R_{ii} R_{ii}`, so

.. math::

    \log|\det J| = \sum_i \log\big(1 + d_i\, h'(a_i)\big)
                 = \sum_i \log\big(t_i^2 + q_i (1 - t_i^2)\big),\qquad
                 t = \tanh a,\ q_i = 1 + d_i,

the second form (the planar layer's, :func:`~pyro_nfvi.transforms._math.planar_det`) has
no cancellation as :math:`d_i \to -1`.

**Parametrisation: every entry bounded.** Raw parameters :math:`\rho_i` (the diagonal of
the ``R`` tensor), :math:`\sigma_i` (the diagonal of ``R_tilde``) and the raw strictly
upper entries give, with :math:`\beta` = ``DIAG_BOUND`` = 1 and :math:`\gamma` =
``OFFDIAG_BOUND`` = 10,

.. math::

    \log q_i = \beta\tanh\rho_i,\quad \log\tilde R_{ii} = \beta\tanh\sigma_i,\quad
    R_{ii} = \frac{\operatorname{expm1}(\log q_i)}{\tilde R_{ii}},\quad
    R_{ij}, \tilde R_{ij} = \gamma\tanh\bigl(\text{raw}_{ij}/(\gamma\sqrt M)\bigr)\ (j > i),

so :math:`d_i = \tilde R_{ii}R_{ii} = q_i - 1` and every per-unit det factor
:math:`t_i^2 + q_i(1 - t_i^2)` lies in :math:`[e^{-\beta}, e^{\beta}]` (a sum of positive
terms: no cancellation), :math:`\tilde R_{ii} \in [e^{-\beta}, e^{\beta}]`,
:math:`|R_{ii}| \le (e^\beta - 1)e^\beta` and the off-diagonals are at most :math:`\gamma`,
for every raw value (:math:`\pm\infty` included). Hence :math:`\|J\|` and
:math:`\|J^{-1}\|` of a layer are bounded whatever the parameters: no raw value (a
hypernetwork's output of 1e3, a diagonal driven to -40 by training) gives a
near-singular or huge layer, and the inverse stays exact to rounding. As in the paper
(which bounds both diagonals with :math:`\tanh`, :math:`|d_i| < 1`), the diagonals are
bounded; unlike it, :math:`q_i` is bounded away from 0 (the paper's :math:`q_i \to 0` is
a singular layer, and :math:`\tanh\rho\tanh\sigma` rounds to :math:`-1` at
:math:`|\rho|, |\sigma| \gtrsim 19` in float64), and the off-diagonals are bounded too:
with the diagonals alone bounded, hypernetwork outputs of ~1e3 still give Jacobian
condition numbers ~1e7 (round trips wrong by ~1e-9). :math:`\gamma` is loose (raw
off-diagonals of a few units give :math:`\text{raw}/\sqrt M` almost exactly); the
:math:`1/\sqrt M` keeps one optimiser step, which moves every raw entry by about the
learning rate, from moving a row of :math:`M` entries by :math:`M` times the learning rate
(without it a 53-D guide diverged in its first steps). A zero raw value is the
layer :math:`\tilde R_{ii} = 1,\ R_{ii} = 0` (with zero off-diagonals and bias: the
identity map, with non-zero gradients). :math:`\tilde R_{ii} > 0` loses nothing: flipping
the signs of row :math:`i` of :math:`\tilde R`, column :math:`i` of :math:`R` and
:math:`b_i` gives the same map (``tanh`` is odd). With :math:`M = 1` a layer is exactly a
planar layer with :math:`w = \tilde R_{11} Q` and :math:`w^\top\hat u = q_1 - 1`. The
strictly lower parts of the ``R``/``R_tilde`` tensors are ignored.

**Q** (``kind``):

- ``"orthogonal"``: :math:`Q` = the first :math:`M` columns of a product of :math:`M`
  Householder reflections :math:`H_1\cdots H_M` with free vectors :math:`u_j \in
  \mathbb{R}^D`. This is an exact parametrisation of the Stiefel manifold (up to column
  signs, which :math:`R, \tilde R` absorb): every :math:`D\times M` matrix with
  orthonormal columns is :math:`H_1\cdots H_M E_M` (Householder QR), and the columns are
  orthonormal to rounding at every step, unlike the paper's iterative
  orthogonalisation, which is orthonormal only in the limit. The product is formed in one
  shot in the compact WY form :math:`H_1\cdots H_n = I - U T^{-1} U^\top`,
  :math:`T = \tfrac12\mathrm{diag}(U^\top U) + \mathrm{striu}(U^\top U)` (Joffrain et al.,
  ACM TOMS 2006), one triangular solve for all layers.
- ``"householder"``: :math:`M = D`, :math:`Q = H_1\cdots H_H` with ``num_householder``
  reflections (default ``min(D, 8)``).
- ``"triangular"``: :math:`M = D`, :math:`Q` a fixed permutation: the identity, or the
  reversal of the coordinates (``reverse=True``); stacks alternate the two.

**Inverse.** With :math:`c = By + b` and :math:`W = \tilde R R` (upper triangular,
:math:`W_{ii} = d_i`), the pre-activation :math:`a = Bx + b` of :math:`x = f^{-1}(y)`
solves :math:`a + W\tanh(a) = c`, which is triangular: from :math:`i = M` down to
:math:`1`, :math:`a_i + d_i\tanh a_i = c_i - \sum_{j>i} W_{ij}\tanh a_j` is one monotone
scalar equation (slope :math:`\ge \min(1, q_i) \ge e^{-\beta}`), solved by the planar layer's safeguarded
Newton/bisection (:func:`~pyro_nfvi.transforms.planar.planar_solve`, float64 inside,
implicit-function gradients); then :math:`x = y - A\tanh(a)`. The component of
:math:`y` orthogonal to :math:`\mathrm{range}(Q)` passes through unchanged.

**Score push-forward** (``push_score``, for sticking-the-landing gradients): with
:math:`H = \mathrm{diag}(h'(a))`, :math:`J^{-\top} s = s - B^\top H (I_M + W^\top H)^{-1}
A^\top s` (Woodbury), where :math:`I_M + W^\top H` is lower triangular with diagonal
:math:`\det` factors :math:`1 + d_i h'(a_i) > 0`: one :math:`M\times M` triangular solve per
row, no inverse of the flow.

Reference: R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester
Normalizing Flows for Variational Inference. UAI 2018, arXiv:1803.05649.

This file holds one family, as Pyro's ``transforms/*.py`` do (~720 lines): the three
``Q`` kinds, the bounded triangles, the exact inverse by back substitution and the
conditional variants share every formula; the fused kernel is in :mod:`._fused_sylvester`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule

from ._base import ConditionalFlow, ConditionedFlow, check_event, check_input_dim
from ._fused import PLAIN
from ._fused_sylvester import (
    sylvester_route,
    sylvester_stack_kernel,
    sylvester_stack_push_kernel,
    sylvester_stack_push_score,
)
from ._math import DIAG_BOUND, OFFDIAG_BOUND, planar_det, planar_log_det
from .planar import planar_solve

__all__ = [
    "ConditionedSylvester",
    "Sylvester",
    "ConditionalSylvester",
    "ConditionedStackedSylvester",
    "StackedSylvester",
    "ConditionalStackedSylvester",
    "householder_product",
]

KINDS = ("orthogonal", "householder", "triangular")


# (b, R, R_tilde, U) with U None for the triangular kind
Params = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def householder_product(U: torch.Tensor, M: int) -> torch.Tensor:
    r"""The first ``M`` columns of :math:`H_1 \cdots H_n`, :math:`H_j = I - 2 u_j u_j^\top /
    \|u_j\|^2`, for ``U = [u_1 ... u_n]`` of shape ``(..., D, n)``; shape ``(..., D, M)``.

    Compact WY form: :math:`H_1\cdots H_n = I - U T^{-1} U^\top` with
    :math:`T = \tfrac12 \mathrm{diag}(U^\top U) + \mathrm{striu}(U^\top U)`. ``‖u_j‖²`` is
    floored at ``eps²`` so that ``u_j = 0`` gives no reflection instead of NaN.
    """
    G = U.transpose(-1, -2) @ U
    diag = G.diagonal(dim1=-2, dim2=-1).clamp_min(torch.finfo(U.dtype).eps ** 2)
    T = G.triu(1) + torch.diag_embed(0.5 * diag)
    X = torch.linalg.solve_triangular(T, U[..., :M, :].transpose(-1, -2), upper=True)
    eye = torch.eye(U.shape[-2], M, dtype=U.dtype, device=U.device)
    return eye - U @ X


def _matvec(mat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``mat @ v`` over the last dims, broadcasting batch dims (``F.linear`` when ``mat``
    is unbatched: one GEMM for the whole batch)."""
    if mat.dim() == 2:
        return F.linear(v, mat)
    return (mat @ v.unsqueeze(-1)).squeeze(-1)


def _vecmat(v: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """``mat^T @ v`` over the last dims."""
    if mat.dim() == 2:
        return v @ mat
    return (v.unsqueeze(-2) @ mat).squeeze(-2)


def _bounded(raw: torch.Tensor) -> torch.Tensor:
    """Off-diagonal entries ``OFFDIAG_BOUND * tanh(raw / (OFFDIAG_BOUND sqrt(M)))`` of
    ``(..., M, M)`` raw values: ``raw / sqrt(M)`` for ``|raw| << OFFDIAG_BOUND``, never
    larger than ``OFFDIAG_BOUND``. The ``1/sqrt(M)`` keeps one optimiser step (Adam moves
    every raw entry by about the learning rate at once) from changing a row of ``M``
    entries by ``M`` times the learning rate."""
    return OFFDIAG_BOUND * torch.tanh(raw / (OFFDIAG_BOUND * math.sqrt(raw.shape[-1])))


def sylvester_triangles(R_raw: torch.Tensor, Rt_raw: torch.Tensor):
    """``(R, R_tilde, q)`` from the raw ``(..., M, M)`` tensors: strictly upper parts as
    given, ``log q = DIAG_BOUND * tanh(diag R_raw)``, ``log R_tilde_ii = DIAG_BOUND *
    tanh(diag Rt_raw)`` and ``R_ii = expm1(log q) / R_tilde_ii`` (so ``R_tilde_ii R_ii =
    q - 1``): both diagonals and ``q`` bounded for every raw value, ``±inf`` included."""
    log_q = DIAG_BOUND * torch.tanh(R_raw.diagonal(dim1=-2, dim2=-1))
    rt_diag = torch.exp(DIAG_BOUND * torch.tanh(Rt_raw.diagonal(dim1=-2, dim2=-1)))
    R = _bounded(R_raw.triu(1)) + torch.diag_embed(torch.expm1(log_q) / rt_diag)
    Rt = _bounded(Rt_raw.triu(1)) + torch.diag_embed(rt_diag)
    return R, Rt, torch.exp(log_q)


def _reverse_mask(K: int, device) -> torch.Tensor:
    """Layer ``k`` of a triangular stack uses the reversal permutation iff ``k`` is odd."""
    return (torch.arange(K, device=device) % 2 == 1).view(K, 1, 1)


def sylvester_parts(params: Params, reverse=False, with_W: bool = True):
    """``(A, B, b, q, W)``: ``A = QR (..., D, M)``, ``B = R_tilde Q^T (..., M, D)``, the
    bias, ``q = 1 + diag(W)`` and ``W = R_tilde R (..., M, M)`` (``None`` unless
    ``with_W``: the forward pass does not need it). ``reverse``: ``True``, ``False`` (one
    layer) or ``"alternate"`` (a triangular stack, layer dim -3)."""
    b, R_raw, Rt_raw, U = params
    R, Rt, q = sylvester_triangles(R_raw, Rt_raw)
    if U is not None:
        Q = householder_product(U, b.shape[-1])
        A, B = Q @ R, Rt @ Q.transpose(-1, -2)
    elif reverse == "alternate":
        mask = _reverse_mask(R.shape[-3], R.device)
        A = torch.where(mask, R.flip(-2), R)  # P R: rows reversed
        B = torch.where(mask, Rt.flip(-1), Rt)  # R_tilde P^T: columns reversed
    elif reverse:
        A, B = R.flip(-2), Rt.flip(-1)
    else:
        A, B = R, Rt
    return A, B, b, q, (Rt @ R if with_W else None)


def sylvester_layer(x, A, B, b, q) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of one layer ``y = x + A tanh(Bx + b)``."""
    t = torch.tanh(_matvec(B, x) + b)
    return x + _matvec(A, t), planar_log_det(t, q).sum(-1)


def sylvester_layer_inverse(y, A, B, b, q, W) -> torch.Tensor:
    """Exact inverse of one layer by back substitution (see the module docstring).
    Low-precision inputs are solved in float64, as for the planar inverse."""
    dtype = y.dtype
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and y.device.type != "mps":
        y, A, B, b, q, W = (v.double() for v in (y, A, B, b, q, W))
    M = b.shape[-1]
    c = _matvec(B, y) + b
    ts: List[torch.Tensor] = [None] * M  # type: ignore[list-item]
    for i in reversed(range(M)):
        a_i = planar_solve(c[..., i : i + 1], q[..., i : i + 1])
        ts[i] = torch.tanh(a_i)
        if i:
            c = c[..., :i] - W[..., :i, i] * ts[i]
    t = torch.cat(ts, -1)
    return (y - _matvec(A, t)).to(dtype)


def sylvester_push_score(x, score, A, B, b, q, W) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(y, ∇_y log p_Y(y))`` for one layer ``y = f(x)`` given ``score = ∇_x log p_X(x)``:
    ``J^{-T}(score - ∇_x log det J)`` by Woodbury (module docstring), no inverse solve.
    ``∇_x log det J = B^T [d_i h''(a_i) / (1 + d_i h'(a_i))]`` with ``h'' = -2 t h'``."""
    t = torch.tanh(_matvec(B, x) + b)
    hp = 1 - t * t
    det = planar_det(t, q)
    y = x + _matvec(A, t)
    s = score - _vecmat((q - 1) * (-2 * t * hp) / det, B)
    # N = I + W^T H: lower triangular, N_ij = W_ji h'_j below the diagonal, N_ii = det_i
    N = W.transpose(-1, -2).tril(-1) * hp.unsqueeze(-2) + torch.diag_embed(det)
    rhs = _vecmat(s, A)  # A^T s
    batch = torch.broadcast_shapes(N.shape[:-2], rhs.shape[:-1])
    M = rhs.shape[-1]
    N, rhs = N.expand(batch + (M, M)), rhs.unsqueeze(-1).expand(batch + (M, 1))
    w = torch.linalg.solve_triangular(N, rhs, upper=False).squeeze(-1)
    return y, s - _vecmat(hp * w, B)


def stacked_sylvester_plain(x: torch.Tensor, params: Params) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of K layers by the plain autograd loop (the reference for the
    fused kernel): ``Q``, ``A = QR`` and ``B = R~Q^T`` of all layers in one batched pass,
    then two matrix products and a ``tanh`` per layer."""
    A, B, b, q, _ = sylvester_parts(params, "alternate", with_W=False)
    ts = []
    if A.dim() == 3:  # unbatched parameters: each product is one GEMM with its bias
        D = x.shape[-1]
        z, At, Bt = x.reshape(-1, D), A.transpose(-1, -2), B.transpose(-1, -2)
        for k in range(b.shape[-2]):
            t = torch.tanh(torch.addmm(b[k], z, Bt[k]))
            z = torch.addmm(z, t, At[k])
            ts.append(t)
        ladj = planar_log_det(torch.stack(ts, -2), q).sum((-1, -2))
        return z.reshape(x.shape), ladj.reshape(x.shape[:-1])
    for k in range(b.shape[-2]):
        t = torch.tanh(_matvec(B[..., k, :, :], x) + b[..., k, :])
        x = x + _matvec(A[..., k, :, :], t)
        ts.append(t)
    # log-dets of all layers in one op from the stored activations
    return x, planar_log_det(torch.stack(ts, -2), q).sum((-1, -2))


def stacked_sylvester(x: torch.Tensor, params: Params) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, log|det J|)`` of K layers: the fused kernel of :mod:`._fused_sylvester` where
    :func:`._fused.stack_route` says so (unbatched parameters), else the plain loop."""
    route = sylvester_route(x, params)
    if route != PLAIN:
        return sylvester_stack_kernel(x, params, stacked_sylvester_plain, route)
    return stacked_sylvester_plain(x, params)


def _check_params(params, stacked: bool) -> Params:
    params = params() if callable(params) else params
    if len(params) == 3:
        b, R, Rt = params
        U = None
    elif len(params) == 4:
        b, R, Rt, U = params
    else:
        raise ValueError(f"sylvester params must be (b, R, R_tilde[, U]), got {len(params)} tensors")
    lead = 2 if stacked else 1
    M = b.shape[-1] if b.dim() >= lead else -1
    ok = M >= 1 and R.shape[-2:] == (M, M) and Rt.shape[-2:] == (M, M)
    if U is not None:
        ok = ok and U.dim() >= lead + 1 and U.shape[-2] >= M
        if stacked:
            ok = ok and R.shape[-3] == Rt.shape[-3] == U.shape[-3] == b.shape[-2]
    elif stacked:
        ok = ok and R.dim() >= 3 and R.shape[-3] == Rt.shape[-3] == b.shape[-2]
    if not ok:
        K = "K, " if stacked else ""
        raise ValueError(
            f"{'stacked ' if stacked else ''}sylvester params must be (b (..., {K}M), "
            f"R (..., {K}M, M), R_tilde (..., {K}M, M)[, U (..., {K}D, n) with D >= M]); got shapes "
            + ", ".join(str(tuple(p.shape)) for p in (b, R, Rt) + ((U,) if U is not None else ()))
        )
    return b, R, Rt, U


def _event_dim(params: Params) -> int:
    b, _, _, U = params
    return U.shape[-2] if U is not None else b.shape[-1]


def _checked_input(x: torch.Tensor, params: Params, stacked: bool, name: str = "x"):
    """``(x, params)``: ``x`` checked against the parameters (event size, a batch shape
    that broadcasts against a context's, dtype: integers promoted), both in the promoted
    floating dtype (what planar and radial layers get from torch's arithmetic)."""
    b = params[0]
    batch = b.shape[:-2] if stacked else b.shape[:-1]
    x = check_event(x, _event_dim(params), name, dtype=b.dtype, batch_shape=batch)
    dtype = torch.promote_types(x.dtype, b.dtype)
    if x.dtype != dtype:
        x = x.to(dtype)
    if b.dtype != dtype:
        params = tuple(None if p is None else p.to(dtype) for p in params)
    return x, params


def _init_raw_(b, R, Rt, U, near_identity: bool) -> None:
    """Default initialisation of raw parameters (in place, under no_grad)."""
    M = b.shape[-1]
    bound = 1.0 / math.sqrt(M)
    with torch.no_grad():
        b.zero_()
        R.uniform_(-bound, bound)
        Rt.uniform_(-bound, bound)
        if U is not None:
            U.normal_()
        if near_identity:
            # raw diagonals ~0: q ~ 1 (R_ii ~ 0) and R_tilde_ii = 1; R's off-diagonals ~0.01,
            # so each layer starts within ~0.01 of the identity
            R.normal_(0.0, 0.01)
            Rt.diagonal(dim1=-2, dim2=-1).zero_()


def _resolve(input_dim: int, bottleneck, kind: str, num_householder) -> Tuple[int, int, Optional[int]]:
    """Check the constructor arguments; return ``(D, M, n)`` (``n``: number of Householder
    vectors, ``None`` for the triangular kind)."""
    D = check_input_dim(input_dim)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    M = D if bottleneck is None else check_input_dim(bottleneck, "bottleneck")
    if kind == "orthogonal":
        if M > D:
            raise ValueError(f"bottleneck must be <= input_dim ({D}), got {M}")
        if num_householder is not None:
            raise ValueError("num_householder applies to kind='householder' only")
        return D, M, M
    if M != D:
        raise ValueError(f"kind={kind!r} needs bottleneck == input_dim ({D}), got {M}")
    if kind == "triangular":
        if num_householder is not None:
            raise ValueError("num_householder applies to kind='householder' only")
        return D, D, None
    n = min(D, 8) if num_householder is None else check_input_dim(num_householder, "num_householder")
    return D, D, n


class ConditionedSylvester(ConditionedFlow):
    r"""A Sylvester layer with given raw parameters ``(b, R, R_tilde, U)`` (or
    ``(b, R, R_tilde)`` for a permutation ``Q``), or a callable returning them, with an
    exact inverse of any point. See the module docstring / :class:`Sylvester` for the math
    and how the raw tensors map to :math:`Q, R, \tilde R`.

    Parameters may carry batch dimensions (as produced by a hypernetwork); they broadcast
    against the batch shape of the input.

    :param params: ``b (..., M)``, ``R (..., M, M)`` (diagonal: raw ``rho``),
        ``R_tilde (..., M, M)`` (diagonal: raw ``sigma``) and, unless ``Q`` is a
        permutation, Householder vectors ``U (..., D, n)`` (``Q`` = first ``M`` columns of
        their product; ``M <= D``).
    :param reverse: with no ``U``: ``Q`` reverses the coordinates instead of the identity.
    """

    def __init__(self, params, reverse: bool = False, cache_size: int = 1):
        super().__init__(params, cache_size=cache_size)
        self.reverse = bool(reverse)

    @property
    def sign(self) -> int:
        """``det J > 0`` everywhere."""
        return 1

    def _parts(self, x: torch.Tensor, name: str = "x", with_W: bool = True):
        """``(x, parts)``: the input checked (:func:`_checked_input`) and the layer's
        matrices in its dtype."""
        params = _check_params(self._params, stacked=False)
        x, params = _checked_input(x, params, stacked=False, name=name)
        return x, sylvester_parts(params, self.reverse, with_W)

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass."""
        x, (A, B, b, q, _) = self._parts(x, with_W=False)
        return sylvester_layer(x, A, B, b, q)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        y, parts = self._parts(y, "y")
        return sylvester_layer_inverse(y, *parts)

    @torch.no_grad()
    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, without an
        inverse (see :func:`sylvester_push_score`); used for sticking-the-landing gradients."""
        x, parts = self._parts(x)
        score = check_event(score, x.shape[-1], "score", dtype=x.dtype).to(x.dtype)
        return sylvester_push_score(x, score, *parts)


class Sylvester(ConditionedSylvester, TransformModule):
    r"""A learnable Sylvester flow layer (van den Berg et al. 2018),

    .. math::

        y = x + Q R \tanh(\tilde R Q^\top x + b),\qquad
        \log|\det J| = \sum_{i=1}^M \log\big(1 + \tilde R_{ii} R_{ii} (1 - \tanh^2 a_i)\big),

    with :math:`Q \in \mathbb{R}^{D\times M}` orthonormal, :math:`R, \tilde R` upper
    triangular, :math:`1 + \tilde R_{ii} R_{ii} = e^{\tanh\rho_i}` and every entry of
    :math:`R, \tilde R` bounded (module docstring), so the layer is well conditioned for
    every parameter value.
    Unlike :class:`pyro.distributions.transforms.Sylvester`, the inverse of *any* point is
    computed (back substitution over ``M`` monotone scalar equations), so ``log_prob`` of
    data works with correct gradients, and the log-det matches the Jacobian at any
    parameter values.

    Example:

    >>> import torch, pyro.distributions as dist
    >>> from pyro_nfvi.transforms import Sylvester
    >>> flow = Sylvester(5, bottleneck=2)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(5), 1.0).to_event(1), [flow])
    >>> q.log_prob(torch.randn(3, 5)).shape
    torch.Size([3])
    >>> x = torch.randn(4, 5)
    >>> torch.allclose(flow._inverse(flow(x)), x, atol=1e-5)
    True

    :param input_dim: dimension ``D``.
    :param bottleneck: ``M`` (default ``D``; must be ``D`` unless ``kind="orthogonal"``).
    :param kind: how ``Q`` is built: ``"orthogonal"`` (``M`` Householder reflections
        truncated to ``M`` columns, exact on the Stiefel manifold), ``"householder"``
        (``num_householder`` reflections, ``M = D``), ``"triangular"`` (a fixed permutation).
    :param num_householder: reflections for ``kind="householder"`` (default ``min(D, 8)``).
    :param reverse: ``kind="triangular"`` only: ``Q`` reverses the coordinates.

    Parameters: ``b (M,)``, ``R (M, M)``, ``R_tilde (M, M)`` (raw: see
    :class:`ConditionedSylvester`) and ``U (D, n)`` unless triangular.

    Reference: R. van den Berg, L. Hasenclever, J. M. Tomczak, M. Welling. Sylvester
    Normalizing Flows for Variational Inference. UAI 2018, arXiv:1803.05649.
    """

    def __init__(
        self,
        input_dim: int,
        bottleneck: Optional[int] = None,
        kind: str = "orthogonal",
        num_householder: Optional[int] = None,
        reverse: bool = False,
    ):
        D, M, n = _resolve(input_dim, bottleneck, kind, num_householder)
        if reverse and kind != "triangular":
            raise ValueError("reverse applies to kind='triangular' only")
        super().__init__(self._params_tuple, reverse=reverse)
        self.input_dim, self.bottleneck, self.kind, self.num_householder = D, M, kind, n
        self.b = nn.Parameter(torch.empty(M))
        self.R = nn.Parameter(torch.empty(M, M))
        self.R_tilde = nn.Parameter(torch.empty(M, M))
        self.U = nn.Parameter(torch.empty(D, n)) if n is not None else None
        self.reset_parameters()

    def _params_tuple(self) -> Params:
        return self.b, self.R, self.R_tilde, self.U

    def reset_parameters(self, near_identity: bool = False) -> None:
        """Raw ``R``, ``R_tilde`` ~ U(±1/√M), ``b = 0``, ``U ~ N(0, 1)``; or with
        ``near_identity=True`` the layer starts within ~0.01 of the identity map."""
        _init_raw_(self.b, self.R, self.R_tilde, self.U, near_identity)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, bottleneck={self.bottleneck}, kind={self.kind!r}"


def _hyper_sizes(D: int, M: int, n: Optional[int], K: int = 1) -> List[int]:
    tri = M * (M + 1) // 2
    sizes = [K * M, K * tri, K * tri]
    return sizes + ([K * D * n] if n is not None else [])


def _unpack_triu(packed: torch.Tensor, M: int) -> torch.Tensor:
    """``(..., M(M+1)/2)`` upper triangle (row-major, with diagonal) -> ``(..., M, M)``."""
    rows, cols = torch.triu_indices(M, M, device=packed.device)
    index = torch.full((M * M,), M * (M + 1) // 2, dtype=torch.long, device=packed.device)
    index[rows * M + cols] = torch.arange(rows.numel(), device=packed.device)
    padded = torch.cat([packed, packed.new_zeros(packed.shape[:-1] + (1,))], -1)
    return padded[..., index].unflatten(-1, (M, M))


class _ConditionalSylvesterBase(ConditionalFlow):
    def __init__(self, nn, input_dim, bottleneck, kind, num_householder, num_flows: int = 1):
        super().__init__(nn)
        self.input_dim, self.bottleneck, self.num_householder = _resolve(
            input_dim, bottleneck, kind, num_householder
        )
        self.kind = kind
        self.num_flows = num_flows
        self.param_dims = _hyper_sizes(self.input_dim, self.bottleneck, self.num_householder, num_flows)

    def _unpacked(self, context: torch.Tensor, stacked: bool):
        out = self.nn(context)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        got = [o.shape[-1] for o in out]
        if got != self.param_dims:
            raise ValueError(
                f"hypernetwork outputs must have last dims {self.param_dims} "
                f"(b, R and R_tilde upper triangles{', Householder vectors' if self.num_householder else ''}), got {got}"
            )
        D, M, n, K = self.input_dim, self.bottleneck, self.num_householder, self.num_flows
        b, r, rt = out[:3]
        if stacked:
            b, r, rt = b.unflatten(-1, (K, M)), r.unflatten(-1, (K, -1)), rt.unflatten(-1, (K, -1))
        params = [b, _unpack_triu(r, M), _unpack_triu(rt, M)]
        if n is not None:
            u = out[3].unflatten(-1, (K, D, n) if stacked else (D, n))
            params.append(u)
        return tuple(params)


class ConditionalSylvester(_ConditionalSylvesterBase):
    r"""A Sylvester layer whose parameters come from a hypernetwork applied to a context
    (the paper's amortised version): ``ConditionalSylvester(nn, D, ...).condition(context)``
    is a :class:`ConditionedSylvester`. ``nn`` maps a context ``(..., C)`` to tensors with
    last dims ``[M, M(M+1)/2, M(M+1)/2, D*n]`` (``b``, the upper triangles of ``R`` and
    ``R_tilde`` row-major with their raw diagonals, and the Householder vectors; no last
    one for ``kind="triangular"``), listed in ``self.param_dims``. A context of batch
    shape ``(N,)`` transforms input row ``i`` with the parameters of context row ``i``.

    Example:

    >>> import torch
    >>> from pyro.nn import DenseNN
    >>> from pyro_nfvi.transforms import ConditionalSylvester
    >>> flow = ConditionalSylvester(DenseNN(3, [16], param_dims=[2, 3, 3, 8]), 4, bottleneck=2)
    >>> flow.param_dims
    [2, 3, 3, 8]
    >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 4)).shape
    torch.Size([5, 4])

    :param nn: the hypernetwork.
    :param input_dim: ``D``; ``bottleneck``, ``kind``, ``num_householder``, ``reverse``
        as in :class:`Sylvester`.
    """

    def __init__(
        self,
        nn: torch.nn.Module,
        input_dim: int,
        bottleneck: Optional[int] = None,
        kind: str = "orthogonal",
        num_householder: Optional[int] = None,
        reverse: bool = False,
    ):
        super().__init__(nn, input_dim, bottleneck, kind, num_householder)
        if reverse and kind != "triangular":
            raise ValueError("reverse applies to kind='triangular' only")
        self.reverse = bool(reverse)

    def _context_params(self, context: torch.Tensor) -> Params:
        return self._unpacked(context, stacked=False)

    def _conditioned(self, params) -> ConditionedSylvester:
        return ConditionedSylvester(params, reverse=self.reverse)


class ConditionedStackedSylvester(ConditionedFlow):
    r"""``K`` Sylvester layers applied in order, raw parameters stacked along a layer
    dimension: ``(b (..., K, M), R (..., K, M, M), R_tilde (..., K, M, M)[, U (..., K, D,
    n)])`` or a callable returning them. Same map, log-det and inverse as composing ``K``
    :class:`ConditionedSylvester` layers; without ``U`` (triangular kind) layer ``k`` uses
    the identity for even ``k`` and the reversal for odd ``k``, as in the paper.
    ``Q``, ``A = QR`` and ``B = R̃Qᵀ`` of all layers are formed in one batched pass; the
    forward is then two matrix products and a ``tanh`` per layer.
    """

    @property
    def sign(self) -> int:
        """``det J > 0`` everywhere."""
        return 1

    def _input(self, x: torch.Tensor, name: str = "x"):
        """``(x, params)``, checked and in one dtype (:func:`_checked_input`)."""
        return _checked_input(x, _check_params(self._params, stacked=True), stacked=True, name=name)

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass (the fused kernel where
        :func:`stacked_sylvester` picks it)."""
        x, params = self._input(x)
        return stacked_sylvester(x, params)

    def call_ladj_and_push(
        self, x: torch.Tensor, score: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|, ∇_y log p_Y(y))``: :meth:`call_and_ladj` and the score of
        :meth:`push_score` (no gradient through it), in ONE pass of the fused kernel where
        it runs (the push reuses the layers' activations), else the two calls."""
        x, params = self._input(x)
        route = sylvester_route(x, params)
        if route != PLAIN and score.shape == x.shape and score.dtype == x.dtype:
            return sylvester_stack_push_kernel(x, params, stacked_sylvester_plain, score, route)
        y, ladj = stacked_sylvester(x, params)
        return y, ladj, self.push_score(x.detach(), score)[1]

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        y, params = self._input(y, "y")
        A, B, b, q, W = sylvester_parts(params, "alternate")
        for k in reversed(range(b.shape[-2])):
            y = sylvester_layer_inverse(
                y, A[..., k, :, :], B[..., k, :, :], b[..., k, :], q[..., k, :], W[..., k, :, :]
            )
        return y

    @torch.no_grad()
    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, layer by
        layer without an inverse (see :func:`sylvester_push_score`)."""
        x, params = self._input(x)
        score = check_event(score, x.shape[-1], "score", dtype=x.dtype).to(x.dtype)
        route = sylvester_route(x, params)
        if route != PLAIN and score.dtype == x.dtype:
            return sylvester_stack_push_score(x, score, params, route)
        A, B, b, q, W = sylvester_parts(params, "alternate")
        for k in range(b.shape[-2]):
            x, score = sylvester_push_score(
                x, score, A[..., k, :, :], B[..., k, :, :], b[..., k, :], q[..., k, :], W[..., k, :, :]
            )
        return x, score


class StackedSylvester(ConditionedStackedSylvester, TransformModule):
    r"""``num_flows`` learnable Sylvester layers in one module (parameters stacked along
    a leading layer dimension). Equal to composing ``num_flows`` :class:`Sylvester`
    layers with the same parameters (alternating identity / reversal for
    ``kind="triangular"``); ``Q`` of every layer is built in one batched triangular solve
    and the forward is two matrix products per layer.

    Example:

    >>> import torch
    >>> from pyro_nfvi.transforms import StackedSylvester
    >>> flow = StackedSylvester(3, num_flows=4, bottleneck=2)
    >>> x = torch.randn(6, 3)
    >>> y, ladj = flow.call_and_ladj(x)
    >>> torch.allclose(flow._inverse(y), x, atol=1e-5), ladj.shape
    (True, torch.Size([6]))

    **Speed.** With unbatched parameters the forward pass, log-det and backward run in
    one hand-written ``autograd.Function`` (:mod:`._fused_sylvester`: NumPy on CPU,
    torch elsewhere, routed by :func:`~pyro_nfvi.transforms._fused.stack_route`), and
    :meth:`push_score` in one NumPy/torch pass; the plain autograd loop
    (:func:`stacked_sylvester_plain`) is the reference they are tested against. Measured
    ratios: ``benchmarks/bench_sylvester.py``.

    :param input_dim: ``D``.
    :param num_flows: ``K``.
    :param bottleneck, kind, num_householder: as in :class:`Sylvester`.
    """

    def __init__(
        self,
        input_dim: int,
        num_flows: int,
        bottleneck: Optional[int] = None,
        kind: str = "orthogonal",
        num_householder: Optional[int] = None,
    ):
        D, M, n = _resolve(input_dim, bottleneck, kind, num_householder)
        K = check_input_dim(num_flows, "num_flows")
        super().__init__(self._params_tuple)
        self.input_dim, self.bottleneck, self.kind, self.num_householder = D, M, kind, n
        self.num_flows = K
        self.b = nn.Parameter(torch.empty(K, M))
        self.R = nn.Parameter(torch.empty(K, M, M))
        self.R_tilde = nn.Parameter(torch.empty(K, M, M))
        self.U = nn.Parameter(torch.empty(K, D, n)) if n is not None else None
        self.reset_parameters()

    def _params_tuple(self) -> Params:
        return self.b, self.R, self.R_tilde, self.U

    def reset_parameters(self, near_identity: bool = False) -> None:
        """As :meth:`Sylvester.reset_parameters`, for every layer."""
        _init_raw_(self.b, self.R, self.R_tilde, self.U, near_identity)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, num_flows={self.num_flows}, "
            f"bottleneck={self.bottleneck}, kind={self.kind!r}"
        )


class ConditionalStackedSylvester(_ConditionalSylvesterBase):
    r"""``K`` conditional Sylvester layers whose parameters all come from ONE
    hypernetwork call: ``nn`` maps a context to tensors with last dims
    ``self.param_dims = [K*M, K*M(M+1)/2, K*M(M+1)/2, K*D*n]`` (no last one for
    ``kind="triangular"``); ``.condition(context)`` is a
    :class:`ConditionedStackedSylvester`.

    Example:

    >>> import torch
    >>> from pyro.nn import DenseNN
    >>> from pyro_nfvi.transforms import ConditionalStackedSylvester
    >>> flow = ConditionalStackedSylvester(
    ...     DenseNN(3, [16], param_dims=[6, 9, 9]), 2, num_flows=3, kind="triangular")
    >>> flow.condition(torch.randn(5, 3))(torch.randn(5, 2)).shape
    torch.Size([5, 2])

    :param nn: the hypernetwork.
    :param input_dim: ``D``.
    :param num_flows: ``K``.
    :param bottleneck, kind, num_householder: as in :class:`Sylvester`.
    """

    def __init__(
        self,
        nn: torch.nn.Module,
        input_dim: int,
        num_flows: int,
        bottleneck: Optional[int] = None,
        kind: str = "orthogonal",
        num_householder: Optional[int] = None,
    ):
        K = check_input_dim(num_flows, "num_flows")
        super().__init__(nn, input_dim, bottleneck, kind, num_householder, num_flows=K)

    def _context_params(self, context: torch.Tensor) -> Params:
        return self._unpacked(context, stacked=True)

    def _conditioned(self, params) -> ConditionedStackedSylvester:
        return ConditionedStackedSylvester(params)
