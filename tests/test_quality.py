"""Posterior-quality machinery of the flow guides: pushed-forward scores, sticking-the-landing
gradients, hierarchical (partially non-centred) sites; and guide-side input checks."""

import warnings

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow, AutoRadialFlow
from pyro_nfvi.helpers import planar_flow
from pyro_nfvi.transforms import Planar, Radial, StackedPlanar, StackedRadial


# ------------------------------------------------------------- push_score
@pytest.mark.parametrize("make", [Planar, Radial, lambda d: StackedPlanar(d, 5),
                                  lambda d: StackedRadial(d, 5)],
                         ids=["planar", "radial", "stacked-planar", "stacked-radial"])
@pytest.mark.parametrize("dim", [1, 3, 6])
@pytest.mark.parametrize("batch", [(), (7,), (2, 3)])
def test_push_score_matches_autograd_through_inverse(make, dim, batch):
    torch.manual_seed(dim + len(batch))
    flow = make(dim).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 1.5)  # far from the initialisation
    q = dist.TransformedDistribution(
        dist.Normal(torch.zeros(dim, dtype=torch.float64), 1.0).to_event(1), [flow])
    x = torch.randn(batch + (dim,), dtype=torch.float64)
    y, score = flow.push_score(x, -x)
    assert torch.allclose(y, flow(x), atol=1e-12, rtol=0)
    z = y.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(q.log_prob(z).sum(), z)  # through the exact inverse
    assert score.shape == ref.shape
    assert torch.allclose(score, ref, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------- STL
def _prior_only():
    pyro.sample("z", dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1))


def _exact_guide(stl):
    """A planar-flow guide whose density equals the prior of ``_prior_only`` exactly:
    loc 0, scale 1, and every planar layer the identity (u chosen so that û = 0)."""
    guide = AutoPlanarFlow(_prior_only, num_flows=4, stl=stl, init_loc_fn=lambda site: torch.zeros(3))
    guide()
    with torch.no_grad():
        guide.scale = torch.ones(3)
        theta = guide.transform.theta
        w = torch.randn(4, 3)
        w = w / w.norm(dim=-1, keepdim=True)
        theta[:, 3:6] = w
        theta[:, :3] = 0.0  # u = 0: û = 0
        theta[:, 6] = torch.randn(4)
    return guide


@pytest.mark.parametrize("stl", [True, False])
def test_stl_gradient_vanishes_when_the_guide_is_exact(stl):
    """At q = p every sample's STL gradient is exactly zero (Roeder et al. 2017, §3); the
    ordinary estimator keeps its score-function noise."""
    guide = _exact_guide(stl)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=0)
    loss = elbo.differentiable_loss(_prior_only, guide)
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert abs(float(loss)) < 1e-4  # KL(q || p) = 0
    if stl:
        assert norm < 1e-4
    else:
        assert norm > 1e-2


def test_stl_surrogate_value_and_gradient():
    """The STL log q has the plain value, and its gradient is the path term only:
    ∇_z log q(z) · ∂z/∂φ with ∇_z log q computed independently through the inverses."""
    torch.manual_seed(0)

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(4), 2.0).to_event(1))

    guide = AutoNormalizingFlow(model, lambda d: planar_flow(d, 6), stl=True, full_rank=True)
    guide()
    with torch.no_grad():
        guide.transform.theta.normal_(0.0, 0.7)
        guide.scale_tril = torch.eye(4) + 0.3 * torch.randn(4, 4).tril(-1)
    post = guide.get_posterior()
    z = post.rsample((5,))
    log_q = post.log_prob(z)
    plain = dist.TransformedDistribution(post.base_dist, post.transforms)
    assert torch.allclose(log_q, plain.log_prob(z.detach()), atol=1e-5)
    z_ = z.detach().requires_grad_()
    (score,) = torch.autograd.grad(plain.log_prob(z_).sum(), z_)
    params = [guide.loc, guide.scale_unconstrained, guide.transform.theta]
    got = torch.autograd.grad(log_q.sum(), params, retain_graph=True)
    ref = torch.autograd.grad((score * z).sum(), params)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------- hierarchical sites
def funnel():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("i", 4):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def test_hierarchical_sites_are_found():
    guide = AutoPlanarFlow(funnel)
    guide()
    assert set(guide.hierarchical_sites) == {"x"}
    assert "AutoPlanarFlow.centering" in pyro.get_param_store()
    pyro.clear_param_store()
    plain = AutoPlanarFlow(funnel, centered=1.0)
    plain()
    assert plain.hierarchical_sites == {}


def test_noncentred_guide_is_exact_on_the_funnel():
    """Non-centred with loc 0, scale (3, 1, ...) and identity flows, the guide IS the funnel
    prior: every importance weight log p - log q is zero. This checks the Jacobian of the
    placement (log scale per coordinate) and of the support bijections."""
    guide = AutoPlanarFlow(funnel, num_flows=2, centered=0.0)
    guide()
    with torch.no_grad():
        guide.scale = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0])
        guide.transform.theta.zero_()  # w = 0, u = 0: û = 0, the identity
        guide.loc.zero_()
    for _ in range(5):
        tr = poutine.trace(guide).get_trace()
        mt = poutine.trace(poutine.replay(funnel, trace=tr)).get_trace()
        assert abs(float(mt.log_prob_sum() - tr.log_prob_sum())) < 1e-4


@pytest.mark.parametrize("c", [0.3, 0.8])
def test_partially_centred_density_is_exact(c):
    """With centredness c, x = scale^(1-c) x̃ given v: the guide's log density of (v, x)
    must equal log N(v; m, s) + Σ log N(x_i; 0, exp(v/2)^(1-c) s_i)."""
    guide = AutoPlanarFlow(funnel, num_flows=2, centered=c)
    guide()
    with torch.no_grad():
        guide.transform.theta.zero_()
        guide.loc.copy_(torch.tensor([0.5, 0.1, -0.2, 0.3, 0.0]))
        guide.scale = torch.tensor([1.5, 0.7, 1.2, 0.9, 1.1])
    loc, scale = guide.loc.detach(), guide.scale.detach()
    for _ in range(3):
        tr = poutine.trace(guide).get_trace()
        v, x = tr.nodes["v"]["value"], tr.nodes["x"]["value"]
        sd_x = torch.exp(v / 2) ** (1 - c) * scale[1:]
        mean_x = torch.exp(v / 2) ** (1 - c) * loc[1:]
        expected = dist.Normal(loc[0], scale[0]).log_prob(v) + dist.Normal(mean_x, sd_x).log_prob(x).sum()
        assert abs(float(tr.log_prob_sum() - expected)) < 1e-4


@pytest.mark.parametrize("num_obs, noise, expected", [(0, 1.0, 0.02), (1, 1.0, 0.64), (4, 2.0, 0.64),
                                                     (400, 1.0, 0.98)])
def test_initial_centering_is_the_shrinkage_factor(num_obs, noise, expected):
    """theta ~ N(mu, 2) seen through num_obs observations of sd `noise`: curvature
    I = num_obs / noise², shrinkage κ = 4 I / (1 + 4 I), initial centredness κ² clamped
    to [0.02, 0.98]."""
    data = torch.zeros(num_obs)

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        theta = pyro.sample("theta", dist.Normal(mu, 2.0))
        if len(data):
            with pyro.plate("n", len(data)):
                pyro.sample("y", dist.Normal(theta, noise), obs=data)

    guide = AutoPlanarFlow(model)
    guide(data)
    assert float(guide.hierarchical_sites["theta"]) == pytest.approx(expected, abs=1e-5)


def test_centering_is_trained():
    data = torch.randn(8)

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(3.0))
        with pyro.plate("g", 8):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=data)

    guide = AutoPlanarFlow(model, num_flows=2)
    guide(data)
    before = guide.hierarchical_sites["theta"].clone()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(data)
    after = guide.hierarchical_sites["theta"]
    assert "AutoPlanarFlow.centering" in pyro.get_param_store()
    assert (after - before).abs().min() > 1e-4


def test_median_and_quantiles_with_hierarchical_sites():
    guide = AutoPlanarFlow(funnel, centered=0.0)
    guide()
    with torch.no_grad():
        guide.scale = torch.tensor([0.01, 1.0, 1.0, 1.0, 1.0])
        guide.loc.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0]))
    q = guide.quantiles([0.1587, 0.8413], num_samples=4000)
    assert q["x"].shape == (2, 4)
    # x = exp(v/2) x̃ with v ≈ 2: sd ≈ e
    sd = (q["x"][1] - q["x"][0]) / 2
    assert torch.allclose(sd, torch.full((4,), 2.718), rtol=0.15)


# ----------------------------------------------------- guide-side input checks
def test_subsampled_local_latents_raise():
    data = torch.randn(40)

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 40, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data[idx])

    for cls in (AutoPlanarFlow, AutoRadialFlow):
        with pytest.raises(ValueError, match=r"'z'.*'rows'.*AutoAmortizedFlow"):
            cls(model)(data)


def test_subsampled_plate_of_observations_only_is_fine():
    data = torch.randn(40)

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 40, subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[idx])

    assert AutoPlanarFlow(model)(data)["mu"].shape == ()


def test_changed_site_shapes_raise():
    def model(data):
        with pyro.plate("rows", len(data)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    guide = AutoPlanarFlow(model)
    assert guide(torch.randn(5))["z"].shape == (5,)
    assert guide(torch.randn(5))["z"].shape == (5,)  # new values, same shapes: fine
    with pytest.raises(ValueError, match=r"'z'.*\(5,\).*\(7,\)"):
        guide(torch.randn(7))


def test_frozen_guide_predictive_is_silent():
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    guide = AutoPlanarFlow(model, num_flows=2)
    guide()
    guide.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = Predictive(model, guide=guide, num_samples=3)()
    assert out["z"].shape == (3,)


def test_trace_module_holding_the_guide():
    """The TorchScript step of Pyro's Bayesian regression tutorial: trace a module that
    runs the guide and returns its draws."""

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AutoPlanarFlow(model, num_flows=2)
    guide()

    class Draw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.guide = guide

        def forward(self, x):
            return self.guide()["z"] + x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(Draw(), {"forward": (torch.zeros(2),)}, check_trace=False)
    assert traced(torch.zeros(2)).shape == (2,)


# ------------------------------------------------------------- fit defaults
def test_fit_default_uses_vectorised_particles():
    from pyro_nfvi.infer import DEFAULT_NUM_PARTICLES, fit

    shapes = []

    def model(data):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        shapes.append(tuple(z.shape))
        with pyro.plate("n", len(data)):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    fit(model, AutoPlanarFlow(model, num_flows=2), torch.zeros(3), num_steps=2, progress=False)
    assert (DEFAULT_NUM_PARTICLES, 1) in shapes


def test_fit_falls_back_to_sequential_particles():
    from pyro_nfvi.infer import fit

    calls = []

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        calls.append(tuple(z.shape))
        if z.dim():  # a model written for one draw at a time
            raise RuntimeError("this model cannot broadcast")
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    with pytest.warns(RuntimeWarning, match="sequential particles"):
        losses = fit(model, AutoPlanarFlow(model, num_flows=2), num_steps=3, num_particles=4,
                     progress=False)
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
