"""The heavy-tailed base of the flow guides (issue 21, item 5): ``base="studentt"`` draws
independent Student-t coordinates with learnable degrees of freedom; its log-density is
exact (float64: the t density formula + autograd Jacobian + slogdet), sticking the landing
uses the t score (the surrogate's gradient is the path derivative), the summaries stay
reproducible and leave the global random stream alone."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO

from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow, AutoSylvesterFlow


def _model():
    a = pyro.sample("a", dist.Normal(0.0, 2.0))
    pyro.sample("b", dist.LogNormal(a / 4, 1.0))
    pyro.sample("c", dist.Normal(0.0, 1.0).expand([2]).to_event(1))


def _randomized(guide, seed=0, df=3.0):
    """Flow parameters far from the identity, the base's degrees of freedom at ``df``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.transform.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
    guide.base_df = torch.full_like(guide.loc, df) + torch.arange(guide.latent_dim)
    return guide


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_bad_base_raises():
    with pytest.raises(ValueError, match="base"):
        AutoPlanarFlow(_model, base="cauchy")
    with pytest.raises(ValueError, match="base"):
        AutoNormalizingFlow(_model, lambda d: [], base=None)


def _t_log_density(x, df):
    return (torch.lgamma((df + 1) / 2) - torch.lgamma(df / 2) - 0.5 * torch.log(df * math.pi)
            - (df + 1) / 2 * torch.log1p(x * x / df)).sum(-1)


@pytest.mark.parametrize("cls", [AutoPlanarFlow, AutoSylvesterFlow])
def test_studentt_log_density_is_exact(cls, float64):
    guide = cls(_model, num_flows=3, base="studentt")
    guide()
    _randomized(guide)
    post = guide.get_posterior()
    assert isinstance(post.base_dist.base_dist, dist.StudentT)
    z = post.rsample((5,))
    log_q = post.log_prob(z)  # computed in the forward pass
    parts = torch.distributions.transforms.ComposeTransform(post.transforms)
    df = guide.base_df.detach()
    for i in range(5):
        eps = parts.inv(z[i]).detach()
        assert torch.allclose(parts(eps), z[i], atol=1e-10)
        jac = torch.autograd.functional.jacobian(lambda e: parts(e), eps)
        ref = _t_log_density(eps, df) - torch.linalg.slogdet(jac)[1]
        assert abs(log_q[i].item() - ref.item()) < 1e-9
        # and the inverse route of log_prob (a value the guide did not just draw)
        assert abs(post.log_prob(z[i].detach().clone()).item() - ref.item()) < 1e-9


@pytest.mark.parametrize("cls", [AutoPlanarFlow, AutoSylvesterFlow])
def test_studentt_stl_gradient_is_the_path_derivative(cls, float64):
    """The STL surrogate's gradient is ∇_z log q(z)|_{z fixed params} · ∂z/∂φ, with the score
    ∇_z log q by autograd through the inverses (independent of the score push, which must
    start from the t score -(ν+1)ε/(ν+ε²), not the normal one)."""
    guide = cls(_model, num_flows=3, base="studentt")
    guide()
    _randomized(guide, seed=1)
    params = [p for p in guide.parameters() if p.requires_grad]
    post = guide.get_posterior()
    assert post._stl
    torch.manual_seed(3)
    z = post.rsample((4,))
    surrogate = post.log_prob(z)
    exact = torch.distributions.TransformedDistribution.log_prob(post, z.detach())
    assert torch.allclose(surrogate, exact, atol=1e-9)
    grads = torch.autograd.grad(surrogate.sum(), params, allow_unused=True, retain_graph=True)
    z_ = z.detach().requires_grad_()
    (score,) = torch.autograd.grad(
        torch.distributions.TransformedDistribution.log_prob(post, z_).sum(), z_)
    ref = torch.autograd.grad((score * z).sum(), params, allow_unused=True)
    names = [n for n, p in guide.named_parameters() if p.requires_grad]
    assert any("base_df" in n for n in names)
    for name, g, r in zip(names, grads, ref):
        g = torch.zeros_like(params[0]) if g is None else g
        r = torch.zeros_like(params[0]) if r is None else r
        assert torch.allclose(g, r, atol=1e-8, rtol=1e-7), name


def test_studentt_df_is_learned_and_summaries_reproducible():
    guide = AutoPlanarFlow(_model, num_flows=2, base="studentt")
    svi = SVI(_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        svi.step()
    df = guide.base_df.detach()
    assert df.shape == (4,) and (df > 1).all()
    assert not torch.allclose(df, torch.full_like(df, 10.0))  # trained from its initial value
    assert any("base_df" in name for name in pyro.get_param_store().keys())
    torch.manual_seed(0)
    m1 = guide.median()
    after = torch.rand(4)
    torch.manual_seed(0)
    after_ref = torch.rand(4)
    m2 = guide.median()
    assert torch.equal(after, after_ref)  # the global stream is left as it was
    for name in m1:
        assert torch.equal(m1[name], m2[name])


def test_normal_base_unchanged_by_option():
    # base="normal" (the default) is the standard normal with the fast path
    guide = AutoPlanarFlow(_model, num_flows=2)
    guide()
    post = guide.get_posterior()
    assert post._standard_base and isinstance(post.base_dist.base_dist, dist.Normal)
    assert not hasattr(guide, "base_df")
