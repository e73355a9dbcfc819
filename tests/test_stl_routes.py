"""The score push of sticking-the-landing (``push_score``) on every route of a planar /
radial stack: the plain layer loop (the reference implementation), the fused NumPy
kernel and the fused torch kernel, each against ∇_y log q(y) computed by autograd
through the exact inverse (float64)."""

import pytest
import torch

import pyro.distributions as dist

from pyro_nfvi.transforms import (
    ConditionedStackedPlanar,
    ConditionedStackedRadial,
    StackedPlanar,
    StackedRadial,
    _fused,
)
from pyro_nfvi.transforms._math import split_planar_theta, split_radial_theta

ROUTES = (_fused.PLAIN,) + _fused.KERNEL_ROUTES
PUSH_KERNELS = {"planar": "_planar_push", "radial": "_radial_push"}


def _flow(kind, D, K, packed, seed, scale=1.5):
    """A float64 stack with N(0, scale²) parameters (far from any initialisation): the
    learnable module (packed ``theta``) or a conditioned stack given the tuple."""
    gen = torch.Generator().manual_seed(seed)
    module = (StackedPlanar if kind == "planar" else StackedRadial)(D, K).double()
    with torch.no_grad():
        module.theta.copy_(torch.randn(module.theta.shape, generator=gen, dtype=torch.float64) * scale)
    if packed:
        return module
    split = split_planar_theta if kind == "planar" else split_radial_theta
    cls = ConditionedStackedPlanar if kind == "planar" else ConditionedStackedRadial
    return cls(tuple(p.detach() for p in split(module.theta, D)))


def _reference_score(flow, y, D):
    """∇_y log q(y), q = flow pushforward of N(0, I), by autograd through the inverse."""
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    z = y.detach().clone().requires_grad_()
    (score,) = torch.autograd.grad(q.log_prob(z).sum(), z)
    return score


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("packed", [True, False], ids=["learnable", "conditioned"])
@pytest.mark.parametrize(
    "kind, D",
    # radial D = 20: the kernel's layout for large D (views, not copies)
    [("planar", 1), ("planar", 3), ("planar", 8), ("radial", 1), ("radial", 3), ("radial", 20)],
)
@pytest.mark.parametrize("batch", [(), (1,), (9,), (2, 3)])
def test_push_score_every_route_matches_autograd_through_inverse(route, packed, kind, D, batch, monkeypatch):
    flow = _flow(kind, D, K=6, packed=packed, seed=D + len(batch))
    gen = torch.Generator().manual_seed(17 + D)
    x = torch.randn(batch + (D,), generator=gen, dtype=torch.float64) * 1.5
    calls = []
    kernel = getattr(_fused, PUSH_KERNELS[kind])
    monkeypatch.setattr(_fused, PUSH_KERNELS[kind], lambda xp, *a: calls.append(xp) or kernel(xp, *a))
    with _fused.forced_route(route):
        y, score = flow.push_score(x, -x)  # ∇ log N(x; 0, I) = -x
    # the route asked for is the route taken
    expected = {_fused.PLAIN: [], _fused.FUSED_NUMPY: ["numpy"], _fused.FUSED_TORCH: ["torch"]}[route]
    assert [xp.__name__ for xp in calls] == expected
    assert y.shape == score.shape == x.shape and score.dtype == torch.float64
    assert not score.requires_grad
    y_ref, ladj = flow.call_and_ladj(x)
    assert torch.allclose(y, y_ref, atol=1e-12, rtol=0)
    ref = _reference_score(flow, y, D)
    assert torch.allclose(score, ref, atol=1e-9, rtol=1e-9), (score - ref).abs().max()


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_push_score_kernels_agree_in_float32(kind, monkeypatch):
    """float32 on the guide's default path (learnable stack, NumPy) equals the float64
    plain loop to float32 accuracy; the torch kernel agrees with the NumPy one. (Parameter
    scale 0.5: 32 layers at scale 1.5 are so near-singular that the score reaches 1e9
    and float32 itself, on any route, is off by 1e6.)"""
    flow64 = _flow(kind, 4, K=32, packed=True, seed=1, scale=0.5)
    flow32 = _flow(kind, 4, K=32, packed=True, seed=1, scale=0.5).float()
    x = torch.randn(300, 4, dtype=torch.float64)
    score0 = -x + 0.3 * torch.randn_like(x)  # any score, not only the base's
    with _fused.forced_route(_fused.PLAIN):
        y_ref, s_ref = flow64.push_score(x, score0)
    results = []
    for route in _fused.KERNEL_ROUTES:
        with _fused.forced_route(route):
            results.append(flow32.push_score(x.float(), score0.float()))
    for y, s in results:
        assert y.dtype == s.dtype == torch.float32
        assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max().item())
        assert torch.allclose(s.double(), s_ref, rtol=1e-3, atol=1e-3 * s_ref.abs().max().item())


def test_radial_push_at_the_centre_is_finite():
    """A point exactly at a layer's centre (r = 0) gets the plain loop's score (n = 0)."""
    flow = _flow("radial", 3, K=2, packed=True, seed=0)
    x = flow.x0[:1].detach().clone()  # the first layer's centre
    score = torch.randn(1, 3, dtype=torch.float64)
    with _fused.forced_route(_fused.PLAIN):
        ref = flow.push_score(x, score)
    for route in _fused.KERNEL_ROUTES:
        with _fused.forced_route(route):
            y, s = flow.push_score(x, score)
        assert torch.isfinite(s).all()
        assert torch.allclose(y, ref[0], atol=1e-12) and torch.allclose(s, ref[1], atol=1e-12)


def test_forced_route_rejects_unknown_routes():
    with pytest.raises(ValueError, match="route"):
        with _fused.forced_route("cuda"):
            pass
