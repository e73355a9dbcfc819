import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from pyro_nfvi.diagnostics import (
    ess_fraction,
    evaluate_density,
    evaluate_guide,
    importance_log_weights,
    kl_divergence,
    log_mean_exp,
    psis_khat,
)
from pyro_nfvi.targets import get_target


class _NormalTarget:
    """Unnormalised N(mu, diag s^2) with a known log Z."""

    def __init__(self, mu, s, c=0.3):
        self.mu, self.s, self.c = torch.as_tensor(mu), torch.as_tensor(s), c
        d = self.mu.numel()
        self.log_Z = c + 0.5 * d * math.log(2 * math.pi) + float(torch.log(self.s).sum())

    def log_prob_unnormalized(self, z):
        return self.c - 0.5 * (((z - self.mu) / self.s) ** 2).sum(-1)


def _analytic_kl_std_normal(mu, s):
    # KL(N(0, I) || N(mu, diag s^2))
    mu, s = torch.as_tensor(mu), torch.as_tensor(s)
    return float((torch.log(s) + (1 + mu ** 2) / (2 * s ** 2) - 0.5).sum())


def test_kl_matches_analytic():
    q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    mu, s = [0.5, -1.0], [1.5, 0.8]
    target = _NormalTarget(mu, s)
    kl, se = kl_divergence(q, target, 40000, seed=0)
    exact = _analytic_kl_std_normal(mu, s)
    assert se > 0
    assert abs(kl - exact) < 4 * se
    d = evaluate_density(q, target, num_samples=40000, seed=1)
    assert abs(d["kl"] - exact) < 4 * d["kl_se"]
    assert abs(d["elbo"] - (target.log_Z - exact)) < 4 * d["elbo_se"]
    assert abs(d["log_Z_is"] - target.log_Z) < 4 * d["log_Z_is_se"] + 1e-3
    assert 0 < d["ess"] < 1


def test_kl_nonnegative_and_needs_log_Z():
    torch.manual_seed(0)
    for _ in range(3):
        mu = torch.randn(2)
        s = torch.rand(2) + 0.3
        q = dist.Normal(mu + 0.3 * torch.randn(2), s * (1 + 0.2 * torch.rand(2))).to_event(1)
        kl, se = kl_divergence(q, _NormalTarget(mu, s), 20000)
        assert kl > -3 * se
    q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    with pytest.raises(ValueError):
        kl_divergence(q, lambda z: -0.5 * (z ** 2).sum(-1), 100)
    with pytest.raises(ValueError):
        kl_divergence(q, _NormalTarget([0.0, 0.0], [1.0, 1.0]), 1)


def test_q_equals_p_gives_perfect_diagnostics():
    q = dist.Normal(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])).to_event(1)
    target = _NormalTarget([1.0, 2.0], [0.5, 2.0])
    d = evaluate_density(q, target, num_samples=5000, seed=0)
    assert abs(d["kl"]) < 1e-5
    assert d["ess"] > 0.999
    assert d["k_hat"] < 0.5
    assert abs(d["log_Z_is"] - target.log_Z) < 1e-5


def test_slightly_wider_q_gives_small_khat_and_heavy_tails_large_khat():
    target = _NormalTarget([0.0, 0.0], [1.0, 1.0])
    wide = dist.Normal(torch.zeros(2), 1.2).to_event(1)
    d = evaluate_density(wide, target, num_samples=20000, seed=0)
    assert d["k_hat"] < 0.5 and d["ess"] > 0.7
    # q = N(0, 0.4^2 I) narrower than p: w = exp(c r^2) has Pareto tail, k = 1 - 0.4^2
    narrow = dist.Normal(torch.zeros(2), 0.4).to_event(1)
    d2 = evaluate_density(narrow, target, num_samples=20000, seed=0)
    assert d2["k_hat"] > 0.7 and abs(d2["k_hat"] - 0.84) < 0.1
    assert d2["ess"] < d["ess"]


def test_weight_helpers():
    assert ess_fraction(torch.zeros(10)) == pytest.approx(1.0)
    lw = torch.tensor([0.0] + [-1e4] * 9)
    assert ess_fraction(lw) == pytest.approx(0.1)
    est, se = log_mean_exp(torch.log(torch.tensor([1.0, 3.0])))
    assert est == pytest.approx(math.log(2.0))
    assert psis_khat(torch.zeros(100)) == -math.inf
    torch.manual_seed(0)
    # Pareto(alpha) weights have tail index k = 1 / alpha
    w = torch.distributions.Pareto(1.0, 2.0).sample((20000,))
    assert abs(psis_khat(w.log()) - 0.5) < 0.1
    with pytest.warns(UserWarning):
        assert psis_khat(torch.randn(12)) == math.inf


def test_evaluate_density_on_target_object():
    t = get_target("U2")
    q = dist.Normal(torch.zeros(2), torch.tensor([2.0, 1.0])).to_event(1)
    d = evaluate_density(q, t, num_samples=2000, seed=0)
    assert set(d) >= {"kl", "kl_se", "elbo", "ess", "k_hat", "log_Z_is", "log_Z_is_se"}
    assert d["kl"] > 0 and d["log_Z"] == t.log_Z


# ---- guides vs models -----------------------------------------------------------

X = torch.tensor([0.3, 1.1, 2.0, 1.4, 0.9])
PRIOR_SD, LIK_SD = 2.0, 1.0


def _model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, LIK_SD), obs=x)


def _posterior(x):
    prec = 1 / PRIOR_SD ** 2 + len(x) / LIK_SD ** 2
    return float(x.sum() / LIK_SD ** 2 / prec), float(prec ** -0.5)


def _log_evidence(x):
    n = len(x)
    cov = LIK_SD ** 2 * torch.eye(n) + PRIOR_SD ** 2 * torch.ones(n, n)
    return float(dist.MultivariateNormal(torch.zeros(n), cov).log_prob(x))


def _exact_guide(x):
    m, s = _posterior(x)
    pyro.sample("mu", dist.Normal(m, s))


@pytest.mark.parametrize("vectorize", [None, True, False])
def test_evaluate_guide_exact_posterior(vectorize):
    d = evaluate_guide(_model, _exact_guide, X, num_samples=200, vectorize=vectorize)
    logZ = _log_evidence(X)
    assert d["elbo"] == pytest.approx(logZ, abs=1e-4)
    assert d["iwae"] == pytest.approx(logZ, abs=1e-4)
    assert d["ess"] > 0.999 and d["k_hat"] < 0.5
    assert d["num_samples"] == 200


def test_evaluate_guide_fitted_autonormal():
    from pyro_nfvi.infer import fit

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(_model)
    fit(_model, guide, X, num_steps=600, optim=pyro.optim.Adam({"lr": 0.03}), progress=False)
    d = evaluate_guide(_model, guide, X, num_samples=2000)
    logZ = _log_evidence(X)
    assert abs(d["elbo"] - logZ) < 0.05
    assert abs(d["iwae"] - logZ) < 0.02
    assert d["iwae"] >= d["elbo"] - 1e-3
    assert d["k_hat"] < 0.7 and d["ess"] > 0.8


def test_evaluate_guide_bad_guide_and_kwargs():
    def guide(x, shift=0.0):
        pyro.sample("mu", dist.Normal(shift, 0.1))

    def model(x, shift=0.0):
        _model(x)

    d = evaluate_guide(model, guide, X, num_samples=500, shift=-1.0)
    assert d["elbo"] < _log_evidence(X) - 1.0
    assert d["ess"] < 0.5
    lw = importance_log_weights(model, guide, X, num_samples=50, shift=-1.0)
    assert lw.shape == (50,)


def test_evaluate_guide_catches_a_model_that_mixes_particles():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z.sum(), 1.0), obs=torch.tensor(1.0))  # mixes particles

    def guide():
        pyro.sample("z", dist.Normal(0.5, 0.5 ** 0.5))  # the exact posterior

    exact = float(dist.Normal(0.0, 2 ** 0.5).log_prob(torch.tensor(1.0)))
    pyro.set_rng_seed(0)
    d = evaluate_guide(model, guide, num_samples=200)
    assert abs(d["elbo"] - exact) < 1e-4 and abs(d["iwae"] - exact) < 1e-4


@pytest.mark.parametrize("kw, name", [(dict(vectorize="yes"), "vectorize"), (dict(max_plate_nesting=-1), "max_plate_nesting")])
def test_evaluate_guide_names_a_bad_option(kw, name):
    model = lambda: pyro.sample("z", dist.Normal(0.0, 1.0))  # noqa: E731
    with pytest.raises((TypeError, ValueError), match=name):
        evaluate_guide(model, model, num_samples=10, **kw)
