"""Partial non-centring of MultivariateNormal sites (issue 21, item 6): the map's exact
log-determinant against float64 autograd Jacobians + slogdet, its inverse, and the guide
placing an MVN site whose scale_tril depends on other latent sites."""

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.importance import vectorized_importance_weights

from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow
from pyro_nfvi.guides.placement import mvn_placement, mvn_unplacement


def _random_tril(T, batch=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(batch + (T, T), generator=g, dtype=torch.float64).tril(-1)
    diag = torch.randn(batch + (T,), generator=g, dtype=torch.float64).exp()
    return L + torch.diag_embed(diag)


@pytest.mark.parametrize("centering", ["none", "zero", "half", "random", "one"])
def test_mvn_placement_logdet_matches_slogdet_and_round_trips(centering):
    T = 5
    g = torch.Generator().manual_seed(1)
    L = _random_tril(T, seed=2)
    loc = torch.randn(T, generator=g, dtype=torch.float64)
    c = {"none": None, "zero": torch.zeros(T, dtype=torch.float64),
         "half": torch.full((T,), 0.5, dtype=torch.float64),
         "random": torch.rand(T, generator=g, dtype=torch.float64),
         "one": torch.ones(T, dtype=torch.float64)}[centering]
    x = torch.randn(T, generator=g, dtype=torch.float64) * 2
    h, log_jac = mvn_placement(loc, L, c, x)
    jac = torch.autograd.functional.jacobian(lambda v: mvn_placement(loc, L, c, v)[0], x)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign > 0
    assert abs(log_jac.sum().item() - logabsdet.item()) < 1e-10
    # the affine map is (1 - c) loc + L_c x with L_c lower triangular
    assert torch.allclose(jac, jac.tril(), atol=0)
    x_back = mvn_unplacement(loc, L, c, h)
    assert (x_back - x).abs().max() / x.abs().max() < 1e-10
    h_new = torch.randn(T, generator=g, dtype=torch.float64) * 3  # a point never placed
    assert torch.allclose(mvn_placement(loc, L, c, mvn_unplacement(loc, L, c, h_new))[0], h_new,
                          atol=1e-10, rtol=0)


def test_mvn_placement_ends_and_diagonal_case():
    T = 4
    L = _random_tril(T, seed=3)
    loc = torch.linspace(-1, 1, T, dtype=torch.float64)
    x = torch.randn(T, dtype=torch.float64)
    # c = 0: non-centred loc + L x; c = 1: centred, h = x
    h0, lj0 = mvn_placement(loc, L, torch.zeros(T, dtype=torch.float64), x)
    assert torch.allclose(h0, loc + L @ x, atol=1e-12)
    assert torch.allclose(lj0.sum(), L.diagonal().log().sum(), atol=1e-12)
    h1, lj1 = mvn_placement(loc, L, torch.ones(T, dtype=torch.float64), x)
    assert torch.allclose(h1, x, atol=1e-12) and lj1.abs().max() == 0
    # a diagonal factor: the univariate placement (1 - c) loc + scale^(1 - c) x per coordinate
    scale = L.diagonal()
    c = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    h, lj = mvn_placement(loc, torch.diag(scale), c, x)
    assert torch.allclose(h, (1 - c) * loc + scale ** (1 - c) * x, atol=1e-12)
    assert torch.allclose(lj, (1 - c) * scale.log(), atol=1e-12)


def test_mvn_placement_batched_logdet():
    # batch of factors (e.g. vectorised particles) and of centredness
    T = 3
    L = _random_tril(T, batch=(4,), seed=4)
    loc = torch.randn(4, T, dtype=torch.float64)
    c = torch.rand(T, dtype=torch.float64)
    x = torch.randn(4, T, dtype=torch.float64)
    h, lj = mvn_placement(loc, L, c, x)
    assert h.shape == lj.shape == (4, T)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: mvn_placement(loc[i], L[i], c, v)[0], x[i])
        assert abs(lj[i].sum().item() - torch.linalg.slogdet(jac)[1].item()) < 1e-10
        assert torch.allclose(h[i], mvn_placement(loc[i], L[i], c, x[i])[0], atol=1e-12)


def _ar1_model(T=6):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    phi = torch.tensor(0.8)
    t = torch.arange(T, dtype=torch.get_default_dtype())
    lag = t[:, None] - t[None, :]
    L = torch.where(lag >= 0, phi ** lag.clamp(min=0), torch.zeros(())) * sigma[..., None, None]
    loc = mu[..., None].expand(mu.shape + (T,))
    pyro.sample("h", dist.MultivariateNormal(loc, scale_tril=L))


def test_guide_places_mvn_site():
    guide = AutoPlanarFlow(_ar1_model, num_flows=2)
    guide()
    assert set(guide.hierarchical_sites) == {"h"}
    assert guide.hierarchical_sites["h"].shape == (6,)


def test_non_centred_identity_guide_is_the_prior_exactly():
    """With c = 0, an identity flow and a standard normal affine, the guide draws x ~ N(0, I)
    for every coordinate and places h = mu + L(sigma) x: exactly the prior, so every
    importance weight log p - log q is 0 (only if the placement's log-det is right)."""
    torch.set_default_dtype(torch.float64)
    try:
        init = init_to_value(values={"mu": torch.tensor(0.0), "sigma": torch.tensor(1.0),
                                     "h": torch.zeros(6)})
        guide = AutoNormalizingFlow(
            _ar1_model, lambda d: dist.transforms.AffineTransform(0.0, 1.0, event_dim=1),
            init_loc_fn=init, init_scale=1.0, full_rank=True, centered=0.0)
        guide()
        assert torch.allclose(guide.loc, torch.zeros_like(guide.loc))
        log_w, _, _ = vectorized_importance_weights(_ar1_model, guide, num_samples=200,
                                                    max_plate_nesting=0)
        assert log_w.abs().max() < 1e-10
    finally:
        torch.set_default_dtype(torch.float32)


def test_partially_centred_guide_log_density_matches_autograd_jacobian():
    """For 0 < c < 1 the guide's log-density of its draw (the trace's log_prob_sum: log q(z)
    of the packed latent plus each site's placement/support log-det) equals log q(z) minus
    log|det| of the whole map z -> (mu, log sigma, h) by float64 autograd + slogdet, plus
    the exp's Jacobian for sigma."""
    torch.set_default_dtype(torch.float64)
    try:
        guide = AutoPlanarFlow(_ar1_model, num_flows=2, init_scale=0.7, centered=0.4)
        guide()
        tr = pyro.poutine.trace(guide).get_trace()
        latent_name = "_{}_latent".format(guide._pyro_name)
        z = tr.nodes[latent_name]["value"].detach()
        log_qz = tr.nodes[latent_name]["fn"].log_prob(z).detach()

        def unconstrained(v):
            with pyro.poutine.block():
                sites = guide._emit_sites(v, (), {})
            return torch.cat([sites["mu"].reshape(1), sites["sigma"].log().reshape(1), sites["h"]])

        jac = torch.autograd.functional.jacobian(unconstrained, z)
        sign, logabsdet = torch.linalg.slogdet(jac)
        expected = log_qz - logabsdet - tr.nodes["sigma"]["value"].log()
        tr.compute_log_prob()
        got = sum(site["log_prob_sum"] for site in tr.nodes.values() if site["type"] == "sample")
        assert abs(got.item() - expected.item()) < 1e-8
        # the placement of h is not the identity: h's block of the Jacobian mixes coordinates
        assert (jac[2:, 2:] - torch.eye(6)).abs().max() > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)
