"""The flow guides' full-rank affine layer (guides/affine.py) against Pyro's
LowerCholeskyAffine and float64 autograd: values, inverse, log-determinant, pushed score."""

import pytest
import torch
from pyro.distributions.transforms import LowerCholeskyAffine

from pyro_nfvi.guides.affine import ScaledUnitLowerAffine


def _layer(D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    loc = torch.randn(D, generator=gen, dtype=torch.float64)
    scale = torch.rand(D, generator=gen, dtype=torch.float64) * 3 + 0.2
    tril = torch.randn(D, D, generator=gen, dtype=torch.float64).tril(-1) * 2 + torch.eye(D, dtype=torch.float64)
    return loc, scale, tril


@pytest.mark.parametrize("shape", [(4,), (7, 4), (3, 5, 4)])
def test_matches_lower_cholesky_affine_and_autograd(shape):
    loc, scale, tril = _layer()
    t = ScaledUnitLowerAffine(loc, scale, tril)
    ref = LowerCholeskyAffine(loc, scale[:, None] * tril)
    x = torch.randn(shape, dtype=torch.float64) * 2
    y = t(x)
    assert y.shape == x.shape and torch.allclose(y, ref(x), atol=1e-12)
    assert torch.allclose(t.inv(y), x, atol=1e-10)  # round trip x -> y -> x
    ladj = t.log_abs_det_jacobian(x, y)
    assert ladj.shape == shape[:-1]
    jac = torch.autograd.functional.jacobian(t, x.reshape(-1, 4)[0])
    assert torch.allclose(ladj.reshape(-1)[0], torch.linalg.slogdet(jac)[1], atol=1e-10)
    assert torch.allclose(t.scale_tril, ref.scale_tril)


def test_pushed_score_is_the_inverse_transpose_jacobian():
    """For z = loc + L x, ∇_z log q(z) = L^{-T} ∇_x log q(x)."""
    loc, scale, tril = _layer(D=5, seed=3)
    t = ScaledUnitLowerAffine(loc, scale, tril)
    s = torch.randn(6, 5, dtype=torch.float64)
    L = scale[:, None] * tril
    expected = torch.linalg.solve(L.mT, s.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(t.pushed_score(s), expected, atol=1e-10)
    assert torch.allclose(t.pushed_score(s[0]), expected[0], atol=1e-10)  # a single row
