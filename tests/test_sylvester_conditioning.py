"""Sylvester layers stay well conditioned for every parameter value (issue 21, item 1).

Before the bounded diagonals, R_ii = (q_i - 1) / R~_ii with R~_ii = softplus(sigma_i)
floored at eps: a hypernetwork output sigma ~ -40 gave R_ii ~ 1e16, outputs of 1e17 and
round trips wrong by 1e17. Now log q_i and log R~_ii are DIAG_BOUND * tanh(raw), so every
det factor lies in [e^-B, e^B] and R_ii, R~_ii are bounded whatever the raw values.
References: float64 autograd Jacobians + slogdet, and x -> y -> x round trips.
"""

import math

import pytest
import torch

from pyro_nfvi import helpers
from pyro_nfvi.transforms import ConditionedStackedSylvester, ConditionedSylvester, StackedSylvester, Sylvester
from pyro_nfvi.transforms.sylvester import DIAG_BOUND, sylvester_triangles

# (kind, bottleneck) for D = 4
KINDS = {
    "orthogonal_MD": ("orthogonal", 4),
    "orthogonal_M2": ("orthogonal", 2),
    "householder": ("householder", 4),
    "triangular": ("triangular", 4),
}
D, C, K, N = 4, 3, 8, 5


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max())


def _jacobian_log_dets(fn, x):
    """slogdet of the autograd Jacobian of each row of ``x (N, D)`` (rows independent)."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).sum(0), x)  # (D, N, D)
    jac = jac.permute(1, 0, 2)
    sign, logabs = torch.linalg.slogdet(jac)
    assert (sign > 0).all()
    return logabs


def _check(t, x, rt_tol=1e-10, ld_tol=1e-8):
    y, ladj = t.call_and_ladj(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    x_back = t._inverse(y.detach().clone())
    assert _rel(x_back, x) <= rt_tol, _rel(x_back, x)
    ref = _jacobian_log_dets(lambda v: t.call_and_ladj(v)[0], x)
    err = float(((ladj.detach() - ref).abs() / ref.abs().clamp_min(1.0)).max())
    assert err <= ld_tol, err
    return y, ladj


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stacked", [True, False])
def test_conditional_flows_at_large_hypernetwork_weights(kind, scale, stacked):
    """The issue's repro: ``conditional_sylvester_flow(4, 3, 8)`` with hypernetwork weights
    ~ N(0, scale^2) (raw outputs up to ~5e3 at scale 3), float64, three draws each."""
    name, M = KINDS[kind]
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        if stacked:
            flow = helpers.conditional_sylvester_flow(D, C, K, bottleneck=M, kind=name)
        else:
            flow = helpers.conditional_sylvester(D, C, bottleneck=M, kind=name)
        flow = flow.double()
        with torch.no_grad():
            for p in flow.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        ctx = torch.randn(N, C, generator=gen, dtype=torch.float64)
        x = torch.randn(N, D, generator=gen, dtype=torch.float64)
        _check(flow.condition(ctx), x)


def _raw_params(kind, M, rho, sigma, stacked, seed):
    """Raw parameters with N(0, 1) off-diagonals, bias and Householder vectors, and the raw
    diagonals of R / R_tilde set to ``rho`` / ``sigma`` (tensors of shape (M,))."""
    gen = torch.Generator().manual_seed(seed)
    lead = (K,) if stacked else ()
    n = {"orthogonal": M, "householder": 3, "triangular": None}[kind]
    b = torch.randn(lead + (M,), generator=gen, dtype=torch.float64)
    R = torch.randn(lead + (M, M), generator=gen, dtype=torch.float64)
    Rt = torch.randn(lead + (M, M), generator=gen, dtype=torch.float64)
    R.diagonal(dim1=-2, dim2=-1).copy_(rho)
    Rt.diagonal(dim1=-2, dim2=-1).copy_(sigma)
    params = (b, R, Rt)
    if n is not None:
        params += (torch.randn(lead + (D, n), generator=gen, dtype=torch.float64),)
    return params


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stacked", [True, False])
def test_raw_diagonals_at_plus_minus_40_stay_invertible(kind, stacked):
    """Training may drive raw diagonals anywhere: at ±40 (tanh saturates to ±1 in
    float64) every sign pattern still gives a finite, exactly invertible map whose
    log-det matches slogdet, with finite gradients."""
    name, M = KINDS[kind]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64) * 2
    for seed, (rho, sigma) in enumerate([(40.0, -40.0), (-40.0, 40.0), (-40.0, -40.0), (40.0, 40.0)]):
        signs = torch.tensor([1.0, -1.0] * (M // 2) + [1.0] * (M % 2), dtype=torch.float64)
        for r, s in ((rho, sigma), (rho * signs, sigma * signs.flip(0))):
            params = _raw_params(name, M, torch.as_tensor(r), torch.as_tensor(s), stacked, seed)
            params = tuple(p.requires_grad_() for p in params)
            t = ConditionedStackedSylvester(params) if stacked else ConditionedSylvester(params)
            xr = x.clone().requires_grad_()
            y, ladj = _check(t, xr)
            layers = K if stacked else 1
            assert ladj.abs().max() <= layers * M * DIAG_BOUND + 1e-12
            grads = torch.autograd.grad(y.sum() + ladj.sum(), (xr,) + params)
            assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("raw", [-math.inf, -800.0, -40.0, 0.0, 40.0, 800.0, math.inf])
def test_diagonals_are_bounded_for_every_raw_value(raw):
    """``|log q| <= B`` and ``|log R~_ii| <= B``, so ``|R_ii| <= (e^B - 1) e^B``; raw 0 is
    ``R~_ii = 1, R_ii = 0`` (q = 1)."""
    R_raw = torch.full((3, 3), raw, dtype=torch.float64)
    R, Rt, q = sylvester_triangles(R_raw, R_raw.clone())
    dR, dRt = R.diagonal(), Rt.diagonal()
    bound = math.expm1(DIAG_BOUND) * math.exp(DIAG_BOUND)
    assert torch.isfinite(dR).all() and (dR.abs() <= bound).all()
    assert (q.log().abs() <= DIAG_BOUND + 1e-15).all() and (dRt.log().abs() <= DIAG_BOUND + 1e-15).all()
    assert torch.allclose(dRt * dR, q - 1, rtol=1e-14, atol=1e-300)
    if raw == 0.0:
        assert (dRt == 1).all() and (dR == 0).all() and (q == 1).all()


@pytest.mark.parametrize("kind", ["orthogonal", "householder", "triangular"])
def test_learnable_modules_with_extreme_raw_diagonals(kind):
    """The learnable classes themselves (Sylvester, StackedSylvester), diagonals pushed to
    ±40 as an optimiser could: round trip and log-det still exact."""
    for flow in (Sylvester(D, kind=kind), StackedSylvester(D, K, kind=kind)):
        flow = flow.double()
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in flow.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            sign = torch.where(torch.rand(flow.R.diagonal(dim1=-2, dim2=-1).shape, generator=gen) < 0.5, -40.0, 40.0)
            flow.R.diagonal(dim1=-2, dim2=-1).copy_(sign)
            flow.R_tilde.diagonal(dim1=-2, dim2=-1).copy_(-sign)
        _check(flow, torch.randn(N, D, generator=gen, dtype=torch.float64) * 2)
